"""The whole loop on the real stack (Ray, vLLM, DeepSpeed, W&B offline), a few steps at a time.

The task is a 4-row JSONL dataset of additions (so step 2 → 3 crosses an epoch boundary) and the
reward includes a length bonus, so every step has non-zero advantages: equal losses across runs
mean something. Cold starts are cached across these tests.
"""
import json
import logging
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from rl.config import register_configs
from tests.e2e.wandb_records import history, run_tags
from tests.e2e.arith_rows import TEST_ROWS
from rl.loop.stop_signal import StopOnSignal
from rl.loop.trainer import Trainer

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()
# Each test starts engines and learners (the first also a cold start): minutes alone, but up
# to 22 min measured on a 2-core machine shared with other runs (near pyproject's 1800 s).
pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="session", autouse=True)
def hang_marker(tmp_path_factory):
    import os

    os.environ["BAD_REWARD_MARKER"] = str(tmp_path_factory.mktemp("marker") / "hung")


def make_cfg(out: Path, cache: str, dataset, extra=()):
    train, test = dataset
    overrides = [
        f"output_dir={out}", f"cache_dir={cache}", "steps=3", "eval_every=2", "save_every=10",
        "task=gsm8k", f"task.params.path={train}", f"task.params.test_path={test}",
        "+task.params.verifier=arith", "task.eval_size=2",
        "cold_start.steps=12", "cold_start.batch_size=8", "cold_start.warmup_steps=2",
        "algorithm.prompts_per_step=2", "algorithm.n_samples=4", "algorithm.minibatch_size=4",
        "algorithm.lr=1e-3", "rollout.max_new_tokens=24",
        "reward.timeout_s=2",
        "logger.progress=false", *extra,
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):  # values Hydra's override grammar cannot spell (newline, "a.b:c" keys)
        cfg.task.params.instruction = "Add.\n"
        bad = "tests.rewards.bad_rewards:"
        cfg.reward.components = {"format": 0.0, bad + "length_bonus": 1.0, bad + "boom": 0.0,
                                 bad + "hang_once": 0.0}
    return cfg


def run(cfg, inspect=None):
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
        seen = inspect(trainer) if inspect else None
    finally:
        trainer.close()
    return summary, seen


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def record_vars_shaping(monkeypatch) -> list:
    """Patch AVAR's VARS hook to record, per step, (rewards before, after, correct, the layers
    of its masses, token classes). A short cold start rarely solves a problem; so that the
    correctness gate is exercised both ways, every other response counts as correct here (the
    verifier is not under test)."""
    from rl.methods.avar.visual_attention import Avar

    shaped, shape = [], Avar.shape_rewards

    def recording_shape(self, batch, step):
        batch.correct = torch.maximum(batch.correct, (torch.arange(len(batch)) % 2 == 0).float())
        before = batch.rewards.clone()
        m = shape(self, batch, step)
        shaped.append((before, batch.rewards.clone(), batch.correct.bool(),
                       sorted(self.masses(batch.attn_stats)), batch.token_classes.clone()))
        return m

    monkeypatch.setattr(Avar, "shape_rewards", recording_shape)
    return shaped


GREEDY_EVALS: dict[Path, list] = {}  # run folder → token ids of each greedy (eval) generation


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory, dataset, cache_dir):
    out = tmp_path_factory.mktemp("run_a")
    calls = GREEDY_EVALS.setdefault(out, [])
    generate = Trainer.generate

    def recording_generate(self, prompts, n, temperature, seeds=None):
        comps = generate(self, prompts, n, temperature, seeds)
        if temperature == 0:  # rollouts sample at temperature 1; greedy calls are evaluations
            calls.append([[list(c.token_ids) for c in cs] for cs in comps])
        return comps

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "generate", recording_generate)
        summary, _ = run(make_cfg(out, cache_dir, dataset, ["logger=wandb"]))
    return out, summary


