"""Where a step's rollouts come from: generated on the spot (`rollout.async_steps=0`), or started
up to k steps earlier so the engines sample while the learner scores and updates (k > 0).

    step t:  take(t) ─ reward ─ prefetch(t): start t+1..t+k ─ score ─ update ─ sync v(t+1)
                                 └─ engines generate here, with v(t) ─┘

Bound: the batch of step t is started at step s ≥ t − k with the weights then current, version
s; the learner trains on it at version t, so its staleness t − s never exceeds k (checked when
taken — a violation is a bug, and stops the run). The update corrects for it with the sampler
logprobs the batch carries (algorithm.tis_cap / tis_mode).

No torn weights: an engine runs its calls in order, so a generation started before a sync
samples with the old weights whole, and the sync loads after it finishes.

Resume: a checkpoint holds the batches in flight (finished by then: the sync waited for them)
with their versions; a resumed run takes them instead of sampling again, which it could not do
exactly — the weights they were sampled with are gone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from rl.cluster.rollout_group import Generation, RolloutGroup
from rollout.vllm_engine import Completion


@dataclass
class StepRollouts:
    """One step's completions (or the generation that will produce them) and the policy version
    that samples them; its encoded prompts when this process encoded them (not after a resume)."""
    version: int
    generation: Generation | None = None
    completions: list[list[Completion]] | None = None
    prompts: list | None = None


class RolloutQueue:
    def __init__(self, engines: RolloutGroup, start: Callable[[int], tuple[list, Generation]],
                 async_steps: int, last_step: int):
        """`start(step)`: submits that step's prompts to the engines (seeded by step, so the
        same step always asks the same thing) and returns (the encoded prompts, the generation)."""
        self.engines, self.start, self.k, self.last_step = engines, start, async_steps, last_step
        self.pending: dict[int, StepRollouts] = {}

    def take(self, step: int) -> tuple[list | None, list[list[Completion]], int]:
        """Step's encoded prompts (None: started before a resume), its completions in prompt
        order, and their staleness (policy versions between the sampler and the learner now)."""
        r = self.pending.pop(step, None) or self.begin(step)
        if r.completions is None:
            r.completions = self.engines.collect(r.generation)
        staleness = self.engines.version - r.version
        if not 0 <= staleness <= self.k:
            raise RuntimeError(f"step {step + 1}: rollouts sampled with weights v{r.version}, the "
                               f"learner is at v{self.engines.version} — staleness {staleness} "
                               f"outside [0, rollout.async_steps={self.k}]")
        return r.prompts, r.completions, staleness

    def prefetch(self, step: int) -> None:
        """Start steps step+1 .. step+k (those not started yet) with the current weights."""
        for s in range(step + 1, min(step + self.k, self.last_step - 1) + 1):
            if s not in self.pending:
                self.pending[s] = self.begin(s)

    def begin(self, step: int) -> StepRollouts:
        prompts, g = self.start(step)
        return StepRollouts(g.version, generation=g, prompts=prompts)

    def in_flight(self) -> list[dict]:
        """The started batches, finished and as plain data, for a checkpoint."""
        out = []
        for step, r in sorted(self.pending.items()):
            if r.completions is None:
                r.completions = self.engines.collect(r.generation)
            out.append({"step": step, "version": r.version,
                        "completions": [[asdict(c) for c in cs] for cs in r.completions]})
        return out

    def restore(self, saved: list[dict]) -> None:
        """Back to a checkpoint's batches in flight; whatever was started since is dropped."""
        self.pending = {d["step"]: StepRollouts(d["version"], completions=[
            [Completion(**c) for c in cs] for cs in d["completions"]]) for d in saved}
