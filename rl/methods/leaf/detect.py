"""LeaF stage 1 on real models: sensitivities from the teacher and the student, Δ, confounders.

`teacher` and `student` are anything that runs a Probe (rl/engine/base.py) — the teacher's
actors (rl/methods/leaf/teacher.py), the learner group, a FrozenModel: the same scoring boundary, so the
same code runs with a 1M-parameter teacher on a CPU and a 70B one on its own GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass

import ray
import torch

import torch.nn.functional as F

from rewards import RewardItem
from rl.engine.base import Probe
from rl.methods.leaf.confounders import (candidate_mask, confounder_mask, glue_whitespace, mask_spans,
                                         sensitivity_difference, word_confounder_mask, word_ids)
from rl.methods.leaf.examples import Example, batch_tensors, counterfactuals

SCORING_KEYS = ("input_ids", "attention_mask", "response_mask")


def input_grad_norms(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """g[i, t] = ‖∂L_i/∂e_t‖₂ (LeaF §2.1): L_i is row i's mean cross-entropy over its
    `response_mask` tokens, e_t the input embedding of position t. [B, T] float32.

    Rows are summed into one scalar: each row's loss depends only on its own embeddings, so
    one backward gives every row's gradient exactly as if it were alone (padding only adds
    masked keys). Only the embeddings require grad: no parameter gradient is formed or kept.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"].long()
    mask = batch["response_mask"].float()
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    emb = emb.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs_embeds=emb, attention_mask=attn, use_cache=False).logits
        logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        per_row = (nll * mask[:, 1:]).sum(-1) / mask[:, 1:].sum(-1).clamp(min=1)
        (grad,) = torch.autograd.grad(per_row.sum(), emb)
    return grad.float().norm(dim=-1) * attn.float()


class InputGradNorms(Probe):
    """LeaF's sensitivity probe: `input_grad_norms` of the model it runs on."""

    def __call__(self, model, b):
        return input_grad_norms(model.module(), b)


@dataclass
class Detection:
    """Per-token results for a list of examples, [B, T] over input ⊕ continuation."""
    g_teacher: torch.Tensor
    g_student: torch.Tensor
    delta: torch.Tensor
    region: torch.Tensor
    candidates: torch.Tensor
    confounders: torch.Tensor
    texts: list[list[str]]          # each example's input tokens, decoded

    def spans(self, i: int) -> list[tuple[int, int]]:
        """Row i's confounder spans as they are pruned: with the spaces beside them."""
        return glue_whitespace(mask_spans(self.confounders[i]), self.texts[i])


def token_texts(tok, examples: list[Example]) -> list[list[str]]:
    return [[tok.decode([t]) for t in e.input_ids] for e in examples]


def sensitivities(scorer, examples: list[Example], pad_id: int, chunk: int) -> torch.Tensor:
    """g [B, T] in chunks of rows (one backward per chunk), padded to the widest chunk."""
    parts = []
    for i in range(0, len(examples), chunk):
        t = batch_tensors(examples[i:i + chunk], pad_id)
        parts.append(scorer.probe({k: t[k] for k in SCORING_KEYS}, InputGradNorms()))
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


UNITS = ("token", "word")


def confounders_by_unit(delta: torch.Tensor, region: torch.Tensor, candidates: torch.Tensor,
                        texts: list[list[str]], quantile: float, cap: float, unit: str) -> torch.Tensor:
    """unit "token" (the paper): non-whitespace region tokens with Δ ≤ min(v_(⌊n·q⌋), cap), the
    order statistic over the whole region as the authors take it. unit "word": the same rule
    on each word's mean Δ, the order statistic over the region's words, whole words marked."""
    if unit == "token":
        return confounder_mask(delta, candidates, quantile, cap, quantile_over=region)
    if unit == "word":
        return word_confounder_mask(delta, word_ids(texts, candidates), quantile, cap)
    raise ValueError(f"leaf.unit must be one of {UNITS}, got {unit!r}")


def detect(examples: list[Example], teacher, student, tok, quantile: float, cap: float,
           chunk: int = 64, unit: str = "token") -> Detection:
    """§2.1: ĝ per model, Δ = minmax(ĝ_T − ĝ_S) over each example's region, confounders by
    `confounders_by_unit`."""
    if not examples:
        raise ValueError("LeaF detection got no examples")
    pad = tok.pad_token_id
    g_t = sensitivities(teacher, examples, pad, chunk)
    g_s = sensitivities(student, examples, pad, chunk)
    region = batch_tensors(examples, pad)["region"]
    region = torch.nn.functional.pad(region, (0, g_t.shape[1] - region.shape[1]))
    texts = token_texts(tok, examples)
    cand = candidate_mask(texts, region)
    delta = sensitivity_difference(g_t, g_s, region)
    mask = confounders_by_unit(delta, region, cand, texts, quantile, cap, unit)
    return Detection(g_t, g_s, delta, region, cand, mask, texts)


def records(tok, examples: list[Example], det: Detection, labels: torch.Tensor, n: int) -> list[dict]:
    """The first n examples token by token (Δ, confounder and distractor flags), for the
    W&B table `leaf_confounders` and leaf_report.json."""
    return [{"uid": ex.sample.uid, "tokens": [tok.decode([t]) for t in ex.input_ids],
             "delta": det.delta[i, : len(ex.input_ids)].tolist(),
             "confounder": det.confounders[i, : len(ex.input_ids)].tolist(),
             "distractor": labels[i, : len(ex.input_ids)].tolist()}
            for i, ex in enumerate(examples[:n])]


def log_leaf_table(tracker, records: list[dict], step: int) -> None:
    """Prompts LeaF's detection saw (before RL: the distillation's; during RL: the step's),
    each token coloured by Δ (low Δ: the student leans on it, the teacher does not),
    confounders and labelled distractors marked (`leaf_confounders`)."""
    from rl.methods.credit.render import credit_html

    rows = [[d["uid"], sum(d["confounder"]),
             credit_html(d["tokens"], {"Δ": d["delta"]},
                         marks={"confounder": d["confounder"],
                                "distractor (label)": d["distractor"]})]
            for d in records]
    tracker.table("leaf_confounders", ["uid", "confounders", "prompt"], rows, step,
                  html_columns=("prompt",))


def prune_detected(examples: list[Example], det: Detection, mode: str) -> list[Example]:
    """Every example's counterfactuals (one per confounder span, or one collective)."""
    out = []
    for i, ex in enumerate(examples):
        spans = det.spans(i)
        if spans:
            out += counterfactuals(ex, spans, mode)
    return out


def greedy_correct(engine, examples: list[Example], tok, pool, max_new_tokens: int) -> list[bool]:
    """Whether a model (a vLLM engine actor) answers each example's input correctly, greedy.
    The text generated after the input is judged by the task's verifier."""
    if not examples:
        return []
    comps = ray.get(engine.generate.remote([e.input_ids for e in examples], 1, 0.0, 1.0,
                                           max_new_tokens))
    texts = tok.batch_decode([c[0].token_ids for c in comps], skip_special_tokens=True)
    items = [RewardItem(response=t, answer=e.sample.answer, meta=e.sample.meta,
                        verifier=e.sample.task) for t, e in zip(texts, examples)]
    return [r.components.get(e.sample.task, 0.0) == 1.0
            for r, e in zip(pool.score(items), examples)]
