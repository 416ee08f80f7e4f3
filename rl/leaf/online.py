"""LeaF inside the RL loop (papers.md §2.7 (b) and (c)) — our extension, not in the paper.

Each step, after rewards, every prompt of the step goes through LeaF's detection with its
best-rewarded response as the continuation (the teacher on its actors, the student = the
current policy on the learner ranks), and gets at most one pruned copy: all its confounder
spans deleted (leaf.pruning=collective) or the span holding its lowest Δ (span). Then

  (b) leaf.kl_coef > 0: pruned prompt ⊕ that response become KD rows; the update adds
      kl_coef · KL(p_T ‖ p_S) over their response tokens to the policy loss (same optimizer
      step, their own token count as normaliser);
  (c) leaf.counterfactual_groups = G > 0: G pruned prompts are rolled out as extra GRPO groups
      (n samples each, rewarded by the task's verifier), so the policy is also trained on the
      prompt without the tokens that distract it.

The batch shape stays fixed (G extra groups every step): when fewer than G prompts have a
confounder, pruned copies repeat, and a step with none re-rolls original prompts.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from rl.batch import RolloutBatch
from rl.data import EncodedPrompt
from rl.leaf.confounders import precision_recall_f1
from rl.leaf.detect import Detection, detect
from rl.leaf.examples import Example, batch_tensors, counterfactuals, distractor_labels

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


class OnlineLeaf:
    def __init__(self, cfg, tok, learner, teacher):
        self.lf, self.tok, self.learner, self.teacher = cfg.leaf, tok, learner, teacher
        self.topk = None if cfg.teacher.placement == "colocated" else cfg.teacher.topk

    def detect(self, batch: RolloutBatch) -> tuple[list[Example], list[Example | None], Detection, dict]:
        """(originals, one pruned copy per original or None, the detection, metrics)."""
        originals = [Example(p.sample, p.ids, p.classes, list(p.in_text), resp)
                     for p, resp in best_responses(batch)]
        det = detect(originals, self.teacher, self.learner, self.tok, self.lf.quantile,
                     self.lf.cap, self.lf.chunk)
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

    def kd_rows(self, pruned: list[Example]) -> dict[str, torch.Tensor]:
        """(b): pruned prompt ⊕ response tensors with the teacher's targets (top-k from its
        actors; a colocated teacher scores inside the learner instead)."""
        t = batch_tensors(pruned, self.tok.pad_token_id)
        kd = {k: t[k] for k in KD_KEYS}
        if self.topk is not None:
            kd["teacher_ids"], kd["teacher_logprobs"] = self.teacher.topk_logprobs(kd, self.topk)
        return kd

    @staticmethod
    def groups_to_roll(originals: list[Example], pruned: list[Example | None], g: int) -> list[EncodedPrompt]:
        """(c): G prompts for extra groups — pruned copies in prompt order, cycled when fewer
        than G exist, original prompts when none does (the batch shape stays fixed)."""
        pool = [p for p in pruned if p is not None] or originals
        chosen = [pool[i % len(pool)] for i in range(g)]
        return [EncodedPrompt(replace(e.sample, uid=e.sample.uid + ("/pruned" if e.removed else "")),
                              e.input_ids, e.input_classes, e.region) for e in chosen]