def hf_greedy_eval(hf_dir: Path, dataset) -> tuple[float, float, list[list[int]], list[str]]:
    """The held-out greedy evaluation redone without vLLM: plain `transformers` generate on the
    exported checkpoint, scored by the task's verifier. Returns (accuracy, the smallest gap
    between the top two logits along the greedy paths, the response token ids, the texts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewards.verifiers import resolve
    from rl.tasks.data import encode_prompt
    from rl.tasks.prompt_format import PromptFormat
    from rl.tasks import get_task

    cfg = make_cfg(hf_dir.parent / "unused", "unused", dataset)
    task = get_task(cfg.task.name, seed=cfg.task.seed, **cfg.task.params)
    samples = task.dataset("test", cfg.task.eval_size)
    assert [(s.prompt, s.answer) for s in samples] == [(f"Add.\n{a}+{b}\n", str(a + b)) for a, b in TEST_ROWS]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hits, gaps, responses, texts = [], [], [], []
    for s in samples:
        ids = encode_prompt(tok, s, PromptFormat(cfg.model.prompt_prefix, cfg.model.response_prefix)).ids
        assert tok.decode(ids) == s.prompt  # one token per character, nothing added
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=cfg.rollout.max_new_tokens,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 output_logits=True, return_dict_in_generate=True)
        gaps += [float(lg[0].topk(2).values.diff().abs()) for lg in gen.logits]
        responses.append(gen.sequences[0, len(ids):].tolist())
        text = tok.decode(responses[-1], skip_special_tokens=True)
        texts.append(text)
        hits.append(resolve(s.task)(text, s.answer, s.meta))
    return sum(hits) / len(hits), min(gaps), responses, texts


def test_run_completes_with_metrics_eval_and_bad_rewards(uninterrupted, dataset):
    out, summary = uninterrupted
    m = metrics(out)
    assert sorted(m) == [0, 1, 2, 3]
    assert "eval/accuracy" in m[0] and "eval/accuracy" in m[2] and "eval/accuracy" in m[3]
    for step in (1, 2, 3):
        row = m[step]
        assert row["train/skipped"] == 0
        assert row["train/grad_norm"] > 0 and row["train/loss"] != 0  # a real update happened
        assert row["reward/errors"] == 8  # `boom` raised on each of the 8 responses, scored 0
        assert row["rollout/logprob_gap"] < 1e-3  # vLLM and the learner agree (float32)
        assert row["time/step_s"] > 0 and row["perf/tokens_per_s"] > 0
    assert sum(m[s]["reward/timeouts"] for s in (1, 2, 3)) == 1  # the hang was cut, once
    assert summary["steps"] == 3
    assert (out / "checkpoints" / "step_000003" / "hf" / "model.safetensors").exists()
    # The final greedy held-out evaluation (vLLM, after step 3's weight sync) against the same
    # evaluation redone with plain transformers on step 3's exported checkpoint: the same
    # responses token for token, and the same accuracy in summary.json and metrics.jsonl.
    final = json.loads((out / "summary.json").read_text())["final_accuracy"]
    hf_acc, gap, hf_ids, texts = hf_greedy_eval(out / "checkpoints" / "step_000003" / "hf", dataset)
    # float32 on both sides: vLLM and transformers differ by ~1e-5 in a logit, so greedy paths
    # whose top-two logits are never closer than 1e-3 are the same path; closer would be a tie
    # that either side may break its own way (then this comparison would need another seed).
    assert gap > 1e-3, f"greedy decoding passes a near tie ({gap:.2g}): HF vs vLLM is ambiguous"
    evals = GREEDY_EVALS[out]
    assert len(evals) == 3  # cold start, step 2, step 3 (eval_every=2, and the last step)
    vllm_ids = [cs[0] for cs in evals[-1]]
    assert vllm_ids == hf_ids, texts
    assert final == hf_acc == m[3]["eval/accuracy"] == summary["final_accuracy"], (final, hf_acc, texts)


def test_wandb_offline_run_holds_the_per_step_metrics(uninterrupted):
    out, _ = uninterrupted
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_file = next(runs[0].glob("run-*.wandb"))
    assert run_tags(run_file) == ["model:tiny", "task:gsm8k", "credit:none"]
    rows = history(run_file)
    by_step: dict[int, dict] = {}
    for r in rows:
        by_step.setdefault(r["_step"], {}).update(r)
    assert sorted(by_step) == [0, 1, 2, 3]
    assert by_step[0]["eval/accuracy"] == metrics(out)[0]["eval/accuracy"]
    for step in (1, 2, 3):
        row = by_step[step]
        for key in ("reward/total", "reward/arith", "reward/format", "rollout/accuracy",
                    "rollout/response_len", "rollout/entropy", "rollout/logprob_gap",
                    "train/approx_kl_old", "train/clip_frac", "train/grad_norm", "train/loss",
                    "perf/tokens_per_s", "time/rollout_s", "time/reward_s", "time/score_s",
                    "time/credit_s", "time/update_s", "time/sync_s", "reward/errors",
                    "reward/timeouts"):
            assert key in row, (step, key)
        assert row["train/loss"] == pytest.approx(metrics(out)[step]["train/loss"])
        assert row["samples/_type"] == "table-file"  # the sample table


def test_sigterm_checkpoints_and_resume_is_exact_across_an_epoch_boundary(
        uninterrupted, tmp_path_factory, dataset, cache_dir, monkeypatch):
    """SIGTERM during step 2 (a real signal to this process): step 2 finishes, a checkpoint is
    written, the run stops; resume=true replays step 3 (the first of epoch 2) exactly."""
    full, _ = uninterrupted
    out = tmp_path_factory.mktemp("run_b")
    rollout = Trainer.rollout

    def rollout_then_sigterm(self, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return rollout(self, step)

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "rollout", rollout_then_sigterm)
        summary, digest_at_stop = run(make_cfg(out, cache_dir, dataset),
                                      inspect=lambda t: t.learner.optimizer_state_digest())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2
    assert sorted(metrics(out)) == [0, 1, 2]
    assert (out / "checkpoints" / "step_000002").exists()  # save_every=10: written for the stop
    handler = signal.getsignal(signal.SIGTERM)  # the trainer's handler was removed again
    assert not isinstance(getattr(handler, "__self__", None), StopOnSignal)

    resumed = make_cfg(out, cache_dir, dataset, ["resume=true"])
    trainer = Trainer(resumed)
    try:
        assert trainer.step == 2
        assert trainer.learner.optimizer_state_digest() == pytest.approx(digest_at_stop, rel=1e-9)
        assert digest_at_stop > 0
        trainer.run()
    finally:
        trainer.close()
    a, b = metrics(full), metrics(out)
    assert sorted(b) == [0, 1, 2, 3]  # step 3 (the first of epoch 2) trained
    for key in ("train/loss", "reward/total", "train/grad_norm", "rollout/response_len"):
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-5, abs=1e-7), key
    assert b[3]["train/grad_norm"] > 0


def stop_then_kill(pid: int, after_s: float = 1.0) -> None:
    """Freeze the process now and SIGKILL it a moment later, so the call the trainer sends
    next is in flight when the process dies: a real death, at a known point of the step."""
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(after_s, os.kill, (pid, signal.SIGKILL)).start()


def test_run_survives_a_killed_engine_and_a_killed_learner_rank(
        uninterrupted, tmp_path_factory, dataset, cache_dir, monkeypatch, caplog):
    """The engine's process is killed as step 2's rollout is sent, the learner rank's as step
    3's update is: the engine is restarted by Ray, reloaded and its prompts re-issued (step 2
    complete, every prompt with its n samples); the learner group is restarted from step 2's
    checkpoint by itself and step 3 re-run. Every step equals the uninterrupted run's."""
    full, _ = uninterrupted
    out = tmp_path_factory.mktemp("run_faults")
    rollout, update = Trainer.rollout, Trainer.update
    batches = {}

    def rollout_with_engine_kill(self, step):
        if step == 1 and self.engines.restarts == 0:
            stop_then_kill(self.engines.ready()[0]["pid"])
        batches[step + 1], staleness = rollout(self, step)
        return batches[step + 1], staleness

    def update_with_rank_kill(self, batch, step, extra_rows):
        if step == 2 and self.failures == 0:
            stop_then_kill(self.learner.where()[0]["pid"])
        return update(self, batch, step, extra_rows)

    caplog.set_level(logging.WARNING)
    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "rollout", rollout_with_engine_kill)
        mp.setattr(Trainer, "update", update_with_rank_kill)
        summary, _ = run(make_cfg(out, cache_dir, dataset, ["save_every=2"]))
    assert summary["steps"] == 3
    assert summary["engine_restarts"] == 1 and summary["learner_restarts"] == 1
    groups = batches[2].group_ids.tolist()
    assert len(groups) == 2 * 4 and all(groups.count(g) == 4 for g in set(groups))
    logged = caplog.text
    assert "rollout engine 0 failed" in logged and "its 2 prompts re-issued" in logged
    assert "learner failure 1 of at most 2 at step 3" in logged and "step_000002" in logged
    a, b = metrics(full), metrics(out)
    assert sorted(b) == [0, 1, 2, 3]
    assert b[2]["fault/engine_restarts"] == 1 and b[3]["fault/learner_restarts"] == 1
    for step in (1, 2, 3):
        for key in ("train/loss", "reward/total", "train/grad_norm", "rollout/response_len"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
        assert b[step]["rollout/logprob_gap"] < 1e-3  # the restarted engine got the weights


def local_heads_by_definition(attn_stats: dict, resp: torch.Tensor, quantile: float) -> set[int]:
    """papers.md §1.4 written out: pool every query head of the captured layers (layer-major),
    a head's look-back distance averaged over all response tokens of the batch, the bottom
    round(quantile · pool) heads are local (the lower index first on equal distances)."""
    pool = [(layer, h) for layer in sorted(attn_stats) for h in range(attn_stats[layer]["distance"].shape[1])]
    w = resp.double()
    d = [float((attn_stats[layer]["distance"][:, h].double() * w).sum() / w.sum()) for layer, h in pool]
    n = max(1, int(quantile * len(pool) + 0.5))
    return set(sorted(range(len(pool)), key=lambda i: (d[i], i))[:n])


def safetensors_bytes(model_dir, auto=None) -> float:
    """The size of the weight payload the safetensors transport sends, from the model's own
    parameters (each once, at their dtype): what `sync/bytes` must be."""
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    model = (auto or AutoModelForCausalLM).from_pretrained(model_dir, dtype=torch.float32)
    return float(len(save({n: p.detach().contiguous() for n, p in model.named_parameters()})))


def vas_by_definition(model_dir, batch) -> dict[str, float]:
    """AVAR's VAS (§3.1) of a batch, from float64 eager attention maps: per row, the mean over
    layers, heads and response tokens of (attention to the evidence) / (attention to the system
    prompt); then the mean over rows (`vas`). With the same cells pooled: Σ evidence / Σ system
    (`vas_pooled`) and Σ evidence / (Σ evidence + Σ system) (`evidence_share`), per row, then
    the mean over rows."""
    from transformers import AutoModelForCausalLM

    from rl.batch import TOKEN_CLASS

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                                 attn_implementation="eager").eval()
    per_row, pooled, share = [], [], []
    for i in range(len(batch)):
        real = batch.attention_mask[i].bool()
        ids, classes, resp = (x[i][real] for x in (batch.input_ids, batch.token_classes,
                                                    batch.response_mask))
        with torch.no_grad():
            maps = model(input_ids=ids[None], output_attentions=True).attentions
        evidence, system = classes == TOKEN_CLASS["evidence"], classes == TOKEN_CLASS["system"]
        ratios = [float(A[0, h, q, evidence].sum() / A[0, h, q, system].sum())
                  for A in maps for h in range(A.shape[1]) for q in resp.nonzero()[:, 0].tolist()]
        if ratios:
            per_row.append(sum(ratios) / len(ratios))
            q = resp.nonzero()[:, 0]
            e = sum(float(A[0][:, q][..., evidence].sum()) for A in maps)
            s = sum(float(A[0][:, q][..., system].sum()) for A in maps)
            pooled.append(e / s)
            share.append(e / (e + s))
    return {k: sum(v) / len(v) for k, v in (("vas", per_row), ("vas_pooled", pooled),
                                             ("evidence_share", share))}


