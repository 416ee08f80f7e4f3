"""The loss options through the real loop (Ray, vLLM, DeepSpeed), each checked against an
independent computation: truncated importance sampling (`tis_cap`), the KL term to the
reference model (k3 and k1), the entropy bonus, `epochs > 1`, RLOO advantages, and what the
`ppo` preset is.

Two short runs, each a Trainer built from the composed Hydra config:

* `ppo` preset + tis_cap + entropy_coef, one minibatch per step. Step 1 runs stage by stage
  *without* the weight sync that ends `Trainer.train_step`, so step 2 is sampled by the
  cold-start engine while the learner has moved on (the lag of asynchronous RL): the
  sampler/learner ratio departs from 1 and the cap binds. Step 2 is a plain `train_step`.
* `rloo` + k1 KL, epochs=2 and two minibatches per epoch: four optimizer steps in one RL step.

A recorder wraps `Trainer.update` (to keep the batch) and `learner.train_minibatch` (to keep
each minibatch's tensors and returned metrics, and to export the policy's weights just before
that optimizer step). The tests then reload those weights, and the cold start (the reference
model), with plain `transformers`, recompute logprobs and entropy, and rebuild the loss by hand.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from rl.config import register_configs
from tests.e2e.arith_rows import write_rows
from rl.loop.trainer import Trainer

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()

TIS_CAP = 1.1
ENTROPY_COEF = 0.01
KL_COEF = 0.1
TOL = 2e-5  # learner (DeepSpeed actor) vs transformers here: same float32 weights and inputs


def additions(seed: int, n: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(10, 999), rng.randrange(10, 999)) for _ in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("loss_data")
    return (write_rows(d / "train.jsonl", additions(8, 4)),
            write_rows(d / "test.jsonl", additions(9, 2)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("loss_cache"))  # one cold start for both runs


def make_cfg(out: Path, cache: str, dataset, extra=()):
    train, test = dataset
    overrides = [
        f"output_dir={out}", f"cache_dir={cache}", "steps=2", "eval_every=100",
        "save_every=100", "task=gsm8k", f"task.params.path={train}",
        f"++task.params.test_path={test}", "++task.params.verifier=arith", "task.eval_size=2",
        "cold_start.steps=12", "cold_start.batch_size=8", "cold_start.warmup_steps=2",
        "algorithm.prompts_per_step=2", "algorithm.n_samples=4", "algorithm.lr=1e-3",
        "algorithm.lr_warmup_steps=1", "rollout.max_new_tokens=20", "logger=none",
        "logger.progress=false", *extra,
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.task.params.instruction = "Add.\n"
        # A length bonus: rewards differ within every group, so advantages are non-zero.
        cfg.reward.components = {"format": 0.0, "tests.rewards.bad_rewards:length_bonus": 1.0}
    return cfg


@dataclass
class Call:
    """One `train_minibatch` call: its tensors, the policy just before it, what it returned."""
    tensors: dict
    policy: str
    metrics: dict


class Recorder:
    """Passes every call through to the real trainer / learner and keeps what went by."""

    def __init__(self, trainer: Trainer, export_root: Path):
        self.batches, self.calls = [], []
        update, train_minibatch = trainer.update, trainer.learner.train_minibatch

        def recording_update(batch, step, extra_rows=()):
            self.batches.append(batch)
            return update(batch, step, extra_rows)

        def recording_train_minibatch(tensors, *args, **kwargs):
            policy = export_root / f"before_{len(self.calls)}"
            trainer.learner.export_hf(str(policy))
            out = train_minibatch(tensors, *args, **kwargs)
            self.calls.append(Call({k: v.clone() for k, v in tensors.items()}, str(policy), out))
            return out

        trainer.update = recording_update
        trainer.learner.train_minibatch = recording_train_minibatch


@dataclass
class Run:
    cfg: object
    reference: str          # the cold-start folder: the RL policy's start and the KL reference
    batches: list
    calls: list[Call]
    metrics: list[dict]     # what update / train_step returned, per RL step
    optimizer_steps: tuple[int, int] = (0, 0)


# --- independent recomputation ------------------------------------------------------------------
@lru_cache(maxsize=None)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logprobs(path: str, t: dict, temperature: float):
    """Per-token logprobs and entropy of the next-token distribution, [B, T], column 0 = 0."""
    with torch.no_grad():
        logits = hf_model(path)(input_ids=t["input_ids"],
                                attention_mask=t["attention_mask"].long()).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    lp = logp.gather(-1, t["input_ids"][:, 1:, None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros(len(lp), 1)
    return torch.cat([zero, lp], 1), torch.cat([zero, ent], 1)


def by_hand(t: dict, policy: str, reference: str | None, alg, temperature: float) -> dict:
    """Every term of the token-mean policy loss, from the minibatch tensors and HF forwards."""
    m = t["response_mask"].double()

    def mean(x):
        return float((x.double() * m).sum() / m.sum())

    lp, ent = hf_logprobs(policy, t, temperature)
    old, adv = t["old_logprobs"], t["advantages"]
    ratio = torch.exp(lp - old)
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - alg.clip_low, 1 + alg.clip_high) * adv)
    clipped = ((ratio < 1 - alg.clip_low) & (adv < 0)) | ((ratio > 1 + alg.clip_high) & (adv > 0))
    out = {"lp": lp, "ratio": ratio, "pg": mean(pg), "entropy": mean(ent),
           "ratio_mean": mean(ratio), "clip_frac": mean(clipped.float()), "pg_tis": mean(pg)}
    if alg.tis_cap > 0:
        w = torch.exp(old - t["sampler_logprobs"])
        out["pg_tis"] = mean(pg * w.clamp(max=alg.tis_cap))
        out["capped_share"] = mean((w > alg.tis_cap).float())
    if reference is not None:
        ref, _ = hf_logprobs(reference, t, temperature)
        out["ref_lp"] = ref
        out["k1"] = mean(lp - ref)
        out["k3"] = mean(torch.exp(ref - lp) - (ref - lp) - 1)
    kl = out.get(alg.kl_estimator, 0.0) if alg.kl_coef > 0 else 0.0
    out["loss"] = out["pg_tis"] + alg.kl_coef * kl - alg.entropy_coef * out["entropy"]
    return out


def masked_close(a, b, mask, atol):
    return float(((a - b).abs() * mask).max()) < atol


# --- the two runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ppo_run(ray_session, tmp_path_factory, dataset, cache_dir):
    out = tmp_path_factory.mktemp("ppo_tis_entropy")
    cfg = make_cfg(out, cache_dir, dataset, [
        "algorithm=ppo", f"algorithm.kl_coef={KL_COEF}", f"algorithm.tis_cap={TIS_CAP}",
        f"algorithm.entropy_coef={ENTROPY_COEF}", "algorithm.minibatch_size=8"])
    trainer = Trainer(cfg)
    try:
        rec = Recorder(trainer, out / "policies")
        # Step 1 stage by stage, minus the weight sync: the engine stays at the cold start.
        batch, _ = trainer.rollout(0)
        trainer.reward(batch, trainer.decode_responses(batch))
        trainer.score(batch)
        trainer.advantages(batch, 0)
        first = trainer.update(batch, 0)
        second = trainer.train_step(1)  # sampled by the stale engine, scored by the new policy
        return Run(cfg, trainer.policy_init, rec.batches, rec.calls, [first, second])
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def rloo_run(ray_session, tmp_path_factory, dataset, cache_dir):
    out = tmp_path_factory.mktemp("rloo_k1_epochs")
    cfg = make_cfg(out, cache_dir, dataset, [
        "algorithm=rloo", f"algorithm.kl_coef={KL_COEF}", "algorithm.kl_estimator=k1",
        "algorithm.epochs=2", "algorithm.minibatch_size=4"])
    trainer = Trainer(cfg)
    try:
        rec = Recorder(trainer, out / "policies")
        before = trainer.learner.optimizer_steps()
        metrics = trainer.train_step(0)
        steps = (before, trainer.learner.optimizer_steps())
        return Run(cfg, trainer.policy_init, rec.batches, rec.calls, [metrics], steps)
    finally:
        trainer.close()


# --- the ppo preset ---------------------------------------------------------------------------------
def test_ppo_preset_is_grpo_with_a_k3_kl_term(tmp_path, dataset):
    """`algorithm=ppo` has no critic: group-normalised (GRPO) advantages, symmetric PPO-clip,
    and a k3 KL penalty to the cold-start model."""
    a = make_cfg(tmp_path, str(tmp_path), dataset, ["algorithm=ppo"]).algorithm
    assert (a.advantage, a.std_normalize) == ("grpo", True)
    assert a.clip_low == a.clip_high == 0.2
    assert (a.kl_estimator, a.kl_coef) == ("k3", 0.01)
    assert a.tis_cap == 0 and a.entropy_coef == 0 and a.epochs == 1


def test_ppo_run_uses_group_normalised_advantages(ppo_run):
    for batch in ppo_run.batches:
        r, g = batch.rewards.double(), batch.group_ids
        expected = torch.empty_like(r)
        for i in range(len(r)):
            same = r[g == g[i]]
            expected[i] = (r[i] - same.mean()) / (same.std() + 1e-6)
        assert torch.allclose(batch.seq_advantages.double(), expected, atol=1e-5)
        assert batch.seq_advantages.abs().max() > 0.1


# --- KL to the reference model ------------------------------------------------------------------------
def test_reference_logprobs_are_the_cold_start_models(ppo_run):
    """batch.ref_logprobs = logprobs of the cold start from transformers, on both steps; at step 1
    the policy is the cold start, so old = ref and the KL term is 0."""
    temp = ppo_run.cfg.rollout.temperature
    for batch in ppo_run.batches:
        t = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        ref, _ = hf_logprobs(ppo_run.reference, t, temp)
        assert masked_close(batch.ref_logprobs, ref, batch.response_mask, 1e-4)
    first = ppo_run.batches[0]
    assert masked_close(first.old_logprobs, first.ref_logprobs, first.response_mask, 1e-5)
    assert abs(ppo_run.metrics[0]["train/kl"]) < 1e-6


def test_kl_k3_term_through_the_loop(ppo_run):
    """Step 2 (policy = after one update, reference = cold start): the `kl` metric is k3 of the
    two models' logprobs, `rollout/kl_ref` is their k1, and the loss holds β·k3 — not β·k1."""
    call, metrics = ppo_run.calls[1], ppo_run.metrics[1]
    alg, temp = ppo_run.cfg.algorithm, ppo_run.cfg.rollout.temperature
    hand = by_hand(call.tensors, call.policy, ppo_run.reference, alg, temp)
    assert masked_close(call.tensors["ref_logprobs"], hand["ref_lp"],
                        call.tensors["response_mask"], 1e-4)
    print(f"\nppo step 2: k3={hand['k3']:.6f} k1={hand['k1']:.6f} kl metric={metrics['train/kl']:.6f}")
    assert hand["k3"] > 1e-3  # the policy moved away from the reference
    assert metrics["train/kl"] == pytest.approx(hand["k3"], rel=1e-3, abs=1e-6)
    assert metrics["train/kl"] != pytest.approx(hand["k1"], rel=0.05)
    batch = ppo_run.batches[1]
    k1_old = float(((batch.old_logprobs - batch.ref_logprobs) * batch.response_mask).sum()
                   / batch.response_mask.sum())
    assert metrics["rollout/kl_ref"] == pytest.approx(k1_old, rel=1e-4, abs=1e-7)
    assert metrics["train/loss"] == pytest.approx(hand["loss"], abs=TOL)
    without_kl = hand["loss"] - KL_COEF * hand["k3"]
    assert abs(metrics["train/loss"] - without_kl) > 20 * TOL
    with_k1 = without_kl + KL_COEF * hand["k1"]
    assert abs(metrics["train/loss"] - with_k1) > 20 * TOL


