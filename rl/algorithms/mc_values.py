"""Token values by Monte Carlo (VinePPO, Kazemnejad et al. 2024): the reference a token-credit
signal is measured against.

For a response r to prompt p, the value of the prefix s_j = p ⊕ r[:j] is the success rate of
continuations sampled from it with the policy: V(s_j) ≈ (1/K) Σ_k judge(r[:j] ⊕ c_k). The last
prefix is the whole response, whose value is its own outcome (no sampling). A token's Monte
Carlo advantage is A_t = V(s_{t+1}) − V(s_t); with a stride S > 1 values are estimated every S
tokens and every token of a block gets the block's change (VinePPO's step-level values).

The sampler is any `(prefix token ids, K, seeds) → K continuations per prefix` — a vLLM engine
(`rollout_sampler`) in the benchmark and the `mc` credit arm — and the judge scores a
response's token ids (the task's verifier). Seeds are per (seed, response, prefix), so a run
repeats exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from rl.tasks.base import stable_hash

# (prefix token ids per request, K, one seed per request, each request's token budget)
#   → per request, K continuations' token ids
Sampler = Callable[[list[list[int]], int, list[int], list[int]], list[list[list[int]]]]
# (response index, the response's token ids) → its outcome in [0, 1]
Judge = Callable[[int, list[int]], float]


def prefix_points(length: int, stride: int) -> list[int]:
    """Response prefix lengths whose value is estimated: 0, S, 2S, … below `length`, then the
    whole response."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return list(range(0, length, stride)) + [length]


@dataclass
class TokenValues:
    points: list[int]      # prefix lengths j (response tokens kept), ascending, the last = len(r)
    values: list[float]    # V(s_j); the last is the response's own outcome
    successes: list[float]  # Σ_k judge over the K continuations (the last: the outcome)
    trials: list[int]      # K per sampled prefix; 1 for the whole response

    def advantages(self) -> list[float]:
        """A_t per response token: V at the end of its block minus V at the block's start."""
        out: list[float] = []
        for (a, va), (b, vb) in zip(zip(self.points, self.values),
                                    zip(self.points[1:], self.values[1:])):
            out += [vb - va] * (b - a)
        return out


def mc_token_values(sample: Sampler, judge: Judge, prompts: Sequence[list[int]],
                    responses: Sequence[list[int]], k: int, max_new_tokens: int,
                    stride: int = 1, seed: int = 0) -> list[TokenValues]:
    """One TokenValues per response; every sampled prefix of every response in one batched
    call to `sample` (prefixes of one prompt share their tokens, so an engine with prefix
    caching reuses them). A continuation of s_j may add max_new_tokens − j tokens: the room
    the response itself had."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    requests, where = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        for j in prefix_points(len(r), stride)[:-1]:
            requests.append(list(p) + list(r[:j]))
            where.append((i, j))
    seeds = [stable_hash("mc_values", seed, i, j) % 2**31 for i, j in where]
    budgets = [max_new_tokens - j for _, j in where]
    if any(b < 1 for b in budgets):
        raise ValueError(f"a response is longer than max_new_tokens={max_new_tokens}")
    continuations = sample(requests, k, seeds, budgets) if requests else []
    wins: dict[tuple[int, int], float] = {}
    for (i, j), conts in zip(where, continuations):
        if len(conts) != k:
            raise RuntimeError(f"the sampler returned {len(conts)} continuations, not {k}")
        wins[i, j] = sum(judge(i, list(responses[i][:j]) + list(c)) for c in conts)
    out = []
    for i, r in enumerate(responses):
        points = prefix_points(len(r), stride)
        succ = [wins[i, j] for j in points[:-1]] + [judge(i, list(r))]
        trials = [k] * (len(points) - 1) + [1]
        out.append(TokenValues(points, [s / n for s, n in zip(succ, trials)], succ, trials))
    return out


def verifier_judge(tok, meta: Sequence[dict]) -> Judge:
    """The task's verifier as a Judge: response i's token ids decoded and scored against
    meta[i] (a collated row's meta: its verifier name, answer and sample meta). In-process and
    without the reward pool's timeout: the verifiers of the shipped tasks are string checks."""
    from rewards.verifiers import resolve

    def judge(i: int, ids: list[int]) -> float:
        m = meta[i]
        text = tok.decode(ids, skip_special_tokens=True)
        return float(resolve(m["task"])(text, m["answer"], m["sample_meta"]))
    return judge


# (prefix token ids, K, one seed per prefix, max new tokens) → per prefix, K completions
# (objects with .token_ids): one vLLM engine's or the rollout group's `generate`
Generate = Callable[[list[list[int]], int, list[int], int], list]


def budget_sampler(generate: Generate) -> Sampler:
    """A Sampler from a generate call that takes one token budget: one call per distinct
    budget (vLLM refuses K > 1 at temperature 0, so the caller's temperature must be > 0 for
    K > 1)."""

    def sample(requests, k, seeds, budgets):
        out: list = [None] * len(requests)
        for budget in sorted(set(budgets)):
            idx = [i for i, b in enumerate(budgets) if b == budget]
            comps = generate([requests[i] for i in idx], k, [seeds[i] for i in idx], budget)
            for i, cs in zip(idx, comps):
                out[i] = [list(c.token_ids) for c in cs]
        return out
    return sample


def rollout_sampler(engine, temperature: float, top_p: float = 1.0) -> Sampler:
    """One vLLM engine actor (rollout/vllm_engine.py) as a Sampler."""
    import ray

    return budget_sampler(lambda reqs, k, seeds, budget: ray.get(
        engine.generate.remote(reqs, k, temperature, top_p, budget, seeds)))
