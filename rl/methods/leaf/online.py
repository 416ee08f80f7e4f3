"""LeaF inside the RL loop (papers.md §2.7 (b) and (c)) — our extension, not in the paper.

Each step, after rewards, every prompt of the step goes through LeaF's detection with its
best-rewarded response as the continuation (the teacher on its actors, the student = the
current policy on the learner ranks), and gets at most one pruned copy: all its confounder
spans deleted (leaf.pruning=collective) or the span holding its lowest Δ (span). Then

  (b) leaf.kd_coef > 0: pruned prompt ⊕ that response become KD rows; the update adds
      kd_coef · KL(p_T ‖ p_S) over their response tokens to the policy loss (same optimizer
      step, their own token count as normaliser);
  (c) leaf.counterfactual_groups = G > 0: G pruned prompts are rolled out as extra GRPO groups
      (n samples each, rewarded by the task's verifier), so the policy is also trained on the
      prompt without the tokens that distract it.

The batch shape stays fixed (G extra groups every step): when fewer than G prompts have a
confounder, pruned copies repeat, and a step with none re-rolls original prompts.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from rl.algorithms.losses import DistillTerm, TopKTargets
from rl.batch import RolloutBatch
from rl.tasks.data import EncodedPrompt
from rl.methods.leaf.confounders import precision_recall_f1
from rl.methods.leaf.detect import Detection, detect, log_leaf_table, records
from rl.methods.leaf.examples import Example, batch_tensors, counterfactuals, distractor_labels
from rl.methods.base import AfterRewards, ExtraRows, Method, Tools
from rl.tasks.base import stable_hash
from rl.methods.leaf.teacher import TeacherGroup, student_vocab_size, teacher_path

KD_KEYS = ("input_ids", "attention_mask", "response_mask")


def best_responses(batch: RolloutBatch) -> list[tuple[EncodedPrompt, list[int]]]:
    """Per group, in group order: (its prompt, the response with the highest reward — the
    first such row on ties)."""
    out = []
    for g in batch.group_ids.unique(sorted=True).tolist():
        rows = (batch.group_ids == g).nonzero().flatten()
        best = int(rows[batch.rewards[rows].argmax()])
        resp = batch.input_ids[best][batch.response_mask[best]].tolist()
        out.append((batch.meta[best]["prompt"], resp))
    return out


def strongest_span(det: Detection, i: int) -> list[tuple[int, int]]:
    """The confounder span of row i that holds its lowest Δ (span mode keeps one copy)."""
    spans = det.spans(i)
    if not spans:
        return []
    lowest = torch.where(det.confounders[i], det.delta[i], torch.inf)
    return [min(spans, key=lambda s: float(lowest[s[0]:s[1]].min()))]


def from_config(cfg) -> "LeafInRL | None":
    return LeafInRL(cfg) if cfg.leaf.name == "rl" else None


class LeafInRL(Method):
    """LeaF's two RL terms as a method of the step: detection after rewards, (c)'s extra groups
    and (b)'s KD rows with their loss term; the teacher's actors start and stop with the
    learner group (a colocated teacher is loaded inside its ranks)."""

    name = "leaf"

    def __init__(self, cfg):
        self.cfg, self.lf = cfg, cfg.leaf
        self.topk = None if cfg.teacher.placement == "colocated" else cfg.teacher.topk
        self.teacher_path: str | None = None
        self.teacher: TeacherGroup | None = None
        self.policy = ""
        self.last: tuple[list[Example], Detection] | None = None  # for its table (draw)

    def before_rl(self, policy: str, progress: bool) -> str:
        self.teacher_path = teacher_path(self.cfg, Path(self.cfg.cache_dir), progress)
        self.policy = policy
        return policy

    def learner_options(self) -> dict:
        colocated = self.cfg.teacher.placement == "colocated"
        return {"frozen_models": {"teacher": self.teacher_path}} if colocated else {}

    def start(self, tools: Tools) -> None:
        t = self.cfg.teacher
        vocab = student_vocab_size(self.policy, self.teacher_path)
        self.teacher = TeacherGroup(self.teacher_path, t, self.cfg.model.dtype, vocab,
                                    learner=tools.learner if t.placement == "colocated" else None)

    def stop(self) -> None:
        if self.teacher is not None:
            self.teacher.shutdown()
            self.teacher = None

    def after_rewards(self, batch: RolloutBatch, step: int, tools: Tools) -> AfterRewards:
        """Confounders of the step's prompts; (c) pruned prompts rolled out and rewarded as
        extra groups; (b) KD rows for the update."""
        lf = self.lf
        originals, pruned, det, metrics = self.detect(batch, tools)
        self.last = (originals, det)
        kept = [p for p in pruned if p is not None]
        kd = self.kd_rows(kept, tools.tok) if lf.kd_coef > 0 and kept else None
        metrics["kd_rows"] = float(len(kd["input_ids"])) if kd else 0.0
        if lf.counterfactual_groups:
            prompts = groups_to_roll(originals, pruned, lf.counterfactual_groups)
            seeds = [stable_hash("leaf", self.cfg.seed, step, i) % 2**31 for i in range(len(prompts))]
            extra = tools.roll(prompts, seeds, int(batch.group_ids.max()) + 1)
            metrics["cf_accuracy"] = float(extra.correct.float().mean())
            batch = RolloutBatch.concat(batch, extra)
        rows = [ExtraRows(DistillTerm("leaf_kd", lf.kd_coef), kd)] if kd else []
        return AfterRewards(batch, rows, metrics)

    def detect(self, batch: RolloutBatch, tools: Tools) -> tuple[list[Example], list[Example | None], Detection, dict]:
        """(originals, one pruned copy per original or None, the detection, metrics)."""
        originals = [Example(p.sample, p.ids, p.classes, list(p.in_text), resp)
                     for p, resp in best_responses(batch)]
        det = detect(originals, self.teacher, tools.learner, tools.tok, self.lf.quantile,
                     self.lf.cap, self.lf.chunk, self.lf.unit)
        pruned: list[Example | None] = []
        for i, ex in enumerate(originals):
            spans = det.spans(i) if self.lf.pruning == "collective" else strongest_span(det, i)
            pruned.append(counterfactuals(ex, spans, "collective")[0] if spans else None)
        labels = distractor_labels(originals, det.confounders.shape[1])
        n_spans = [len(det.spans(i)) for i in range(len(originals))]
        metrics = {
            "confounder_share": float(det.confounders.sum() / det.candidates.sum().clamp(min=1)),
            "spans_per_prompt": sum(n_spans) / len(originals),
            "prompts_pruned": sum(p is not None for p in pruned) / len(originals),
        }
        if labels.any():  # the task marks its distractors: detection quality against them
            q = precision_recall_f1(det.confounders, labels, det.candidates)
            metrics.update({k: q[k] for k in ("precision", "recall", "f1")})
        return originals, pruned, det, metrics

    def kd_rows(self, pruned: list[Example], tok) -> dict[str, torch.Tensor]:
        """(b): pruned prompt ⊕ response tensors with the teacher's targets (top-k from its
        actors; a colocated teacher scores inside the learner instead)."""
        t = batch_tensors(pruned, tok.pad_token_id)
        kd = {k: t[k] for k in KD_KEYS}
        if self.topk is not None:
            kd["teacher_ids"], kd["teacher_logprobs"] = self.teacher.probe(kd, TopKTargets(self.topk))
        return kd

    def draw(self, tracker, tok, batch: RolloutBatch, rows: int, step: int) -> None:
        """The step's prompts coloured by Δ, confounders and labelled distractors marked."""
        if self.last is None:
            return
        originals, det = self.last
        labels = distractor_labels(originals, det.confounders.shape[1])
        log_leaf_table(tracker, records(tok, originals, det, labels, rows), step)


def groups_to_roll(originals: list[Example], pruned: list[Example | None], g: int) -> list[EncodedPrompt]:
    """(c): G prompts for extra groups — pruned copies in prompt order, cycled when fewer
    than G exist, original prompts when none does (the batch shape stays fixed)."""
    pool = [p for p in pruned if p is not None] or originals
    chosen = [pool[i % len(pool)] for i in range(g)]
    return [EncodedPrompt(replace(e.sample, uid=e.sample.uid + ("/pruned" if e.removed else "")),
                          e.input_ids, e.input_classes, e.region) for e in chosen]