def test_kl_k1_term_through_the_loop(rloo_run):
    """k1 (log π − log π_ref): 0 on the first minibatch (policy = cold start), then the value
    from the transformers forwards on every later minibatch of the step."""
    alg, temp = rloo_run.cfg.algorithm, rloo_run.cfg.rollout.temperature
    kls = []
    for i, call in enumerate(rloo_run.calls):
        hand = by_hand(call.tensors, call.policy, rloo_run.reference, alg, temp)
        assert call.metrics["kl"] == pytest.approx(hand["k1"], rel=1e-3, abs=2e-6), i
        # the loss holds β·k1: without it, or with β·k3 instead, it would not match
        assert call.metrics["loss"] == pytest.approx(hand["loss"], abs=TOL), i
        if i > 0:
            without_kl = hand["loss"] - KL_COEF * hand["k1"]
            assert abs(call.metrics["loss"] - without_kl) > 20 * TOL, i
            assert abs(call.metrics["loss"] - (without_kl + KL_COEF * hand["k3"])) > 20 * TOL, i
        kls.append((call.metrics["kl"], hand["k1"], hand["k3"]))
    print("\nrloo k1 per minibatch (metric, hand k1, hand k3):", kls)
    assert abs(kls[0][0]) < 1e-6
    assert all(abs(k1) > 1e-3 and abs(k1 - k3) > 1e-3 for _, k1, k3 in kls[1:])


