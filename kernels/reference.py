"""Ground truth: materialised attention, one sequence at a time, in float64 by default.

Written from the definitions (explicit p matrix, explicit masks, explicit band), with no
code shared with the fast paths, so that the tests compare independent computations.
It is O(N^2) in memory: for tests and small analyses only. Gradients come from plain
autograd through the float64 ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .spec import AttnStats, StatsSpec, check_side_inputs, make_layout, stat_shape


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    stats: StatsSpec | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, AttnStats | None]:
    """Causal attention in `dtype`; returns (out in `dtype`, statistics in `dtype` or None).

    Same layouts as `kernels.attention`; padding rows of `out` and of the statistics are 0.
    """
    layout = make_layout(q, k, v, cu_seqlens, attention_mask)
    check_side_inputs(layout, stats)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    hq, hkv = q.shape[-2] if layout.packed else q.shape[1], k.shape[-2] if layout.packed else k.shape[1]
    group = hq // hkv
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=dtype, device=q.device)
    shape = stat_shape(layout, hq)
    want = stats is not None
    acc = {}
    if want:
        names = ["lse"]
        names += ["entropy"] * stats.entropy + ["distance"] * stats.distance
        names += ["waad"] * (stats.waad_window is not None)
        names += ["fai_sum"] * (stats.fai_band is not None)
        acc = {n: torch.zeros(shape, dtype=dtype, device=q.device) for n in names}
        if stats.fai_band is not None:
            acc["fai_count"] = torch.zeros(shape[:-2] + shape[-1:] if not layout.packed else shape[:1], dtype=dtype, device=q.device)
        if stats.n_classes:
            acc["mass"] = torch.zeros(shape + (stats.n_classes,), dtype=dtype, device=q.device)

    pieces = []
    for s in range(layout.n_seqs):
        a, n = int(layout.starts[s]), int(layout.lens[s])
        if n == 0:
            continue
        if layout.packed:
            qs, ks, vs = (x[a : a + n].transpose(0, 1).to(dtype) for x in (q, k, v))  # [H, n, d]
        else:
            qs, ks, vs = (x[s, :, a : a + n].to(dtype) for x in (q, k, v))
        ks = ks.repeat_interleave(group, dim=0)
        vs = vs.repeat_interleave(group, dim=0)
        i = torch.arange(n, device=q.device)
        causal = i[:, None] >= i[None, :]  # [n(i), n(j)]
        logits = (qs @ ks.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~causal, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # [H, n]
        p = torch.exp(logits - lse[..., None])
        o = p @ vs  # [H, n, dv]
        pieces.append((s, a, n, o))
        if not want:
            continue
        with torch.no_grad():
            p = p.detach()
            rows = {"lse": lse.detach()}
            dist = (i[:, None] - i[None, :]).to(dtype).clamp(min=0)
            if stats.entropy:
                rows["entropy"] = -torch.special.xlogy(p, p).sum(-1)
            if stats.distance:
                rows["distance"] = (p * dist).sum(-1)
            if stats.waad_window is not None:
                rows["waad"] = (p * dist.clamp(max=stats.waad_window)).sum(-1)
            if stats.fai_band is not None:
                lo, hi = stats.fai_band
                hi = n if hi is None else hi
                band = causal & (dist >= lo) & (dist <= hi)
                if stats.response_mask is not None:
                    rm = stats.response_mask[a : a + n] if layout.packed else stats.response_mask[s, a : a + n]
                    band = band & rm.bool()[:, None]
                rows["fai_sum"] = (p * band).sum(-2)  # column sums [H, n]
                cnt = band.sum(0).to(dtype)
                if layout.packed:
                    acc["fai_count"][a : a + n] = cnt
                else:
                    acc["fai_count"][s, a : a + n] = cnt
            if stats.n_classes:
                cls = stats.key_classes[a : a + n] if layout.packed else stats.key_classes[s, a : a + n]
                onehot = torch.stack([(cls == c) for c in range(stats.n_classes)], -1).to(dtype)
                rows["mass"] = p @ onehot  # [H, n, C]
            for name, val in rows.items():
                if layout.packed:
                    acc[name][a : a + n] = val.transpose(0, 1)
                else:
                    acc[name][s, :, a : a + n] = val

    # assemble the output out of place so autograd sees every piece
    if pieces:
        idx_out = out.clone()
        for s, a, n, o in pieces:
            if layout.packed:
                idx_out = idx_out.index_put((torch.arange(a, a + n, device=q.device),), o.transpose(0, 1))
            else:
                idx_out = idx_out.index_put(
                    (torch.tensor([s], device=q.device)[:, None, None], torch.arange(hq, device=q.device)[None, :, None],
                     torch.arange(a, a + n, device=q.device)[None, None, :]),
                    o[None],
                )
        out = idx_out
    if not want:
        return out, None
    return out, AttnStats(**acc)
