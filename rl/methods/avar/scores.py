"""AVAR's attention quantities (arXiv 2603.03825, shared specs/papers.md §3) from key-class masses.

Every quantity reads `mass[layer]`: [B, H, N, 2] from the fused kernels (padded layout), where
mass[b, h, i, EVIDENCE] = Σ_{k ∈ evidence} A^{l,h}_{i,k} and mass[..., SYSTEM] the same over the
system keys. No N×N map is ever built: these are the attention outputs of indicator values
(specs §4.2 item 4). The functions are pure, so each is tested against an eager-map float64
reference (tests/unit/test_avar_scores.py).

* `vas`       — the diagnostic: mean over layers, heads and query tokens i ∈ U of the ratio
                mass_evidence / mass_system (§3.1, a mean of ratios).
* `vas_pooled` — the headline: Σ mass_evidence / Σ mass_system over the same (layer, head,
                query) cells (the authors' aggregation in their reward code), and the evidence
                share Σ m_e / (Σ m_e + Σ m_s) ∈ [0, 1]; overall and per layer. A mean of ratios
                is ruled by cells whose system mass is ~0 (no attention sink among the system
                keys): 1e10 on the tiny VLM, where these read as fractions.
* `r_visual`  — VARS's reward (§3.3.3): per response token and layer, the ratio of the
                head-averaged masses with ε, averaged over layers then tokens; 0 when wrong.
* `agto_loss` — the cold start's attention terms (§3.3.2), differentiable through the masses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rl.batch import TOKEN_CLASS

EVIDENCE, SYSTEM = 0, 1   # AVAR key-class ids handed to the kernels (others: -1)
N_CLASSES = 2
EVIDENCE_CLASSES = ("evidence", "image")  # the values of `avar.evidence`


SYSTEM_SETS = ("instruction", "template_prefix:<share>")  # the values of `avar.system`


def system_prefix_share(system: str) -> float | None:
    """`avar.system` → None for `instruction`, s for `template_prefix:s` (0 < s < 1)."""
    if system == "instruction":
        return None
    name, _, share = system.partition(":")
    try:
        value = float(share)
    except ValueError:
        value = -1.0
    if name != "template_prefix" or not 0 < value < 1:
        raise ValueError(f"avar.system={system!r}: must be one of {SYSTEM_SETS} (e.g. "
                         "template_prefix:0.4, the authors' share)")
    return value


def key_classes(token_classes: Tensor, evidence: str = "evidence", system: str = "instruction",
                attention_mask: Tensor | None = None) -> Tensor:
    """Task token classes (rl.batch.TOKEN_CLASS) → AVAR key classes: the evidence class
    (operands/relevant statements for a text task, image-pad tokens for a VLM) → EVIDENCE,
    the system set → SYSTEM, every other token → -1 (no class).

    The system set (`avar.system`): `instruction`, the task's instruction tokens; or
    `template_prefix:s`, the first ⌊s·n⌋ (at least 1) of a row's n prompt tokens whatever they
    are — the authors' set (the template from the sequence start, in RL the first 20% of the
    prompt), which holds the first token, a real model's attention sink. Evidence tokens in the
    prefix stay evidence. `attention_mask` ([B, N]; needed for a prefix) marks padding."""
    if evidence not in EVIDENCE_CLASSES:
        raise ValueError(f"avar.evidence={evidence!r}: must be one of {EVIDENCE_CLASSES}")
    share = system_prefix_share(system)
    out = torch.full(token_classes.shape, -1, dtype=torch.int8)
    if share is None:
        out[token_classes == TOKEN_CLASS["system"]] = SYSTEM
    else:
        if attention_mask is None:
            raise ValueError("key_classes: a template_prefix system set needs the attention mask")
        prompt = attention_mask.bool() & (token_classes != TOKEN_CLASS["response"])
        n = (prompt.sum(1, keepdim=True).double() * share).floor().clamp_min(1)
        out[prompt & (prompt.cumsum(1) <= n)] = SYSTEM
    out[token_classes == TOKEN_CLASS[evidence]] = EVIDENCE
    return out


def user_query_mask(token_classes: Tensor, attention_mask: Tensor, response_mask: Tensor,
                    kc: Tensor | None = None) -> Tensor:
    """The user-turn tokens Q (AVAR's official code, specs §3.3.2): prompt tokens after the
    last system token, up to the response. Evidence (image-pad) tokens are part of it. The
    system tokens are those of the AVAR key classes `kc` when given (e.g. a template prefix),
    else the instruction."""
    prompt = attention_mask.bool() & ~response_mask.bool() & (token_classes != TOKEN_CLASS["response"])
    pos = torch.arange(token_classes.shape[1]).expand_as(token_classes)
    is_sys = (kc == SYSTEM) if kc is not None else (token_classes == TOKEN_CLASS["system"])
    last_sys = torch.where(is_sys, pos, torch.full_like(pos, -1)).max(1, keepdim=True).values
    return prompt & (pos > last_sys)


def check_classes(kc: Tensor, where: str) -> None:
    """AVAR contrasts two segments: a row without either has no defined ratio."""
    for cls, name in ((EVIDENCE, "evidence"), (SYSTEM, "system")):
        missing = ~(kc == cls).any(1)
        if missing.any():
            raise ValueError(f"{where}: {int(missing.sum())} of {kc.shape[0]} rows have no "
                             f"{name} tokens; AVAR needs a task that labels both 'system' and "
                             f"the evidence segments (Sample.segments)")


def _stack(mass: dict[int, Tensor]) -> Tensor:
    """{layer: [B, H, N, 2]} → [L, B, H, N, 2] in float64 (ratios of small masses)."""
    return torch.stack([mass[layer].double() for layer in sorted(mass)])


def vas(mass: dict[int, Tensor], query: Tensor) -> Tensor:
    """Per row, the mean over layers, heads and query tokens (query: [B, N] bool) of
    mass_evidence / mass_system. Rows with no query token get NaN. Per layer as well:
    returns (per_row [B], per_layer [L, B])."""
    m = _stack(mass)
    ratio = m[..., EVIDENCE] / m[..., SYSTEM].clamp_min(torch.finfo(torch.float64).tiny)
    q = query.to(ratio.dtype)
    per_layer = (ratio * q[None, :, None, :]).sum((2, 3)) / (q.sum(1) * m.shape[2])  # [L, B]
    return per_layer.mean(0), per_layer


class PooledVas(NamedTuple):
    ratio: Tensor           # [B] Σ m_evidence / Σ m_system over layers, heads, query tokens
    share: Tensor           # [B] Σ m_evidence / (Σ m_evidence + Σ m_system), in [0, 1]
    ratio_by_layer: Tensor  # [L, B] the same sums within each layer
    share_by_layer: Tensor  # [L, B]
    mass_by_layer: Tensor   # [L, B, 2] the mean over heads and query tokens of the attention
                            # on the evidence / system keys (whether a share moved by one side)


def vas_pooled(mass: dict[int, Tensor], query: Tensor) -> PooledVas:
    """Per row (and per layer), the pooled ratio and the evidence share of the masses over
    heads and query tokens (query: [B, N] bool). Rows with no query token get NaN."""
    m = _stack(mass)
    q = query.to(m.dtype)[None, :, None, :, None]
    sums = (m * q).sum((2, 3))                                        # [L, B, 2]
    e, s = sums[..., EVIDENCE], sums[..., SYSTEM]
    tiny = torch.finfo(torch.float64).tiny
    none = ~query.any(1)

    def rows(x: Tensor) -> Tensor:
        return x.masked_fill(none, float("nan"))

    cells = (query.sum(1) * m.shape[2]).to(m.dtype)[None, :, None]   # heads × query tokens
    return PooledVas(rows(e.sum(0) / s.sum(0).clamp_min(tiny)),
                     rows(e.sum(0) / (e + s).sum(0).clamp_min(tiny)),
                     rows(e / s.clamp_min(tiny)), rows(e / (e + s).clamp_min(tiny)),
                     (sums / cells).masked_fill(none[None, :, None], float("nan")))


def visual_ratio(mass: dict[int, Tensor], eps: float = 1e-6) -> Tensor:
    """Per token [B, N]: (1/|L|) Σ_l Ā^l_evidence / (Ā^l_system + ε), Ā the head-averaged
    attention of layer l — what VARS averages over a response (and inspect --vas draws)."""
    m = _stack(mass).mean(2)                                          # [L, B, N, 2] head average
    return (m[..., EVIDENCE] / (m[..., SYSTEM] + eps)).mean(0)


def r_visual(mass: dict[int, Tensor], response: Tensor, correct: Tensor, eps: float = 1e-6) -> Tensor:
    """VARS (§3.3.3): (1/|T|) Σ_t visual_ratio_t over the response tokens; 0 for an incorrect
    response (or one with no tokens)."""
    ratio = visual_ratio(mass, eps)
    r = response.to(ratio.dtype)
    per_row = (ratio * r).sum(1) / r.sum(1).clamp_min(1)
    return (per_row * correct.to(per_row.dtype)).float()


def normalise_visual(r: Tensor, correct: Tensor, group_ids: Tensor, mode: str, clip: float) -> Tensor:
    """The §3.3.3 scale warning's options. `none`: raw. `clip`: min(r, clip). `group_z`: within
    each group, z-scored over its *correct* responses (incorrect stay 0, so the correctness
    gate holds; a group with < 2 correct responses gets 0)."""
    if mode == "none":
        return r
    if mode == "clip":
        return r.clamp(max=clip)
    if mode != "group_z":
        raise ValueError(f"avar.vars_norm={mode!r}: must be none | clip | group_z")
    out = torch.zeros_like(r)
    ok = correct.bool()
    for g in group_ids.unique():
        sel = (group_ids == g) & ok
        if sel.sum() >= 2:
            x = r[sel].double()
            out[sel] = ((x - x.mean()) / x.std(unbiased=False).clamp_min(1e-6)).float()
    return out


@dataclass(frozen=True)
class AgtoConfig:
    """The cold start's attention terms (avar=agto|agto_vars), weights from `avar:`."""
    alpha: float = 0.15
    beta: float = 0.15
    layers: Any = "all"
    eps: float = 1e-6
    evidence: str = "evidence"
    system: str = "instruction"


def agto_loss(mass: dict[int, Tensor], query: Tensor, kc: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(L_img, L_sys) of §3.3.2 per row [B] (the batch loss is their mean):

        L_img = −(1/|L|) Σ_l (1/H) Σ_h log( (1/(|Q||K_img|)) Σ_{q∈Q} Σ_{k∈K_img} A_{q,k} )
        L_sys = +(1/|L|) Σ_l (1/H) Σ_h log( (1/(|Q||K_sys|)) Σ_{q∈Q} Σ_{k∈K_sys} A_{q,k} + ε )

    `mass` carries gradient (kernels' `grad_mass`); query: [B, N] bool (Q); kc: AVAR key
    classes [B, N] (|K_img|, |K_sys| per row)."""
    m = torch.stack([mass[layer].float() for layer in sorted(mass)])  # [L, B, H, N, 2]
    q = query.to(m.dtype)[None, :, None, :]
    n_q = query.sum(1).to(m.dtype).clamp_min(1)[None, :, None]        # [1, B, 1]
    mean_q = (m * q[..., None]).sum(3) / n_q[..., None]              # [L, B, H, 2]
    k_img = (kc == EVIDENCE).sum(1).to(m.dtype)[None, :, None]
    k_sys = (kc == SYSTEM).sum(1).to(m.dtype)[None, :, None]
    l_img = -torch.log(mean_q[..., EVIDENCE] / k_img).mean((0, 2))    # [B]
    l_sys = torch.log(mean_q[..., SYSTEM] / k_sys + eps).mean((0, 2))
    return l_img, l_sys