# --- truncated importance sampling --------------------------------------------------------------------
def test_tis_caps_the_sampler_learner_ratio(ppo_run):
    """Step 2 was sampled by the stale (cold-start) engine: the recorded sampler logprobs are the
    cold start's, the learner's differ, and on the first (only) minibatch ratio = 1, so the
    loss is token-mean(−A·min(exp(old − sampler), cap)) + β·k3 − c·H, with the cap binding."""
    call, metrics = ppo_run.calls[1], ppo_run.metrics[1]
    t, mask = call.tensors, call.tensors["response_mask"]
    alg, temp = ppo_run.cfg.algorithm, ppo_run.cfg.rollout.temperature
    hand = by_hand(t, call.policy, ppo_run.reference, alg, temp)
    ref, _ = hf_logprobs(ppo_run.reference, t, temp)
    assert masked_close(t["sampler_logprobs"], ref, mask, 1e-3)  # vLLM still held the cold start
    assert masked_close(hand["ratio"], torch.ones_like(hand["ratio"]), mask, 1e-4)
    print(f"\nppo step 2: capped share={hand['capped_share']:.3f} loss={metrics['train/loss']:.6f} "
          f"by hand={hand['loss']:.6f} pg capped={hand['pg_tis']:.6f} uncapped={hand['pg']:.6f}")
    assert 0.05 < hand["capped_share"] < 0.95
    assert metrics["train/loss"] == pytest.approx(hand["loss"], abs=TOL)
    uncapped = hand["loss"] - hand["pg_tis"] + hand["pg"]
    assert abs(metrics["train/loss"] - uncapped) > 20 * TOL
    # step 1: learner and sampler were the same weights, the ratio ≈ 1 and TIS changes ~nothing
    first = ppo_run.batches[0]
    gap = ((first.old_logprobs - first.sampler_logprobs).abs() * first.response_mask).max()
    assert gap < 1e-3


