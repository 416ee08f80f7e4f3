"""Asynchronous rollouts (`rollout.async_steps=k`) on the real stack: the engines sample steps
t+1..t+k while the learner updates on step t.

One uninterrupted run with k = 2 over 4 steps (a checkpoint after every step) is the reference:
its staleness per step, the weights that really sampled each batch (the sampler logprobs
against the checkpoints' HF exports, scored by plain transformers), then a run stopped after
step 2 — with two batches in flight — and resumed, which must replay steps 3 and 4 exactly, and
a run whose engine is killed with two batches queued on it.
"""
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rl.loop.rollout_queue import RolloutQueue
from rl.tasks.base import stable_hash
from rl.loop.trainer import Trainer
from tests.e2e.test_pipeline import make_cfg, metrics, run, stop_then_kill

pytestmark = pytest.mark.timeout(3600)
K = 2
TIS_CAP = 2.0  # c: with tis_mode=mask a token drops out where ρ lies outside [1/c, c]
ASYNC = [f"rollout.async_steps={K}", "steps=4", "save_every=1", "keep_last=0",
         "eval_every=4", f"algorithm.tis_cap={TIS_CAP}", "algorithm.tis_mode=mask"]


@pytest.fixture(scope="module")
def async_run(ray_session, tmp_path_factory, dataset, cache_dir):
    """The reference run; every step's batch recorded as the learner received it, and what
    each update trained on (copies of the fields the sampler correction reads, taken as
    `Trainer.update` is called, with the minibatch settings it splits by)."""
    out = tmp_path_factory.mktemp("async_a")
    batches, updates, rollout, update = {}, {}, Trainer.rollout, Trainer.update

    def recording_rollout(self, step):
        batch, staleness = rollout(self, step)
        batches[step + 1] = (batch, staleness)
        return batch, staleness

    def recording_update(self, batch, step, extra_rows):
        updates[step + 1] = {"old": batch.old_logprobs.clone(), "sampler": batch.sampler_logprobs.clone(),
                             "mask": batch.response_mask.clone(), "step": step, "seed": self.cfg.seed,
                             "epochs": self.alg.epochs, "minibatch_size": self.alg.minibatch_size}
        return update(self, batch, step, extra_rows)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "rollout", recording_rollout)
        mp.setattr(Trainer, "update", recording_update)
        summary, _ = run(make_cfg(out, cache_dir, dataset, ASYNC))
    return out, summary, batches, updates


def corrected_fracs(rec: dict) -> list[float]:
    """`train/is_corrected_frac`'s parts, recomputed from the batch an update trained on: per
    minibatch (the seeded permutation `Trainer.update` draws, minibatch_size rows each, every
    epoch), the share of its response tokens whose importance weight ρ = exp(old − sampler)
    the mask correction zeroed, i.e. ρ outside [1/c, c] ⇔ |old − sampler| > log c. The
    learner reports each minibatch's value token-weighted over ranks and micro-batches (= this
    share); the trainer logs their mean."""
    gen = torch.Generator().manual_seed(stable_hash("minibatch", rec["seed"], rec["step"]) % 2**63)
    mask = rec["mask"].bool()
    dropped = ((rec["old"] - rec["sampler"]).abs() > math.log(TIS_CAP)) & mask
    rows, mb = len(mask), rec["minibatch_size"]
    fracs = []
    for _ in range(rec["epochs"]):
        perm = torch.randperm(rows, generator=gen)
        for start in range(0, rows, mb):
            idx = perm[start:start + mb]
            fracs.append(float(dropped[idx].sum()) / max(float(mask[idx].sum()), 1.0))
    return fracs