def test_coupled_credit_runs_through_the_loop(ray_session, tmp_path_factory, dataset, cache_dir,
                                              monkeypatch):
    """credit=coupled: the learner switches to the kernels, the scoring forward returns the
    statistics (merged over 2 ranks), γ > 1 lands on some response tokens, and the per-step
    credit metrics, the time share and the W&B credit table are written. AVAR's VARS rides on
    the same scoring forward (its class masses on all 4 layers, credit's statistics on its 2)
    and VAS is measured at every evaluation."""
    from rl.methods.credit.preplan_anchor import PreplanAnchorCredit

    from rl.methods.avar.visual_attention import Avar

    seen = {}  # step → (local heads chosen by the method, local heads by the definition)
    shares = {}  # step → the token-set shares of the response tokens, from the trace
    weights = PreplanAnchorCredit.weights

    def recording_weights(self, batch, stats, step):
        metrics = weights(self, batch, stats, step)
        assert sorted(stats) == [1, 2]  # credit's layers only, not AVAR's
        assert sorted(batch.attn_stats) == [0, 1, 2, 3]  # the scoring forward's: every reader's
        seen[step + 1] = (set(self.trace.local_heads),
                          local_heads_by_definition(stats, batch.response_mask, self.p.head_quantile))
        resp, sets = batch.response_mask.bool(), self.trace.sets
        shares[step + 1] = {f"credit/{name}_share": float(getattr(sets, name)[resp].sum() / resp.sum())
                            for name in ("anchor", "preplan", "dominated", "intro")}
        return metrics

    evaluated = []  # the greedy held-out batches AVAR measured VAS on
    evaluate = Avar.evaluate

    def recording_evaluate(self, batch, tools):
        evaluated.append(batch)
        return evaluate(self, batch, tools)

    shaped = record_vars_shaping(monkeypatch)
    monkeypatch.setattr(PreplanAnchorCredit, "weights", recording_weights)
    monkeypatch.setattr(Avar, "evaluate", recording_evaluate)
    out = tmp_path_factory.mktemp("run_coupled")
    cfg = make_cfg(out, cache_dir, dataset, ["steps=2", "credit=coupled", "logger=wandb",
                                             "learner.num_ranks=2",
                                             "credit.params.fai_band=[2,100]",
                                             "avar=vars"])

    def inspect(t):
        tr = next(m for m in t.methods if m.name == "credit").trace
        return tr.gamma.clone(), tr.sets.anchor.clone(), t.policy_init

    summary, (gamma, anchor, policy_init) = run(cfg, inspect)
    assert anchor.any() and (gamma > 1).any() and (gamma >= 1).all()
    m = metrics(out)
    for step in (1, 2):
        row = m[step]
        for key, want in shares[step].items():  # the logged shares are the trace's
            assert row[key] == pytest.approx(want, rel=1e-6), (step, key)
        assert shares[step]["credit/anchor_share"] > 0 and shares[step]["credit/preplan_share"] > 0
        assert row["credit/gamma_max"] > 1 and row["credit/gamma_mean"] >= 1
        # credit's share of the step: its statistics pass and its own hook
        assert row["time/credit_share"] == pytest.approx(
            (row["time/stats_s"] + row["time/credit_s"]) / row["time/step_s"], rel=1e-9)
        assert row["train/grad_norm"] > 0
        assert row["sync/bytes"] == safetensors_bytes(policy_init)
    # Local heads: the tiny model's captured layers (middle:5 of 4 → [1, 2]) × 2 query heads = a
    # pool of 4, round(0.3 · 4) = 1 local head per step. The method chose what the definition
    # gives, and the logged overlap is |L1 ∩ L2| / |L1 ∪ L2| of those choices.
    assert sorted(seen) == [1, 2]
    for step, (chosen, by_definition) in seen.items():
        assert chosen == by_definition and len(chosen) == 1, step
    (l1, _), (l2, _) = seen[1], seen[2]
    assert math.isnan(m[1]["credit/local_heads_jaccard"])  # no previous batch at step 1
    assert m[2]["credit/local_heads_jaccard"] == len(l1 & l2) / len(l1 | l2)
    assert 0 < summary["credit_share_of_step"] < 1
    rows = history(next(next((out / "wandb").glob("offline-run-*")).glob("run-*.wandb")))
    assert any(r.get("credit_samples/_type") == "table-file" for r in rows)
    # VARS: 0.3 · r_visual added to correct responses only (r_visual > 0: attention masses
    # are positive), before advantages; VAS of the held-out responses at steps 0 and 2
    assert len(shaped) == 2
    for before, after, correct, layers, _ in shaped:
        assert layers == [0, 1, 2, 3]
        bonus = after - before
        assert (bonus[~correct] == 0).all() and (bonus[correct] > 0).all()
    for step in (0, 2):
        assert m[step]["eval/vas_response"] > 0 and m[step]["eval/vas_query"] > 0
        per_layer = [m[step][f"eval/vas_response_L{i}"] for i in range(4)]
        assert m[step]["eval/vas_response"] == pytest.approx(sum(per_layer) / 4, rel=1e-5)
    # VAS before RL, by its definition on float64 eager maps of the policy RL started from
    assert len(evaluated) == 2  # steps 0 and 2
    by_definition = vas_by_definition(policy_init, evaluated[0])
    for key in ("vas", "vas_pooled", "evidence_share"):
        assert m[0][f"eval/{key}_response"] == pytest.approx(by_definition[key], rel=1e-4), key
        assert summary[f"cold_start_{key}"] == m[0][f"eval/{key}_response"]
    assert summary["cold_start_vas"] == m[0]["eval/vas_response"]
    assert summary["final_vas"] == m[2]["eval/vas_response"]
    assert m[1]["time/vars_share"] == pytest.approx(
        (m[1]["time/stats_s"] + m[1]["time/vars_s"]) / m[1]["time/step_s"], rel=1e-9)
    for step, (before, after, correct, _, _) in zip((1, 2), shaped):  # the logged raw range
        raw = ((after - before) / 0.3)[correct]                       # is the bonus's / λ_v
        for name in ("min", "mean", "max"):
            assert m[step][f"vars/r_visual_{name}"] == pytest.approx(float(getattr(raw, name)()),
                                                                    rel=1e-5), (step, name)
    for chart in ("vas", "evidence_share"):
        plots = [r for r in rows if r.get(f"eval/{chart}_by_layer_table/_type") == "table-file"]
        # 4 layers × 2 lines, steps 0, 2
        assert [r[f"eval/{chart}_by_layer_table/nrows"] for r in plots] == [8, 8], chart