# --- entropy bonus ------------------------------------------------------------------------------------------
def test_entropy_bonus_through_the_loop(ppo_run):
    """The scoring entropy and the `entropy` metric are the token-mean entropy of the policy
    (recomputed with transformers), and the loss carries −entropy_coef × that mean."""
    alg, temp = ppo_run.cfg.algorithm, ppo_run.cfg.rollout.temperature
    for call, metrics, batch in zip(ppo_run.calls, ppo_run.metrics, ppo_run.batches):
        t = call.tensors
        hand = by_hand(t, call.policy, ppo_run.reference, alg, temp)
        full = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        _, ent = hf_logprobs(call.policy, full, temp)  # the policy that scored this batch
        assert masked_close(batch.entropy, ent, batch.response_mask, 1e-4)
        assert metrics["train/entropy"] == pytest.approx(hand["entropy"], rel=1e-4)
        assert metrics["train/loss"] == pytest.approx(hand["loss"], abs=TOL)
        without = hand["loss"] + ENTROPY_COEF * hand["entropy"]
        print(f"\nentropy={hand['entropy']:.4f} loss={metrics['train/loss']:.6f} "
              f"without the bonus={without:.6f}")
        assert abs(metrics["train/loss"] - without) > 20 * TOL


# --- epochs > 1 --------------------------------------------------------------------------------------------
def test_two_epochs_take_four_optimizer_steps_over_every_row_twice(rloo_run):
    alg = rloo_run.cfg.algorithm
    rows = alg.prompts_per_step * alg.n_samples
    expected = alg.epochs * rows // alg.minibatch_size
    assert expected == 4 and len(rloo_run.calls) == expected
    before, after = rloo_run.optimizer_steps
    assert after - before == expected  # DeepSpeed's own count
    (batch,) = rloo_run.batches

    def row(ids, attn):
        return tuple(ids[attn.bool()].tolist())

    all_rows = Counter(row(i, a) for i, a in zip(batch.input_ids, batch.attention_mask))
    for epoch in range(alg.epochs):
        seen = Counter(row(i, a) for c in rloo_run.calls[2 * epoch: 2 * epoch + 2]
                       for i, a in zip(c.tensors["input_ids"], c.tensors["attention_mask"]))
        assert seen == all_rows, epoch


