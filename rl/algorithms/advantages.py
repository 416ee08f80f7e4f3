"""Outcome advantages for critic-free RL: one scalar per response, from its group of siblings.

A "group" is the n responses sampled for one prompt. Token-level credit (rl/credit) multiplies
the broadcast advantage afterwards, so estimators here stay scalar and easy to check by hand.
"""
from __future__ import annotations

import torch

ESTIMATORS = {}


def register(name):
    def wrap(fn):
        ESTIMATORS[name] = fn
        return fn
    return wrap


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-response group sum, count, mean and (unbiased) std, without a Python loop."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    g = len(groups)
    r = rewards.to(torch.float64)
    count = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, r)
    mean = total / count
    sq = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, (r - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return total[inverse], count[inverse], mean[inverse], std[inverse]


@register("grpo")
def grpo(rewards, group_ids, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps); std_normalize=False is Dr.GRPO's unbiased form."""
    _, _, mean, std = _group_stats(rewards, group_ids)
    adv = rewards.to(torch.float64) - mean
    if std_normalize:
        adv = adv / (std + eps)
    return adv.to(torch.float32)


@register("rloo")
def rloo(rewards, group_ids, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """r - mean of the *other* responses in the group (REINFORCE leave-one-out)."""
    total, count, _, std = _group_stats(rewards, group_ids)
    r = rewards.to(torch.float64)
    adv = r - (total - r) / (count - 1).clamp(min=1)
    if std_normalize:
        adv = adv / (std + eps)
    return adv.to(torch.float32)


def compute_advantages(name: str, rewards, group_ids, std_normalize: bool) -> torch.Tensor:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](rewards, group_ids, std_normalize=std_normalize)