def test_staleness_reaches_k_and_never_exceeds_it(async_run):
    """Step 1 is generated on the spot (v0, trained at v0); steps 2 and 3 were both started
    with v0 during step 1, trained at v1 and v2; step 4 started with v1 during step 2, trained
    at v3."""
    out, summary, batches, updates = async_run
    m = metrics(out)
    assert summary["steps"] == 4
    assert [m[s]["rollout/staleness"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert [batches[s][1] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
    fracs = {s: corrected_fracs(updates[s]) for s in (1, 2, 3, 4)}
    print("is_corrected_frac per minibatch", fracs)
    assert sum(map(sum, fracs.values())) > 0  # the stale steps do drop tokens: a real comparison
    for s in (1, 2, 3, 4):  # the masked correction ran and reports what it dropped
        assert m[s]["train/is_corrected_frac"] == pytest.approx(np.mean(fracs[s]), rel=1e-6, abs=1e-9), s
        assert m[s]["train/grad_norm"] > 0


def hf_logprobs(hf_dir: Path, batch) -> torch.Tensor:
    """Per-token logprobs of the batch's rows under an exported checkpoint, by plain
    transformers (no vLLM, no learner): what the sampler's logprobs must equal if these
    weights — whole — sampled the batch. Aligned like the batch (position t scores token t)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(len(lp), 1), lp], 1) * batch.response_mask


def test_each_batch_was_sampled_by_the_weights_its_staleness_names(async_run):
    """Step 4's batch has staleness 2: sampled with v1 (the checkpoint after step 1), trained at
    v3. Its sampler logprobs match v1's export to float precision, and not v3's — the engine
    sampled with v1 whole, though syncs to v2 and v3 were sent while it was queued."""
    out, _, batches, _ = async_run
    batch, staleness = batches[4]
    assert staleness == 2
    mask = batch.response_mask
    gap = {v: float(((batch.sampler_logprobs - hf_logprobs(
        out / "checkpoints" / f"step_{v:06d}" / "hf", batch)).abs() * mask).max()) for v in (1, 3)}
    print("sampler vs export gaps", gap)
    assert gap[1] < 1e-4, gap
    assert gap[3] > 100 * gap[1] and gap[3] > 1e-3, gap
    # and the learner's scoring forward (v3) reports the same v3-vs-sampler gap the loss corrects
    assert float(((batch.old_logprobs - hf_logprobs(out / "checkpoints" / "step_000003" / "hf",
                                                    batch)).abs() * mask).max()) < 1e-4


def test_async_resume_is_exact_with_batches_in_flight(async_run, tmp_path_factory, dataset,
                                                      cache_dir):
    """Stopped after step 2: the checkpoint holds steps 3 and 4's batches (sampled with v0 and
    v1, weights a resumed run no longer has); resume=true trains on them and replays steps 3 and
    4 exactly."""
    full, _, _, _ = async_run
    out = tmp_path_factory.mktemp("async_b")
    summary, _ = run(make_cfg(out, cache_dir, dataset, ASYNC + ["stop_after=2"]))
    assert summary["steps"] == 2
    saved = json.loads((out / "checkpoints" / "step_000002" / "rollouts_in_flight.json").read_text())
    assert [(d["step"], d["version"]) for d in saved] == [(2, 0), (3, 1)]
    assert all(len(cs) == 4 for d in saved for cs in d["completions"])  # 2 prompts × n=4
    run(make_cfg(out, cache_dir, dataset, ASYNC + ["resume=true"]))
    a, b = metrics(full), metrics(out)
    assert sorted(b) == [0, 1, 2, 3, 4]
    for step in (3, 4):
        for key in ("train/loss", "reward/total", "train/grad_norm", "rollout/response_len",
                    "rollout/staleness", "train/is_corrected_frac"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_an_engine_killed_with_two_batches_queued_changes_nothing(
        async_run, tmp_path_factory, dataset, cache_dir, monkeypatch, caplog):
    """The engine's process is frozen as step 1 starts the batches of steps 2 and 3 (v0) on it,
    and killed a moment later, both still queued. Ray restarts it; each batch is sampled again
    with the weights it was started with — for step 3 that means v0 reloaded into an engine
    already synced to v2 — and the engine gets the current weights back afterwards: every step
    equals the reference run's, and the one death counts as one restart."""
    full, _, _, _ = async_run
    out = tmp_path_factory.mktemp("async_kill")
    prefetch, killed = RolloutQueue.prefetch, []

    def prefetch_into_a_dying_engine(self, step):
        if step == 0 and not killed:
            killed.append(self.engines.ready()[0]["pid"])
            stop_then_kill(killed[0])
        return prefetch(self, step)

    caplog.set_level(logging.WARNING)
    with monkeypatch.context() as mp:
        mp.setattr(RolloutQueue, "prefetch", prefetch_into_a_dying_engine)
        summary, _ = run(make_cfg(out, cache_dir, dataset, ASYNC))
    assert summary["steps"] == 4 and summary["engine_restarts"] == 1
    assert caplog.text.count("restarted as pid") == 1
    assert caplog.text.count("weights v0 loaded, its 2 prompts re-issued") == 2
    a, b = metrics(full), metrics(out)
    for step in (1, 2, 3, 4):
        for key in ("train/loss", "reward/total", "train/grad_norm", "rollout/response_len",
                    "rollout/staleness"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