def test_second_epoch_sees_the_moved_policy(rloo_run):
    """Each minibatch's loss, ratio_mean, clip_frac and approx_kl_old equal the recomputation
    from the policy as it stood before that optimizer step; the first has ratio 1, the second
    epoch does not."""
    alg, temp = rloo_run.cfg.algorithm, rloo_run.cfg.rollout.temperature
    assert len(rloo_run.calls) == 4
    seen = []
    for i, call in enumerate(rloo_run.calls):
        hand = by_hand(call.tensors, call.policy, rloo_run.reference, alg, temp)
        m = call.metrics
        assert m["skipped"] == 0
        assert m["loss"] == pytest.approx(hand["loss"], abs=TOL), i
        assert m["ratio_mean"] == pytest.approx(hand["ratio_mean"], abs=1e-5), i
        assert m["clip_frac"] == pytest.approx(hand["clip_frac"], abs=1e-6), i
        mask = call.tensors["response_mask"]
        lr = (hand["lp"] - call.tensors["old_logprobs"]).clamp(-20, 20)
        akl = float((0.5 * lr**2 * mask).sum() / mask.sum())
        assert m["approx_kl_old"] == pytest.approx(akl, rel=1e-3, abs=1e-7), i
        dev = float(((hand["ratio"] - 1).abs() * mask).max())
        seen.append((m["loss"], hand["loss"], m["ratio_mean"], m["clip_frac"], dev))
    print("\nper minibatch (loss, by hand, ratio_mean, clip_frac, max|ratio-1|):", seen)
    assert seen[0][4] < 1e-4  # before any step of this RL step, policy = scoring policy
    assert all(s[4] > 1e-2 for s in seen[2:])  # epoch 2: the ratio is not 1
    step = rloo_run.metrics[0]
    assert step["train/loss"] == pytest.approx(sum(s[0] for s in seen) / len(seen), rel=1e-6)


# --- RLOO inside the loop --------------------------------------------------------------------------------
def test_rloo_advantages_are_leave_one_out_baselines(rloo_run):
    (batch,) = rloo_run.batches
    rewards, groups = batch.rewards.tolist(), batch.group_ids.tolist()
    expected = []
    for i, (r, g) in enumerate(zip(rewards, groups)):
        others = [rewards[j] for j in range(len(rewards)) if groups[j] == g and j != i]
        expected.append(r - sum(others) / len(others))
    expected = torch.tensor(expected)
    print("\nrloo rewards:", rewards, "\nadvantages:", batch.seq_advantages.tolist())
    assert torch.allclose(batch.seq_advantages, expected, atol=1e-6)
    assert expected.abs().max() > 0.01
    grpo_like = [(r - sum(rewards[j] for j in range(len(rewards)) if groups[j] == g) / 4)
                 for r, g in zip(rewards, groups)]
    assert not torch.allclose(expected, torch.tensor(grpo_like), atol=1e-4)  # RLOO ≠ mean baseline
    # credit=none: γ = 1, token advantages = A on response tokens, 0 elsewhere
    mask = batch.response_mask
    assert torch.allclose(batch.advantages, expected[:, None] * mask.float(), atol=1e-6)
    # and those are what each minibatch handed to the learner, row by row
    by_row = {tuple(i[a.bool()].tolist()): adv[a.bool()]
              for i, a, adv in zip(batch.input_ids, batch.attention_mask, batch.advantages)}
    for call in rloo_run.calls:
        t = call.tensors
        for i, a, adv in zip(t["input_ids"], t["attention_mask"], t["advantages"]):
            assert torch.equal(by_row[tuple(i[a.bool()].tolist())], adv[a.bool()])
