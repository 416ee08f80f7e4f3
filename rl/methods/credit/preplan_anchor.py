"""Preplan/anchor credit (arXiv 2510.13554): amplify the advantage of the tokens the policy's
own attention marks as structurally important. `shared/specs/papers.md` §1 is the spec;
where the paper is silent we take its recommended choices, each a config key.

From the scoring forward's statistics of the selected layers (per query head, per token):

* head groups — every head of the selected layers ranked by its mean look-back distance over
  the batch's response tokens: the bottom `head_quantile` are *local*, the top *global*
  (re-chosen every batch; the overlap with the previous batch's groups is logged);
* WAAD_t (window W) averaged over local heads; FAI_s (band [H_lo, H_hi], response rows only,
  0 where the band is empty) averaged over global heads — both linear in attention, so the
  head mean of per-head statistics equals the statistic of the head-mean map;
* preplan tokens T_loc = TopQ(Δ), Δ_t = |WAAD_t − WAAD_{t+1}| (0 on the last token);
  anchors T_glob = TopQ(FAI) ∩ {FAI > 0};
* dominated anchors D = anchors with WAAD ≤ τ_waad (a quantile of WAAD, default the median)
  and a preplan-strength Δ (≥ the TopQ(Δ) threshold) among the k tokens before; the intro of
  an anchor is the argmax of Δ over those k tokens (the earliest on ties).

γ_t = 1 + b·1[...] with b = γ_amp − 1: local_chunk 1[T_loc], global_anchor 1[T_glob], coupled
1[T_glob∖D] + (1−α)·1[D] + α·1[I(D)] (indicators add, literally as printed), and the paper's
baselines random (a random q of the response) and entropy (the top q by predictive entropy).

Alignment: statistics at position t are those of token t (query row t for WAAD, key column t
for FAI), and γ_t multiplies the advantage of token t's logprob — the paper's literal indexing.

`rank=bottom` selects the lowest Δ, and the lowest FAI among the tokens whose band is not empty
(FAI > 0), instead (dominated anchors and their intros as above, with the same τ_Δ) — the
paper's bottom-40% ablation, reported to hurt.

TopQ over a response of n tokens keeps the values ≥ the ⌈q·n⌉-th largest: ties at the
threshold are all kept (no positional tie-break), and a statistic that is constant over
the response selects nothing (it carries no information, and amplifying every token would
only rescale the advantage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rl.batch import RolloutBatch
from rl.methods.credit import CreditMethod, register
from rl.tasks.base import stable_hash

ATTENTION_STRATEGIES = ("local_chunk", "global_anchor", "coupled")
STRATEGIES = ATTENTION_STRATEGIES + ("random", "entropy")


@dataclass
class PreplanAnchorParams:
    waad_window: int = 10            # W: WAAD's distance clip
    fai_band: list = field(default_factory=lambda: [10, 100])  # [H_lo, H_hi] of FAI (rows after the key)
    top_q: float = 0.4               # fraction of a response's tokens that TopQ keeps
    head_quantile: float = 0.3       # bottom / top fraction of heads that are local / global
    gamma_amp: float = 1.5           # γ on a selected token (b = gamma_amp - 1)
    alpha: float = 0.5               # coupled: share of a dominated anchor's bonus moved to its intro
    k: int = 3                       # coupled: tokens before an anchor searched for its intro
    waad_quantile: float = 0.5       # τ_waad: this quantile of WAAD over the response (lower value)
    delta_top_q: float | None = None  # τ_Δ: the TopQ(Δ) threshold at this q (None: top_q)
    positive_only: bool = False      # γ only on responses with advantage ≥ 0 (paper v1); v2: both signs
    rank: str = "top"                # which end of Δ and FAI TopQ keeps: top (the method) or
    #                                  bottom (the paper's bottom-40% ablation, which hurts)

    def __post_init__(self):
        lo_hi = list(self.fai_band)
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"fai_band must be [H_lo, H_hi] with 0 <= H_lo <= H_hi, got {self.fai_band}")
        self.fai_band = [int(x) for x in lo_hi]
        if self.waad_window < 1:
            raise ValueError(f"waad_window must be >= 1, got {self.waad_window}")
        for name in ("top_q", "alpha", "waad_quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.head_quantile <= 0.5:
            raise ValueError(f"head_quantile must be in (0, 0.5], got {self.head_quantile}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.gamma_amp < 1.0:
            raise ValueError(f"gamma_amp must be >= 1, got {self.gamma_amp}")
        if self.rank not in ("top", "bottom"):
            raise ValueError(f"rank must be top or bottom, got {self.rank!r}")


# --- pure functions on [B, T] tensors (unit-tested on hand-built statistics) ------------------

def top_q_mask(x: Tensor, resp: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """(mask of the top-q tokens of each row's response, the per-row threshold).

    Keeps x ≥ the ⌈q·n⌉-th largest response value (ties kept); a row whose response values
    are all equal, or that has no response, selects nothing (threshold +inf)."""
    resp = resp.bool()
    n = resp.sum(-1)
    k = torch.ceil(n.double() * q - 1e-9).long().clamp(min=1)
    vals = torch.where(resp, x.float(), torch.tensor(float("-inf")))
    ordered = vals.sort(-1, descending=True).values
    thr = ordered.gather(-1, (k - 1).clamp(max=x.shape[-1] - 1)[:, None])[:, 0]
    hi = vals.max(-1).values
    lo = torch.where(resp, x.float(), torch.tensor(float("inf"))).min(-1).values
    informative = (n > 0) & (hi > lo) & (q > 0)
    thr = torch.where(informative, thr, torch.tensor(float("inf")))
    return resp & (x.float() >= thr[:, None]), thr


def row_quantile(x: Tensor, resp: Tensor, q: float) -> Tensor:
    """Per-row q-quantile of x over the response, the lower value (q=0.5: the lower median)."""
    resp = resp.bool()
    n = resp.sum(-1)
    ordered = torch.where(resp, x.float(), torch.tensor(float("inf"))).sort(-1).values
    idx = torch.floor((n - 1).clamp(min=0).double() * q).long()
    return ordered.gather(-1, idx[:, None])[:, 0]


def head_groups(distance: Tensor, resp: Tensor, quantile: float) -> tuple[Tensor, Tensor, Tensor]:
    """(local head indices, global head indices, mean look-back distance per head).

    distance: [B, P, T] over a pool of P heads (all query heads of the selected layers).
    A head's distance is averaged over every response token of the batch."""
    w = resp.float()[:, None, :]
    d = (distance.float() * w).sum((0, 2)) / w.sum().clamp(min=1.0)
    n = max(1, int(math.floor(quantile * d.numel() + 0.5)))
    order = torch.argsort(d, stable=True)
    return order[:n], order[-n:], d


def next_delta(waad: Tensor, resp: Tensor) -> Tensor:
    """Δ_t = |WAAD_t − WAAD_{t+1}| where t and t+1 are response tokens; else 0 (the last token)."""
    resp = resp.bool()
    nxt = torch.zeros_like(resp)
    nxt[:, :-1] = resp[:, 1:]
    delta = torch.zeros_like(waad, dtype=torch.float32)
    delta[:, :-1] = (waad[:, :-1] - waad[:, 1:]).abs().float()
    return torch.where(resp & nxt, delta, torch.zeros_like(delta))


@dataclass
class TokenSets:
    """Per-token statistics and selections of one batch ([B, T]; False/0 off the response)."""
    waad: Tensor
    fai: Tensor
    delta: Tensor
    preplan: Tensor
    anchor: Tensor
    dominated: Tensor
    intro: Tensor


def token_sets(waad: Tensor, fai: Tensor, resp: Tensor, p: PreplanAnchorParams) -> TokenSets:
    """T_loc, T_glob, D and I(D) of papers.md §1.7 from head-averaged WAAD and FAI."""
    resp = resp.bool()
    delta = next_delta(waad, resp)
    preplan, delta_thr = top_q_mask(delta, resp, p.top_q)
    if p.delta_top_q is not None and p.delta_top_q != p.top_q:
        delta_thr = top_q_mask(delta, resp, p.delta_top_q)[1]
    anchor = top_q_mask(fai, resp, p.top_q)[0] & (fai > 0)
    if p.rank == "bottom":  # the ablation: the lowest Δ and FAI instead (τ_Δ stays the top's)
        preplan = top_q_mask(-delta, resp, p.top_q)[0]
        anchor = top_q_mask(-fai.float(), resp & (fai > 0), p.top_q)[0]
    waad_thr = row_quantile(waad, resp, p.waad_quantile)
    # Δ of the k tokens before each t, earliest first, -inf where that token is not response.
    T = waad.shape[-1]
    prev = torch.full((p.k,) + tuple(waad.shape), float("-inf"))
    for i, j in enumerate(range(p.k, 0, -1)):  # i = 0 ↔ u = t - k
        if j < T:
            prev[i, :, j:] = torch.where(resp[:, :-j], delta[:, :-j], torch.tensor(float("-inf")))
    best, arg = prev.max(0)  # first maximum = the earliest u on ties
    dominated = anchor & (waad.float() <= waad_thr[:, None]) & (best >= delta_thr[:, None])
    intro = torch.zeros_like(resp)
    b, t = dominated.nonzero(as_tuple=True)
    intro[b, t - (p.k - arg[b, t])] = True
    return TokenSets(waad=torch.where(resp, waad.float(), torch.zeros(())),
                     fai=torch.where(resp, fai.float(), torch.zeros(())), delta=delta,
                     preplan=preplan, anchor=anchor, dominated=dominated, intro=intro & resp)


def gamma_from_sets(strategy: str, s: TokenSets, p: PreplanAnchorParams) -> Tensor:
    """γ of papers.md §1.8 (1 off the selected tokens)."""
    b = p.gamma_amp - 1.0
    if strategy == "local_chunk":
        return 1.0 + b * s.preplan.float()
    if strategy == "global_anchor":
        return 1.0 + b * s.anchor.float()
    if strategy == "coupled":
        return (1.0 + b * (s.anchor & ~s.dominated).float() + (1 - p.alpha) * b * s.dominated.float()
                + p.alpha * b * s.intro.float())
    raise ValueError(f"not an attention strategy: {strategy!r}")


def pooled_heads(attn_stats: dict, name: str) -> Tensor:
    """One statistic of every captured layer as [B, P, T], P = layers × query heads."""
    return torch.cat([attn_stats[layer][name].float() for layer in sorted(attn_stats)], dim=1)


@dataclass
class CreditTrace:
    """What the last batch's credit was made of, for sample tables and `launch.inspect`."""
    sets: TokenSets | None
    gamma: Tensor
    selected: Tensor
    local_heads: list[int]
    global_heads: list[int]
    head_distance: Tensor | None = None  # [P] each pooled head's mean look-back distance


def attention_credit(attn_stats: dict, resp: Tensor, strategy: str, p: PreplanAnchorParams):
    """γ [B, T] and its trace from the scoring forward's statistics {layer: {name: [B, H, T]}}."""
    local, glob, d = head_groups(pooled_heads(attn_stats, "distance"), resp, p.head_quantile)
    waad = pooled_heads(attn_stats, "waad")[:, local].mean(1)
    fai = pooled_heads(attn_stats, "fai")[:, glob].mean(1)
    sets = token_sets(waad, fai, resp, p)
    gamma = gamma_from_sets(strategy, sets, p)
    selected = {"local_chunk": sets.preplan, "global_anchor": sets.anchor,
                "coupled": sets.anchor | sets.intro}[strategy]
    return gamma, CreditTrace(sets, gamma, selected, local.tolist(), glob.tolist(), d), d


def _jaccard(a: list[int], b: list[int] | None) -> float:
    if b is None:
        return float("nan")
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(1, len(sa | sb))


@register(*STRATEGIES)
class PreplanAnchorCredit(CreditMethod):
    """The three attention strategies and the random / entropy baselines (same TopQ, same γ_amp)."""

    Params = PreplanAnchorParams
    BASELINE = {"top_q", "gamma_amp", "positive_only"}
    ANCHOR = BASELINE | {"waad_window", "fai_band", "head_quantile", "rank"}

    @classmethod
    def keys(cls, strategy: str) -> set[str]:
        if strategy in ("random", "entropy"):
            return cls.BASELINE
        if strategy in ("local_chunk", "global_anchor"):
            return cls.ANCHOR  # (their sets do not read coupled's alpha, k, waad_quantile, delta_top_q)
        return super().keys(strategy)

    def __init__(self, strategy, params, seed=0, stats_layers="middle:5"):
        super().__init__(strategy, params, seed, stats_layers)
        self.prev_heads: tuple[list[int], list[int]] | None = None
        self.trace: CreditTrace | None = None

    def stats_request(self) -> dict | None:
        if self.strategy not in ATTENTION_STRATEGIES:
            return None
        return {"distance": True, "waad_window": self.p.waad_window, "fai_band": list(self.p.fai_band)}

    def weights(self, batch: RolloutBatch, stats: dict | None, step: int) -> dict[str, float]:
        p, resp = self.p, batch.response_mask.bool()
        metrics: dict[str, float] = {}
        if self.strategy in ATTENTION_STRATEGIES:
            if stats is None:
                raise RuntimeError(f"credit={self.strategy} needs attention statistics from the scoring forward")
            gamma, trace, d = attention_credit(stats, resp, self.strategy, p)
            s = trace.sets
            n = resp.sum().clamp(min=1).item()
            metrics.update({
                "preplan_share": s.preplan.sum().item() / n,
                "anchor_share": s.anchor.sum().item() / n,
                "dominated_share": s.dominated.sum().item() / n,
                "intro_share": s.intro.sum().item() / n,
                "local_heads_jaccard": _jaccard(trace.local_heads, self.prev_heads and self.prev_heads[0]),
                "global_heads_jaccard": _jaccard(trace.global_heads, self.prev_heads and self.prev_heads[1]),
                "head_distance_local": d[trace.local_heads].mean().item(),
                "head_distance_global": d[trace.global_heads].mean().item(),
            })
            self.prev_heads = (trace.local_heads, trace.global_heads)
        else:
            if self.strategy == "random":
                gen = torch.Generator().manual_seed(stable_hash("credit", self.seed, step) % 2**63)
                score = torch.rand(resp.shape, generator=gen)
            else:
                if batch.entropy is None:
                    raise RuntimeError("credit=entropy needs the scoring forward's entropy")
                score = batch.entropy
            selected = top_q_mask(score, resp, p.top_q)[0]
            gamma = 1.0 + (p.gamma_amp - 1.0) * selected.float()
            trace = CreditTrace(None, gamma, selected, [], [])
        if p.positive_only:
            if batch.seq_advantages is None:
                raise RuntimeError("positive_only needs the per-response advantages before credit")
            gamma = torch.where(batch.seq_advantages[:, None] >= 0, gamma, torch.ones_like(gamma))
        gamma = torch.where(resp, gamma, torch.ones_like(gamma))
        batch.token_weights = batch.token_weights * gamma
        trace.gamma = gamma
        self.trace = trace
        g = gamma[resp]
        if g.numel():
            metrics.update({
                "selected_share": trace.selected[resp].float().mean().item(),
                "amplified_share": (g > 1).float().mean().item(),
                "gamma_mean": g.mean().item(),
                "gamma_max": g.max().item(),
                "gamma_p90": g.quantile(0.9).item(),
            })
        return metrics
