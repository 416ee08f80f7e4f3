"""The losses in one place: the policy loss (PPO-clip with clip-higher, optional sampler correction
— truncated or masked importance sampling —, KL and entropy terms), the SFT loss and the forward
KL to a teacher; and, at the end, the `Loss` objects the engine runs (rl/engine/base.py).

All tensors are [B, T] aligned to token positions (logprob at t scores token t given < t);
`mask` marks the response tokens that are trained. The loss is a *sum* divided by a
normaliser the caller passes (the global token or sequence count of the minibatch), so the
gradient does not depend on how the minibatch is split across ranks and micro-batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from rl.engine.base import Forwards, Loss, LossOut, Probe
from rl.engine.frozen import next_token_logprobs, token_logprobs, topk_logprobs


@dataclass
class PolicyLossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    tis_cap: float = 0.0     # c; 0 = no sampler correction
    tis_mode: str = "truncate"  # truncate: weight min(ρ, c) | mask: weight 1 if 1/c ≤ ρ ≤ c, else 0
    loss_agg: str = "token_mean"


def kl_penalty(logprobs, ref_logprobs, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimates on samples from pi (Schulman's k1 and k3)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-20, 20)
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown kl estimator {estimator!r}")


def sampler_correction(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float,
                       mode: str) -> torch.Tensor:
    """Per-token weight for the gap between the policy that sampled a response (vLLM, possibly
    `rollout.async_steps` versions old) and the one the PPO ratio is taken against (the
    learner's scoring forward): ρ = π_old / π_sampler, then
      truncate: min(ρ, c)                      — truncated importance sampling (TIS)
      mask:     1 where 1/c ≤ ρ ≤ c, else 0     — such tokens drop out of the loss (the caller's
                                                  normaliser still counts them)
    A constant: no gradient flows through it."""
    rho = torch.exp((old_logprobs - sampler_logprobs).clamp(-20, 20)).detach()
    if mode == "truncate":
        return rho.clamp(max=cap)
    if mode == "mask":
        return ((rho >= 1.0 / cap) & (rho <= cap)).to(rho.dtype)
    raise ValueError(f"unknown tis_mode {mode!r} (truncate | mask)")


def aggregate(values, mask, loss_agg: str, normaliser: float) -> torch.Tensor:
    """Sum of per-token values, weighted for token- or sequence-mean, over a global normaliser.

    token_mean: Σ_tokens v / N_tokens(global). seq_mean: Σ_seq (Σ_t v / len_seq) / N_seq(global).
    """
    mask = mask.to(values.dtype)
    if loss_agg == "token_mean":
        return (values * mask).sum() / normaliser
    if loss_agg == "seq_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / normaliser
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    normaliser: float,
    sampler_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
):
    """Return (loss, metrics). `advantages` is per token (already multiplied by credit γ)."""
    mask_f = mask.to(logprobs.dtype)
    n_tok = mask_f.sum().clamp(min=1)
    log_ratio = (logprobs - old_logprobs).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    is_weight = None
    if cfg.tis_cap > 0 and sampler_logprobs is not None:
        is_weight = sampler_correction(old_logprobs, sampler_logprobs, cfg.tis_cap, cfg.tis_mode)
        per_token = per_token * is_weight
    if cfg.kl_coef > 0 and ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator)
        per_token = per_token + cfg.kl_coef * kl
    else:
        kl = None
    if cfg.entropy_coef > 0 and entropy is not None:
        per_token = per_token - cfg.entropy_coef * entropy
    loss = aggregate(per_token, mask, cfg.loss_agg, normaliser)

    with torch.no_grad():
        is_clipped = ((ratio < 1 - cfg.clip_low) & (advantages < 0)) | (
            (ratio > 1 + cfg.clip_high) & (advantages > 0))
        metrics = {
            "clip_frac": ((is_clipped.to(mask_f.dtype) * mask_f).sum() / n_tok).item(),
            "ratio_mean": ((ratio * mask_f).sum() / n_tok).item(),
            "approx_kl_old": ((0.5 * log_ratio**2 * mask_f).sum() / n_tok).item(),
        }
        if is_weight is not None:
            # tokens the correction changed: truncated (ρ > c) or dropped (ρ outside [1/c, c])
            changed = ((old_logprobs - sampler_logprobs > math.log(cfg.tis_cap))
                       if cfg.tis_mode == "truncate" else is_weight == 0)
            metrics["is_weight_mean"] = ((is_weight * mask_f).sum() / n_tok).item()
            metrics["is_corrected_frac"] = ((changed.to(mask_f.dtype) * mask_f).sum() / n_tok).item()
        if kl is not None:
            metrics["kl"] = ((kl * mask_f).sum() / n_tok).item()
        if entropy is not None:
            metrics["entropy"] = ((entropy * mask_f).sum() / n_tok).item()
    return loss, metrics


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, normaliser: float) -> torch.Tensor:
    """Negative log-likelihood of the masked (response) tokens, summed over a global count."""
    return -(logprobs * mask.to(logprobs.dtype)).sum() / normaliser


# --- distillation (LeaF §2.3): per-token forward KL(p_T ‖ p_S) at temperature 1 --------------

def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Σ_v p_T(v) (log p_T(v) − log p_S(v)) per position, from full [B, T, V] log-probs.

    Forward (teacher-weighted) KL, as LeaF and classic KD use: the student is pulled toward
    every token the teacher finds likely, not only toward its own modes."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def _log_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ_k p) of the mass outside the top-k ids, stable when that mass is tiny."""
    lse = torch.logsumexp(topk_logp, dim=-1).clamp(max=-1e-7)
    return torch.log(-torch.expm1(lse))


def forward_kl_topk(student_logp: torch.Tensor, teacher_ids: torch.Tensor,
                    teacher_topk_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL over k + 1 bins: the teacher's top-k tokens and one bin for the rest.

    What a teacher on other GPUs can send for a large vocabulary: k ids and log-probs per
    position (the tail mass is 1 − Σ of them). The KL of these coarsened distributions is a
    lower bound of the full KL (data processing) and equals it when k covers the vocabulary.
    """
    s_top = student_logp.gather(-1, teacher_ids)
    p_top = teacher_topk_logp.exp()
    kl_top = (p_top * (teacher_topk_logp - s_top)).sum(-1)
    t_tail_log, s_tail_log = _log_tail(teacher_topk_logp), _log_tail(s_top)
    t_tail = t_tail_log.exp()
    kl_tail = torch.where(t_tail > 0, t_tail * (t_tail_log - s_tail_log), torch.zeros_like(t_tail))
    return kl_top + kl_tail


@dataclass
class TopKTargets(Probe):
    """A teacher's distillation targets: its k most likely next tokens per position, ids and
    log-probs [B, T, k] (what travels from teacher actors; `distill_loss` adds the tail)."""
    k: int
    temperature: float = 1.0

    def __call__(self, model, b):
        return topk_logprobs(model.next_token_logprobs(b, self.temperature), self.k)


def distill_loss(student_logp: torch.Tensor, mask: torch.Tensor, normaliser: float,
                 teacher_logp: torch.Tensor | None = None,
                 teacher_ids: torch.Tensor | None = None,
                 teacher_topk_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Token-mean forward KL over the masked (response) positions, summed over a global count.

    The teacher comes either as full log-probs [B, T, V] (a colocated teacher) or as top-k
    ids + log-probs [B, T, k] (teacher actors); exactly one of the two must be given."""
    if (teacher_logp is None) == (teacher_ids is None):
        raise ValueError("distill_loss: pass either teacher_logp or teacher_ids/teacher_topk_logp")
    if teacher_logp is not None:
        kl = forward_kl(student_logp, teacher_logp)
    else:
        kl = forward_kl_topk(student_logp, teacher_ids, teacher_topk_logp)
    m = mask.to(kl.dtype)
    loss = (kl * m).sum() / normaliser
    return loss, {"kd_kl": ((kl.detach() * m).sum() / m.sum().clamp(min=1)).item()}


# --- the Loss objects the engine runs ---------------------------------------------------------

def token_count(rows: dict[str, torch.Tensor]) -> float:
    """The response tokens of a row set (at least 1): a token-mean loss's global normaliser."""
    return max(float(rows["response_mask"].sum()), 1.0)


def per_token(metrics: dict[str, float], b: dict) -> dict[str, float]:
    """Each metric weighted by the micro-batch's response tokens."""
    n = float(b["response_mask"].sum())
    return {k: n for k in metrics}


@dataclass
class DistillTerm:
    """Forward KL to the teacher on a row set of its own (`name` in the micro-batch's extras),
    added to another loss with weight `coef` and normalised by its own token count — LeaF's KD
    rows inside an RL step are one. Its logits come from the host loss's forward."""
    name: str
    coef: float
    teacher: str = "teacher"  # the frozen model beside the policy, when the rows carry no top-k
    normaliser: float = 1.0

    def bind(self, rows: dict[str, torch.Tensor]) -> "DistillTerm":
        return replace(self, normaliser=token_count(rows))

    def __call__(self, model: Forwards, rows: dict, logits: torch.Tensor) -> LossOut:
        value, metrics = teacher_kl(model, rows, logits, self.normaliser, self.teacher)
        return LossOut(self.coef * value, metrics, per_token(metrics, rows))


def teacher_kl(model: Forwards, b: dict, logits: torch.Tensor, normaliser: float,
               teacher: str = "teacher"):
    """Forward KL to the teacher at T = 1 over the response tokens (LeaF §2.3): its top-k
    came with the rows (teacher actors), or the frozen model `teacher` loaded beside the
    policy scores them."""
    student = next_token_logprobs(logits)
    if "teacher_ids" in b:
        return distill_loss(student, b["response_mask"], normaliser,
                            teacher_ids=b["teacher_ids"], teacher_topk_logp=b["teacher_logprobs"])
    return distill_loss(student, b["response_mask"], normaliser,
                        teacher_logp=model.frozen_logprobs(teacher, b))


@dataclass
class PolicyLoss(Loss):
    """The RL objective: `policy_loss` on the rows, plus extra terms on row sets of their own
    that share its forward."""
    cfg: PolicyLossConfig
    terms: tuple = ()
    normaliser: float = 1.0

    def bind(self, rows, extra) -> "PolicyLoss":
        mask = rows["response_mask"]
        n = float(mask.sum()) if self.cfg.loss_agg == "token_mean" else float(len(mask))
        terms = tuple(t.bind(extra[t.name]) if t.name in extra else t for t in self.terms)
        return replace(self, normaliser=max(n, 1.0), terms=terms)

    def __call__(self, model, b, temperature) -> LossOut:
        extra = b.get("extra", {})
        present = [t for t in self.terms if t.name in extra]
        need_ent = self.cfg.entropy_coef > 0
        if present:  # the policy's rows and the terms' in one forward
            logits = model.logits(b, *(extra[t.name] for t in present))
            lp, ent = token_logprobs(logits[0], b["input_ids"], temperature, need_ent)
        else:
            lp, ent = model.logprobs(b, temperature, need_ent)
        value, metrics = policy_loss(lp, b["old_logprobs"], b["advantages"], b["response_mask"],
                                     self.cfg, self.normaliser,
                                     sampler_logprobs=b.get("sampler_logprobs"),
                                     ref_logprobs=b.get("ref_logprobs"), entropy=ent)
        weights = per_token(metrics, b)
        for term, lg in zip(present, logits[1:] if present else []):
            out = term(model, extra[term.name], lg)
            value = value + out.value
            metrics.update(out.metrics)
            weights.update(out.weights)
        return LossOut(value, metrics, weights)


@dataclass
class TokenMeanLoss(Loss):
    """A loss averaged over the minibatch's response tokens."""
    normaliser: float = 1.0

    def bind(self, rows, extra) -> "TokenMeanLoss":
        return replace(self, normaliser=token_count(rows))


@dataclass
class SftLoss(TokenMeanLoss):
    """Next-token negative log-likelihood of the response tokens (the cold start)."""

    def __call__(self, model, b, temperature) -> LossOut:
        lp, _ = model.logprobs(b, temperature)
        return LossOut(sft_loss(lp, b["response_mask"], self.normaliser), {}, {})


@dataclass
class DistillLoss(TokenMeanLoss):
    """Offline distillation: forward KL to the teacher on every row."""

    def __call__(self, model, b, temperature) -> LossOut:
        value, metrics = teacher_kl(model, b, model.logits(b)[0], self.normaliser)
        return LossOut(value, metrics, per_token(metrics, b))
