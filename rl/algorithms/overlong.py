"""Responses cut off at `rollout.max_new_tokens` ("overlong"), handled as DAPO does (arXiv
2503.14476 §3.4). A truncated response is scored low for running out of tokens, not for wrong
reasoning, so its reward is noise to the policy; two remedies:

  filter:  its tokens leave the loss, but it still counts in its group's baseline (the mask is
           zeroed after advantages), so the siblings' advantages are the ones it would have had.
  penalty: soft overlong punishment (eq. 13): a reward that ramps from 0 to -1 over the last
           `buffer` tokens before the limit, for every response, so the policy learns where the
           limit is before it hits it rather than from a cliff.

`keep` (the default) trains truncated responses like any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rl.batch import RolloutBatch

MODES = ("keep", "filter", "penalty")


@dataclass(frozen=True)
class OverlongConfig:
    mode: str = "keep"      # keep | filter | penalty
    buffer: int = 0         # penalty: L_cache, the last tokens before max_new_tokens where it ramps
    penalty: float = 1.0    # penalty: the reward at the limit is -penalty


def validate(cfg: OverlongConfig, max_new_tokens: int) -> None:
    """Fail at config time, not at the first step's rewards."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown overlong mode {cfg.mode!r}; known: {' | '.join(MODES)}")
    if cfg.mode != "penalty":
        return
    if not 1 <= cfg.buffer < max_new_tokens:
        raise ValueError(f"algorithm.overlong_buffer={cfg.buffer} must be in [1, "
                         f"rollout.max_new_tokens={max_new_tokens}) for algorithm.overlong=penalty")
    if not (math.isfinite(cfg.penalty) and cfg.penalty > 0):
        raise ValueError(f"algorithm.overlong_penalty={cfg.penalty} must be > 0 "
                         "(algorithm.overlong=keep turns it off)")


def length_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO eq. 13, R_length(|y|) per response ([B] float32): 0 up to L_max - L_cache, then
    (L_max - L_cache - |y|) / L_cache, reaching -1 at L_max; -1 beyond (cannot happen when L_max
    is the sampler's own limit, kept for the formula)."""
    free = max_new_tokens - buffer
    y = lengths.to(torch.float32)
    ramp = (free - y) / buffer
    return torch.where(y <= free, torch.zeros_like(y),
                       torch.where(y <= max_new_tokens, ramp, torch.full_like(y, -1.0)))


def truncated(batch: RolloutBatch) -> torch.Tensor:
    """[B] bool: responses the sampler stopped at its token limit (vLLM finish_reason 'length')."""
    if len(batch.meta) != len(batch):
        raise ValueError(f"overlong handling reads meta[i]['finish_reason']: {len(batch.meta)} "
                         f"meta entries for {len(batch)} rows")
    return torch.tensor([m["finish_reason"] == "length" for m in batch.meta], dtype=torch.bool)


def apply_to_rewards(batch: RolloutBatch, cfg: OverlongConfig,
                     max_new_tokens: int) -> dict[str, float]:
    """Penalty mode: rewards += penalty · R_length(response length). Call after all rewards and
    before advantages, so the group baseline sees the shaped rewards. Other modes: no-op."""
    validate(cfg, max_new_tokens)
    if cfg.mode != "penalty":
        return {}
    shaped = cfg.penalty * length_penalty(batch.response_lengths(), max_new_tokens, cfg.buffer)
    batch.rewards = batch.rewards + shaped.to(batch.rewards.dtype)
    return {"overlong/penalty_mean": float(shaped.mean()),
            "overlong/penalized": float((shaped < 0).float().mean())}


def apply_to_mask(batch: RolloutBatch, cfg: OverlongConfig) -> dict[str, float]:
    """Filter mode: zero the response mask (and per-token advantages, which are masked by it) of
    truncated rows. Call after advantages and before the update: the rows already counted in
    their groups' baselines. Other modes: no-op."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown overlong mode {cfg.mode!r}; known: {' | '.join(MODES)}")
    if cfg.mode != "filter":
        return {}
    cut = truncated(batch)
    keep = ~cut[:, None]
    batch.response_mask = batch.response_mask & keep
    if batch.advantages is not None:
        batch.advantages = batch.advantages * keep.to(batch.advantages.dtype)
    return {"overlong/masked": float(cut.sum()), "overlong/truncated": float(cut.float().mean())}
