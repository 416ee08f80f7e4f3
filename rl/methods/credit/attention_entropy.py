"""Attention-entropy reweighting (arXiv 2605.07660, shared specs/papers.md §5): tokens whose
attention is focused (low entropy: "anchors") and tokens whose attention is spread (high
entropy: "explorers") carry different learning signals; a schedule moves the emphasis from
the first to the second over training.

Only the paper's abstract was readable here, so most of this is ours (§5 marks it [D]):

* Ĥ_t = (1 / (H log N_t)) Σ_h H_{ℓ*,h,t} — the mean of the per-head attention entropies of one
  layer ℓ* (default ⌊L/2⌋), over log of the N_t keys token t sees. The paper takes the
  entropy of the head-averaged row; the kernels emit per-head entropies, whose mean is a lower
  bound of it (the proxy of §5.1). It comes from the scoring forward (θ_old), detached.
* γ_t = 1 + β (2u_t − 1)(2s − 1), u_t = (rank_t − ½) / n the rank percentile of Ĥ_t among the
  response's n tokens (ties broken by position), s = min(step / (steps − 1), s_max): anchors
  get 1 + β and explorers 1 − β at the start, uniform weights mid-run, the reverse at the
  end. Rank percentiles are symmetric, so γ averages exactly 1 over every response.
* The same rule for positive and negative advantages.

Logged: γ's effective sample size (Σγ)² / (n Σγ²) and the share of the weight on the
anchors and on the explorers (the lowest and highest `share` of each response).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl.batch import RolloutBatch
from rl.methods.credit import CreditMethod, register
from rl.methods.credit.preplan_anchor import CreditTrace
from rl.methods.base import RunInfo


@dataclass
class AttentionEntropyParams:
    beta: float = 0.5                # β: the tilt's size (γ in [1 - β, 1 + β])
    layer: int | None = None         # ℓ*: the layer read; None = ⌊L/2⌋
    s_max: float = 1.0               # the schedule stops here (< 1: never fully explorer-heavy)
    share: float = 0.2               # anchors / explorers for the logged weight shares

    def __post_init__(self):
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1) (γ stays > 0), got {self.beta}")
        if not 0.0 <= self.s_max <= 1.0 or not 0.0 < self.share <= 0.5:
            raise ValueError(f"s_max must be in [0, 1] and share in (0, 0.5], got {self.s_max}, {self.share}")


def normalised_entropy(entropy: Tensor, attention_mask: Tensor) -> Tensor:
    """Ĥ [B, T] from per-head entropies [B, H, T] (nats): the head mean over log N_t, N_t the
    keys token t sees (itself and the real tokens before it). 0 where N_t ≤ 1."""
    n_keys = attention_mask.long().cumsum(1).double()
    log_n = torch.where(n_keys > 1, n_keys.log(), torch.ones_like(n_keys))
    h = entropy.double().mean(1) / log_n
    return torch.where(n_keys > 1, h, torch.zeros_like(h))


def rank_percentile(x: Tensor, resp: Tensor) -> Tensor:
    """u_t = (rank_t − ½) / n among each row's response tokens (rank 1 = the lowest; ties in
    position order); 0 elsewhere."""
    big = torch.finfo(torch.float64).max
    keyed = torch.where(resp, x.double(), torch.full_like(x, big, dtype=torch.float64))
    order = torch.sort(keyed, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(x.shape[1]).expand_as(order).contiguous())
    n = resp.sum(1, keepdim=True).clamp(min=1).double()
    return torch.where(resp, (rank.double() + 0.5) / n, torch.zeros(x.shape, dtype=torch.float64))


def schedule(step: int, steps: int, s_max: float) -> float:
    """s: training progress in [0, s_max], 0 at the first step and 1 at the last."""
    return min(step / (steps - 1), s_max) if steps > 1 else 0.0


def entropy_gamma(h: Tensor, resp: Tensor, s: float, beta: float) -> Tensor:
    """γ [B, T] = 1 + β (2u − 1)(2s − 1) on response tokens, 1 elsewhere."""
    u = rank_percentile(h, resp)
    gamma = 1.0 + beta * (2.0 * u - 1.0) * (2.0 * s - 1.0)
    return torch.where(resp, gamma, torch.ones_like(gamma)).float()


@register("attention_entropy")
class AttentionEntropyCredit(CreditMethod):
    Params = AttentionEntropyParams

    def __init__(self, strategy, params, seed=0, stats_layers="middle:5"):
        super().__init__(strategy, params, seed, stats_layers)
        self.trace: CreditTrace | None = None

    def stats_request(self) -> dict | None:
        return {"entropy": True}

    def setup(self, run: RunInfo) -> None:
        layer = run.num_layers // 2 if self.p.layer is None else self.p.layer
        if not 0 <= layer < run.num_layers:
            raise ValueError(f"credit.params.layer={layer}: the model has {run.num_layers} layers")
        self.layers, self.steps = [layer], run.steps

    def weights(self, batch: RolloutBatch, stats: dict | None, step: int) -> dict[str, float]:
        if stats is None:
            raise RuntimeError("credit=attention_entropy needs the scoring forward's attention entropy")
        resp = batch.response_mask.bool()
        (layer,) = stats.values()
        h = normalised_entropy(layer["entropy"], batch.attention_mask)
        s = schedule(step, self.steps, self.p.s_max)
        gamma = entropy_gamma(h, resp, s, self.p.beta)
        batch.token_weights = batch.token_weights * gamma
        u = rank_percentile(h, resp)
        anchors, explorers = resp & (u < self.p.share), resp & (u > 1 - self.p.share)
        self.trace = CreditTrace(None, gamma, anchors, [], [])
        g = gamma[resp].double()
        if not g.numel():
            return {}
        return {"schedule": s, "gamma_mean": float(g.mean()), "gamma_max": float(g.max()),
                "gamma_ess": float(g.sum() ** 2 / (g.numel() * (g ** 2).sum())),
                "anchor_weight_share": float(gamma[anchors].sum() / g.sum()),
                "explorer_weight_share": float(gamma[explorers].sum() / g.sum()),
                "attention_entropy_mean": float(h[resp].mean())}

