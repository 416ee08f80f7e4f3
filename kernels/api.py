"""The one public entry point: `attention(q, k, v, ..., stats=spec)`.

It dispatches to one of three implementations that compute the same thing:

* ``"reference"`` -- materialised p (float32, or float64 for float64 input), plain autograd;
  ground truth for tests, O(N^2) memory;
* ``"blockwise"`` -- pure PyTorch, query-chunked (the CPU path);
* ``"triton"``    -- fused kernels (the GPU path; on CPU only under TRITON_INTERPRET=1).

``"auto"`` picks triton on CUDA tensors and blockwise otherwise. The blockwise and triton
paths run inside one `torch.autograd.Function` (forward saves out and lse; backward
recomputes p per block), so training backpropagates through them; statistics are
detached side outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import blockwise
from .reference import reference_attention
from .spec import AttnStats, SeqLayout, StatsSpec, check_side_inputs, fai_count, make_layout, stat_shape

IMPLS = ("reference", "blockwise", "triton")

# Tests switch this on: every buffer a backend must write starts as NaN, so an element it
# forgets to write fails the comparison instead of silently reading 0.
POISON = False


def _alloc(shape, dtype, device) -> Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _zero_padding_(layout: SeqLayout, tensors) -> None:
    """Padding slots (padded layout only) read 0; backends need not touch them."""
    if layout.packed or bool((layout.lens == layout.n_storage).all()):
        return
    idx = torch.arange(layout.n_storage, device=layout.lens.device)
    pad = (idx < layout.starts[:, None]) | (idx >= (layout.starts + layout.lens)[:, None])  # [B, N]
    for t in tensors:
        m = pad[:, None, :]  # [B, 1, N] against [B, H, N, ...]
        t.masked_fill_(m.view(m.shape + (1,) * (t.dim() - 3)), 0)


def resolve_impl(impl: str, x: Tensor) -> str:
    if impl == "auto":
        return "triton" if x.is_cuda else "blockwise"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or 'auto', got {impl!r}")
    return impl


def _backend(impl: str):
    if impl == "blockwise":
        return blockwise
    from . import triton_backend  # imported lazily: CPU users never need triton

    return triton_backend


class _Attention(torch.autograd.Function):
    """Autograd wrapper around a backend's forward/backward (blockwise or triton).

    `holder` (a dict) receives the statistics tensors; when the FAI column statistic is
    deferred to the backward, ``holder['fai_sum']`` is filled in place there.
    """

    @staticmethod
    def forward(ctx, q, k, v, layout: SeqLayout, scale: float, spec, backend, defer_fai: bool, holder: dict):
        hq = q.shape[-2] if layout.packed else q.shape[1]
        out = _alloc(q.shape[:-1] + (v.shape[-1],), q.dtype, q.device)
        shape = stat_shape(layout, hq)
        st = {"lse": _alloc(shape, torch.float32, q.device)}
        if spec is not None:
            for name, on in (("entropy", spec.entropy), ("distance", spec.distance),
                             ("waad", spec.waad_window is not None), ("fai_sum", spec.fai_band is not None)):
                if on:
                    st[name] = _alloc(shape, torch.float32, q.device)
            if spec.n_classes:
                st["mass"] = _alloc(shape + (spec.n_classes,), torch.float32, q.device)
        col_pass = spec is not None and spec.fai_band is not None and not defer_fai
        backend.forward(q, k, v, layout, scale, spec, out, st, col_pass)
        _zero_padding_(layout, [out, *(t for n, t in st.items() if n != "fai_sum" or col_pass)])
        if defer_fai:
            st["fai_sum"].fill_(float("nan"))  # filled by the backward; NaN until then
        ctx.save_for_backward(q, k, v, out, st["lse"])
        ctx.layout, ctx.scale, ctx.spec, ctx.backend = layout, scale, spec, backend
        ctx.fai_sum = st["fai_sum"] if defer_fai else None
        holder.update(st)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        layout = ctx.layout
        dq, dk, dv = (_alloc(x.shape, x.dtype, x.device) for x in (q, k, v))
        ctx.backend.backward(do.contiguous(), q, k, v, out, lse, layout, ctx.scale, ctx.spec, dq, dk, dv, ctx.fai_sum)
        _zero_padding_(layout, [dq, dk, dv] + ([ctx.fai_sum] if ctx.fai_sum is not None else []))
        return dq, dk, dv, None, None, None, None, None, None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    stats: StatsSpec | None = None,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, AttnStats]:
    """Causal (GQA) attention; with `stats`, also the per-token statistics.

    Layouts (see `kernels.spec`): padded q [B, Hq, N, d] with optional attention_mask
    [B, N], or packed q [T, Hq, d] with cu_seqlens [S + 1]. fp16/bf16/fp32 inputs,
    fp32 accumulation. Returns `out` (same layout and dtype as q), or `(out, AttnStats)`
    when `stats` is given. Statistics are fp32 and carry no gradient.
    """
    if not causal:
        raise NotImplementedError("only causal attention is implemented (every statistic assumes it)")
    layout = make_layout(q, k, v, cu_seqlens, attention_mask)
    check_side_inputs(layout, stats)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    impl = resolve_impl(impl, q)
    if impl == "reference":
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, st = reference_attention(q, k, v, cu_seqlens=cu_seqlens, attention_mask=attention_mask, scale=scale,
                                      stats=stats, dtype=dt)
        out = out.to(q.dtype)
        if stats is None:
            return out
        return out, AttnStats(**{n: t.float() for n, t in vars(st).items() if t is not None})
    defer = (stats is not None and stats.fai_band is not None and stats.fai_in_backward
             and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    holder: dict = {}
    out = _Attention.apply(q, k, v, layout, scale, stats, _backend(impl), defer, holder)
    if stats is None:
        return out
    st = AttnStats(**holder)
    if stats.fai_band is not None:
        st.fai_count = fai_count(layout, stats, q.device)
    return out, st


def key_class_mass(
    q: Tensor,
    k: Tensor,
    key_classes: Tensor,
    n_classes: int,
    *,
    cu_seqlens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Differentiable attention mass on key classes (AVAR's cold-start loss, spec §4).

    mass[..., c] = sum_{j: class_j = c} p_ij, computed as an attention output whose value
    vectors are class indicators, so gradients flow into q and k in O(N) memory.
    Returns [B, Hq, N, C] (padded) or [T, Hq, C] (packed), in q's dtype.
    """
    if not 1 <= n_classes <= q.shape[-1]:
        raise ValueError(f"n_classes must be in [1, head_dim], got {n_classes}")
    layout = make_layout(q, k, k, cu_seqlens, attention_mask)
    check_side_inputs(layout, StatsSpec(key_classes=key_classes, n_classes=n_classes))
    onehot = torch.stack([key_classes == c for c in range(n_classes)], -1).to(q.dtype)  # [B, N, C] or [T, C]
    onehot = torch.nn.functional.pad(onehot, (0, q.shape[-1] - n_classes))  # to head_dim: one kernel shape
    if layout.packed:
        vind = onehot[:, None, :].expand(-1, k.shape[1], -1)
    else:
        vind = onehot[:, None].expand(-1, k.shape[1], -1, -1)
    out = attention(q, k, vind.contiguous(), cu_seqlens=cu_seqlens, attention_mask=attention_mask, scale=scale, impl=impl)
    return out[..., :n_classes]