class Recording:
    """Passes every call through to the real learner or rollout group, recording the names of
    `watched` methods in the order the trainer makes them."""

    def __init__(self, target, name: str, watched: set, calls: list):
        self.__dict__.update(_target=target, _name=name, _watched=watched, _calls=calls)

    def __getattr__(self, attr):
        value = getattr(self._target, attr)
        if attr not in self._watched:
            return value

        def call(*args, **kwargs):
            self._calls.append(f"{self._name}.{attr}")
            return value(*args, **kwargs)
        return call


def test_the_learner_hands_the_gpu_over_in_order(ray_session, tmp_path_factory, dataset,
                                                 cache_dir):
    """The colocated mode's order, through the real trainer (rl/cluster/gpu_sharing.py): after the
    update the learner's optimizer state leaves (learner.offload_between_updates, DeepSpeed's
    offload_states; CPU → CPU here) *before* the weight sync, which on a GPU wakes the engines
    (the sync used to come first); a checkpoint brings the state back with the engines asleep
    and offloads it again after."""
    out = tmp_path_factory.mktemp("run_offload")
    cfg = make_cfg(out, cache_dir, dataset, ["steps=1", "save_every=1", "task.eval_size=1",
                                             "rollout.eval_samples=0",
                                             "learner.offload_between_updates=true"])
    calls: list[str] = []
    trainer = Trainer(cfg)
    try:
        trainer.learner = Recording(trainer.learner, "learner",
                                    {"score", "train_minibatch", "offload", "save"}, calls)
        trainer.engines = Recording(trainer.engines, "engines", {"sleep", "sync_from"}, calls)
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["steps"] == 1
    order = [c for i, c in enumerate(calls) if i == 0 or c != calls[i - 1]]  # repeats once
    assert order == ["engines.sleep", "learner.score", "learner.train_minibatch",
                     "learner.offload", "engines.sync_from",                  # the step
                     "engines.sleep", "learner.save", "learner.offload"]      # its checkpoint
    assert metrics(out)[1]["colocate/offload_s"] > 0
