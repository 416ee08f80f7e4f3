"""LeaF through the real stack: the tiny teacher trained and cached by the cold-start code, its
own Ray actor, 2 DeepSpeed learner ranks (the student's sensitivities and the KD steps),
vLLM engines for the validation filter, then RL starting from the distilled checkpoint.

The task is one-digit addition with a distractor number in every prompt ("Add.\\nx=4 3+5\\n"),
the student cold-started on clean prompts, the teacher on prompts with distractors: small
enough to train in seconds, and the student does get distracted.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rl.config import register_configs
from tests.e2e.wandb_records import history

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()
pytestmark = pytest.mark.timeout(3600)


def leaf_cfg(tmp: Path, cache: str, extra=()):
    overrides = [
        f"output_dir={tmp / 'out'}", f"cache_dir={cache}", "logger=none", "logger.progress=false",
        "task=arith", "task.params.digits=1", "task.params.distractor_prob=1.0", "task.eval_size=16",
        "+cold_start.task_params.distractor_prob=0.0", "cold_start.steps=60",
        "cold_start.batch_size=32", "cold_start.warmup_steps=5",
        "teacher=tiny", "teacher.train.steps=60", "teacher.train.batch_size=32",
        "teacher.train.warmup_steps=5", "teacher.topk=8",
        "distill=leaf", "distill.steps=2", "distill.batch_size=8", "distill.detect_samples=24",
        "distill.warmup_steps=1", "learner.num_ranks=2",
        "algorithm.prompts_per_step=2", "algorithm.n_samples=4", "algorithm.minibatch_size=8",
        "rollout.max_new_tokens=16", "steps=1", "eval_every=1", "rollout.eval_samples=0",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def hf_logprobs(path: str, tensors) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from rl.engine.frozen import next_token_logprobs

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = m(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"].long()).logits
    return next_token_logprobs(logits.double())


def hf_greedy_correct(path: str, example: dict, sample) -> bool:
    from transformers import AutoModelForCausalLM

    from rewards import resolve

    from rl.loop.cold_start import load_tokenizer

    tok = load_tokenizer(path)
    m = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        out = m.generate(input_ids=ids, max_new_tokens=16, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return resolve(sample.task)(text, sample.answer, sample.meta) == 1.0


@pytest.fixture(scope="module")
def models(tmp_path_factory, ray_session):
    """(cache, student cold start, tiny teacher): trained once for the module."""
    from rl.loop.cold_start import run_cold_start
    from rl.methods.leaf.teacher import teacher_path

    tmp = tmp_path_factory.mktemp("leaf")
    cache = str(tmp / "cache")
    cfg = leaf_cfg(tmp, cache)
    student = run_cold_start(cfg, Path(cache), progress=False)
    teacher = teacher_path(cfg, Path(cache), progress=False)
    return cache, student, teacher


def test_kd_through_a_teacher_actor_and_two_learner_ranks_equals_a_float64_reference(
        tmp_path, models):
    """The first KD step's KL — teacher top-8 + tail from its own actor, student forward on 2
    DeepSpeed ranks — equals the same coarsened KL computed here in float64 from the two HF
    checkpoints on the same rows; and the distilled weights moved."""
    from rl.algorithms.losses import forward_kl_topk
    from rl.loop.cold_start import load_tokenizer
    from rl.engine.frozen import topk_logprobs
    from rl.methods.leaf.examples import batch_tensors
    from rl.methods.leaf.warm_start import batch_rows, run_distill
    from rl.tasks import get_task

    cache, student, teacher = models
    assert Path(teacher).name.startswith("teacher-") and teacher != student
    assert json.loads((Path(teacher) / "tiny_model_spec.json").read_text())["hidden_size"] == 192
    cfg = leaf_cfg(tmp_path, cache, ["distill=kd"])
    distilled = run_distill(cfg, Path(cache), student, progress=False)
    report = json.loads((Path(distilled) / "leaf_report.json").read_text())
    assert report["mode"] == "kd" and "student_wrong" not in report  # no detection in kd

    tok = load_tokenizer(student)
    task = get_task("arith", seed=cfg.task.seed, **cfg.task.params)
    t = batch_tensors(batch_rows(task, tok, cfg, 0, []), tok.pad_token_id)
    t_logp, s_logp = hf_logprobs(teacher, t), hf_logprobs(student, t)
    ids, top = topk_logprobs(t_logp, 8)
    kl = forward_kl_topk(s_logp, ids, top)
    assert report["kd_kl_first"] == pytest.approx(float(kl[t["response_mask"]].mean()), rel=1e-4)
    d_logp = hf_logprobs(distilled, t)
    assert (d_logp - s_logp).abs().max() > 1e-4


def test_leaf_warm_start_validation_filter_then_rl_from_its_checkpoint(tmp_path, models):
    from rl.methods.leaf.warm_start import run_distill
    from rl.tasks import get_task
    from rl.loop.trainer import Trainer

    cache, student, teacher = models
    cfg = leaf_cfg(tmp_path, cache)
    distilled = run_distill(cfg, Path(cache), student, progress=False)
    report = json.loads((Path(distilled) / "leaf_report.json").read_text())
    n = report["detect_samples"]
    assert n == 24 and report["student_wrong"] == round(n * (1 - report["student_accuracy"]))
    assert 0 < report["student_wrong"] < n, "the student must be partly distracted for this test"
    assert report["instruction_examples"] == report["student_wrong"]
    assert report["counterfactuals_kept"] == report["instruction_kept"]
    assert report["instruction_kept"] + len(report["instruction_dropped_examples"]) == \
        report["instruction_counterfactuals"]
    # The validation filter, re-checked with plain HF greedy decoding: a kept counterfactual is
    # answered correctly by both models, a dropped one by at most one of them.
    task = get_task("arith", seed=cfg.task.seed, **cfg.task.params)
    by_uid = {task.sample("train", cfg.distill.detect_offset + i).uid:
              task.sample("train", cfg.distill.detect_offset + i) for i in range(n)}
    for ex in report["instruction_kept_examples"]:
        s = by_uid[ex["uid"]]
        assert hf_greedy_correct(student, ex, s) and hf_greedy_correct(teacher, ex, s), ex
    for ex in report["instruction_dropped_examples"]:
        s = by_uid[ex["uid"]]
        assert not (hf_greedy_correct(student, ex, s) and hf_greedy_correct(teacher, ex, s)), ex

    # RL starts from the distilled checkpoint: a cache hit on the same keys, not a path; the
    # detection's prompts reach W&B as the `leaf_confounders` table
    # ... with LeaF's RL terms on: (b) KD rows in the update, (c) 2 extra groups of pruned
    # prompts (2 + 2 groups × 4 samples = 16 rows, one minibatch: every KD row is trained on
    # the distilled student's weights, so its KL can be recomputed here from that checkpoint)
    from rl.methods.leaf.online import LeafInRL

    kd_rows, after_rewards = [], LeafInRL.after_rewards

    def recording(self, batch, step, tools):
        out = after_rewards(self, batch, step, tools)
        kd_rows.extend(e.rows for e in out.extra_rows)
        return out

    cfg = leaf_cfg(tmp_path, cache, ["logger=wandb", "leaf=rl", "leaf.kd_coef=0.1",
                                     "leaf.counterfactual_groups=2", "algorithm.minibatch_size=16"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LeafInRL, "after_rewards", recording)
        trainer = Trainer(cfg)
        try:
            assert trainer.policy_init == distilled
            summary = trainer.run()
        finally:
            trainer.close()
    assert summary["steps"] == 1
    out = Path(cfg.output_dir)
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert m["leaf/kd_rows"] == round(2 * m["leaf/prompts_pruned"])
    assert 0 <= m["leaf/cf_accuracy"] <= 1 and m["leaf/spans_per_prompt"] >= m["leaf/prompts_pruned"]
    assert 0 < m["time/leaf_s"] < m["time/step_s"] and m["time/leaf_share"] > 0
    # (b) for real: every prompt carries a distractor, so detection prunes some (a run that
    # pruned nothing would leave the KD path untested — it fails here instead)
    assert len(kd_rows) == 1 and m["leaf/kd_rows"] == len(kd_rows[0]["input_ids"]) > 0
    kd = kd_rows[0]
    from rl.algorithms.losses import forward_kl_topk

    kl = forward_kl_topk(hf_logprobs(distilled, kd).float(), kd["teacher_ids"], kd["teacher_logprobs"])
    want = float(kl[kd["response_mask"]].mean())
    assert m["train/kd_kl"] == pytest.approx(want, rel=1e-4)
    assert {"leaf/precision", "leaf/recall", "leaf/f1"} <= set(m)  # arith labels its distractors
    rows = history(next(next((out / "wandb").glob("offline-run-*")).glob("run-*.wandb")))
    tables = [r for r in rows if r.get("leaf_confounders/_type") == "table-file"]
    # step 0: the distillation's detections; step 1: the RL step's own prompts (2)
    assert [t["leaf_confounders/nrows"] for t in tables] == [
        min(16, report["instruction_examples"]), 2]
