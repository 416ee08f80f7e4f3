"""The offline distillation stage: cold start → (KD | LeaF) → the checkpoint RL starts from.

    student answers detect_samples train problems greedily (vLLM)
      → on the wrong ones: g_T, g_S → Δ → confounder spans            (stage 1, §2.1)
      → one counterfactual prompt per span; keep those teacher and student both answer
        correctly after the prune                                     (§2.2, validation)
      → distil: forward KL(p_T ‖ p_S) on original + counterfactual rows, λ = share of
        originals per batch (DeepSpeed, teacher targets colocated or top-k from its actors)
                                                                      (stage 2, §2.3)

`distill=kd` is the same command with no detection: originals only. The product is cached
under cache_dir by a hash of everything that shapes it (like the cold start), with a
`leaf_report.json` of what detection found.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from rewards import RewardPool
from rl.loop.cold_start import atomic_dir, config_hash, load_tokenizer, lr_at, reusable
from rl.algorithms.losses import DistillLoss, TopKTargets
from rl.tasks.data import train_samples_at
from rl.methods.leaf.confounders import precision_recall_f1
from rl.methods.leaf.detect import detect, greedy_correct, log_leaf_table, prune_detected, records
from rl.methods.base import Method
from rl.tasks.prompt_format import prompt_format
from rl.methods.leaf.examples import (Example, batch_tensors, distractor_labels, instruction_example,
                              response_example)
from rl.tasks import get_task
from rl.methods.leaf.teacher import TeacherGroup, student_vocab_size, teacher_path

log = logging.getLogger(__name__)
TRAIN_KEYS = ("input_ids", "attention_mask", "response_mask")
SEED_STRIDE = 10_000_000  # data positions between two seeds' streams
# How counterfactuals enter the batches; part of a distilled checkpoint's cache key, so a
# checkpoint distilled under the earlier rule (counterfactuals cycled through (1 − λ) of every
# batch) is not reused as if it were this one.
MIXING = "each counterfactual once, spread over the steps, at most (1 - mix) of a batch"
SHOWN = 50  # counterfactuals kept / dropped by validation, written to leaf_report.json
SHOWN_DETECTIONS = 16  # examples with per-token Δ (the W&B table `leaf_confounders`)


def show(tok, ex: Example) -> dict:
    return {"uid": ex.sample.uid, "input": tok.decode(ex.input_ids), "removed": ex.removed,
            "input_ids": ex.input_ids}


def detection_keys(cfg) -> dict:
    """The `leaf` settings that shape a distilled checkpoint (not the RL-only terms)."""
    keys = {k: cfg.leaf[k] for k in ("quantile", "cap", "pruning", "validate")}
    if cfg.leaf.unit != "token":  # the default leaves the hashes of existing caches as they were
        keys["unit"] = cfg.leaf.unit
    return keys


def run_distill(cfg, cache: Path, student_path: str, progress: bool = True) -> str:
    """The HF folder RL starts from: `student_path` itself when distill=none."""
    d = cfg.distill
    if d.name == "none":
        return student_path
    teacher = teacher_path(cfg, cache, progress)
    vocab = student_vocab_size(student_path, teacher)  # a foreign tokenizer fails here, first
    t = cfg.teacher
    key = config_hash(student_path, teacher, cfg.task.name, cfg.task.params, cfg.task.seed,
                      cfg.model.prompt_prefix, cfg.model.response_prefix, cfg.rollout.max_new_tokens,
                      d, detection_keys(cfg), t.placement, t.topk, cfg.seed, MIXING)
    final = cache / f"distill_{d.name}-{key}"
    if d.reuse and reusable(final):
        log.info("distill (%s): reusing %s", d.name, final)
        return str(final)
    shutil.rmtree(final, ignore_errors=True)
    return str(atomic_dir(final, lambda tmp: _build(cfg, student_path, teacher, vocab, tmp,
                                                    progress)))


def _build(cfg, student_path: str, teacher: str, vocab: int, out: Path,
           progress: bool) -> None:
    from rl.cluster.runtime import start_learner

    d = cfg.distill
    t0 = time.perf_counter()
    tok = load_tokenizer(student_path)
    task = get_task(cfg.task.name, seed=cfg.task.seed, **cfg.task.params)
    colocated = cfg.teacher.placement == "colocated"
    learner = start_learner(cfg, student_path, lr=d.lr, minibatch_size=d.batch_size,
                            frozen_models={"teacher": teacher} if colocated else None)
    teachers = TeacherGroup(teacher, cfg.teacher, cfg.model.dtype, vocab,
                            learner=learner if colocated else None)
    pool = RewardPool(cfg.reward.num_workers, cfg.reward.timeout_s)
    report: dict = {"mode": d.name, "teacher": teacher, "student": student_path}
    try:
        pruned: list[Example] = []
        if d.name.startswith("leaf"):
            pruned = find_counterfactuals(cfg, task, tok, learner, teachers, pool, report,
                                          teacher, student_path)
        distil(cfg, task, tok, learner, teachers, pruned, report, progress)
        learner.export_hf(str(out))
    finally:
        pool.close()
        teachers.shutdown()
        learner.shutdown()
    report["wall_s"] = time.perf_counter() - t0
    (out / "leaf_report.json").write_text(json.dumps(report, indent=1))
    log.info("distill (%s): %s", d.name, {k: v for k, v in report.items()
                                          if isinstance(v, (int, float))})


def read_report(path: str) -> dict | None:
    """The distillation report next to a distilled checkpoint (None for any other folder)."""
    f = Path(path) / "leaf_report.json"
    return json.loads(f.read_text()) if f.is_file() else None


def find_counterfactuals(cfg, task, tok, learner, teacher, pool, report, teacher_dir: str,
                         student_path: str) -> list[Example]:
    """Stage 1 and the validation filter: the counterfactual examples LeaF trains on."""
    from rl.cluster.placement import kill_and_wait
    from rl.cluster.runtime import start_engine, wait_ready

    d, m, lf = cfg.distill, cfg.model, cfg.leaf
    samples = train_samples_at(task, d.detect_offset + seed_offset(cfg), d.detect_samples)
    student_engine = start_engine(cfg, student_path, cfg.seed)
    teacher_engine = start_engine(cfg, teacher_dir, cfg.seed)
    engines = wait_ready([student_engine, teacher_engine])
    max_new = cfg.rollout.max_new_tokens
    try:
        fmt = prompt_format(m, tok)
        originals = [instruction_example(tok, s, fmt) for s in samples]
        correct = greedy_correct(student_engine, originals, tok, pool, max_new)
        wrong = [ex for ex, ok in zip(originals, correct) if not ok]
        report.update(detect_samples=len(samples), student_accuracy=sum(correct) / len(samples),
                      student_wrong=len(wrong))
        levels = [("instruction", wrong)]
        if d.name == "leaf_response":
            resp = [response_example(tok, ex.sample, fmt, d.response_segments) for ex in wrong]
            levels.append(("response", [e for e in resp if e is not None]))
        kept: list[Example] = []
        for level, examples in levels:
            if not examples:
                report[f"{level}_examples"] = 0
                continue
            det = detect(examples, teacher, learner, tok, lf.quantile, lf.cap, lf.chunk, lf.unit)
            cands = prune_detected(examples, det, lf.pruning)
            ok = [True] * len(cands)
            if lf.validate and cands:
                s_ok = greedy_correct(student_engine, cands, tok, pool, max_new)
                t_ok = greedy_correct(teacher_engine, cands, tok, pool, max_new)
                ok = [a and b for a, b in zip(s_ok, t_ok)]
            kept += [c for c, k in zip(cands, ok) if k]
            report[f"{level}_kept_examples"] = [show(tok, c) for c, k in zip(cands, ok) if k][:SHOWN]
            report[f"{level}_dropped_examples"] = [show(tok, c) for c, k in zip(cands, ok) if not k][:SHOWN]
            labels = distractor_labels(examples, det.confounders.shape[1])
            report[f"{level}_detections"] = records(tok, examples, det, labels, SHOWN_DETECTIONS)
            quality = precision_recall_f1(det.confounders, labels, det.candidates)
            report.update({
                f"{level}_examples": len(examples),
                f"{level}_confounder_share": float(det.confounders.sum() / det.candidates.sum().clamp(min=1)),
                f"{level}_spans_per_example": len(cands) / len(examples) if lf.pruning == "span" else float("nan"),
                f"{level}_counterfactuals": len(cands),
                f"{level}_kept": int(sum(ok)),
                **{f"{level}_{k}": v for k, v in quality.items()},
            })
        report["counterfactuals_kept"] = len(kept)
        return kept
    finally:
        # their GPU memory free before the RL engines start and profile it
        kill_and_wait([student_engine, teacher_engine], [(e["node_id"], e["pid"]) for e in engines])


def seed_offset(cfg) -> int:
    """Where the run's seed starts its data stream: seeds see different problems (and, for a
    finite data set, a different order), so distillation runs over seeds differ in data."""
    return cfg.seed * SEED_STRIDE


def counterfactual_schedule(step: int, steps: int, available: int, cap: int) -> range:
    """Which counterfactuals (indices, in order) step `step` of `steps` trains on: each at most
    once over the run, spread evenly, at most `cap` per step.

    Why: the authors mix by data — original and pruned samples in one training file, each seen
    as often as the others — so λ is the share of originals that results. Filling (1 − λ) of
    every batch instead cycles whatever survived the validation filter: with 3 survivors over
    150 steps of 64 rows each was seen ~1,600 times and the student fell 15 points below plain
    KD (benchmarks/results/leaf_partial). Here 3 survivors are 3 rows of the run; (1 − λ) only
    caps a batch's share when there are more than the steps can hold (the rest are unused)."""
    used = min(available, steps * cap)
    return range(-(-step * used // steps), -(-(step + 1) * used // steps))


def batch_rows(task, tok, cfg, step: int, pruned: list[Example]) -> list[Example]:
    """Step `step`'s rows: its share of the counterfactuals (`counterfactual_schedule`) and
    originals from the task's train stream for the rest of the batch, continuing where the
    previous step's originals ended."""
    d, m = cfg.distill, cfg.model
    cf = counterfactual_schedule(step, d.steps, len(pruned), d.batch_size - round(d.mix * d.batch_size))
    n_orig = d.batch_size - len(cf)
    originals_before = step * d.batch_size - cf.start
    fmt = prompt_format(m, tok)
    rows = [instruction_example(tok, s, fmt)
            for s in train_samples_at(task, seed_offset(cfg) + originals_before, n_orig)]
    return rows + [pruned[i] for i in cf]


def distil(cfg, task, tok, learner, teacher, pruned: list[Example], report: dict,
           progress: bool) -> None:
    """Stage 2: `distill.steps` optimizer steps of forward KL to the teacher."""
    d = cfg.distill
    topk = None if cfg.teacher.placement == "colocated" else cfg.teacher.topk
    bar = tqdm(range(d.steps), desc=f"distill ({d.name})", disable=not progress,
               dynamic_ncols=True)
    losses = []
    for step in bar:
        full = batch_tensors(batch_rows(task, tok, cfg, step, pruned), tok.pad_token_id)
        tensors = {k: full[k] for k in TRAIN_KEYS}
        if topk is not None:
            tensors["teacher_ids"], tensors["teacher_logprobs"] = teacher.probe(tensors, TopKTargets(topk))
        learner.set_lr(lr_at(step, d.steps, d.lr, d.warmup_steps))
        metrics = learner.train_minibatch(tensors, DistillLoss())
        losses.append(metrics["kd_kl"])
        bar.set_postfix(kl=f"{metrics['kd_kl']:.4f}")
    report.update(distill_steps=d.steps, kd_kl_first=losses[0], kd_kl_last=losses[-1])


def from_config(cfg) -> "OfflineDistill | None":
    return OfflineDistill(cfg) if cfg.distill.name != "none" else None


class OfflineDistill(Method):
    """distill=kd|leaf|leaf_response as a stage between the cold start and RL; at the first
    evaluation it draws the prompts its detection saw."""

    name = "distill"

    def __init__(self, cfg):
        self.cfg = cfg
        self.report: dict | None = None

    def before_rl(self, policy: str, progress: bool) -> str:
        student = run_distill(self.cfg, Path(self.cfg.cache_dir), policy, progress)
        self.report = read_report(student)
        return student

    def draw_eval(self, tracker, evals: dict, step: int) -> None:
        if step == 0 and self.report:
            log_leaf_table(tracker, [r for level in ("instruction", "response")
                                     for r in self.report.get(f"{level}_detections", [])], 0)
