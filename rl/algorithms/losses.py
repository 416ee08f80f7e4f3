"""The policy loss in one place: PPO-clip with clip-higher, optional sampler correction (truncated
or masked importance sampling), KL and entropy terms.

All tensors are [B, T] aligned to token positions (logprob at t scores token t given < t);
`mask` marks the response tokens that are trained. The loss is a *sum* divided by a
normaliser the caller passes (the global token or sequence count of the minibatch), so the
gradient does not depend on how the minibatch is split across ranks and micro-batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
    kd_coef: float = 0.0    # LeaF in RL: weight of the KD rows (kd_*) a minibatch may carry


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
