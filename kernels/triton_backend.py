"""Launchers: the Triton path behind `kernels.attention` (same interface as blockwise.py).

forward: the fused forward (statistics behind the STATS constexpr), then, when FAI is
asked for in a no-grad pass, the standalone band column pass. backward: dK/dV (+ the FAI
column statistic when it was deferred to the backward) and dQ.

Under the interpreter bf16 is broken (Triton 3.9: garbage dots, NaN elementwise), so
there bf16 inputs are computed in fp32 and cast back; on GPU bf16 runs natively.
"""

from __future__ import annotations

import torch
import triton

from .spec import SeqLayout, StatsSpec
from .triton_bwd import _attn_bwd_dkdv, _attn_bwd_dq
from .triton_col import _attn_col
from .triton_fwd import _attn_fwd
from .triton_util import (INTERPRET, LOG2E, bwd_blocks, col_blocks, dot_precision, len_bucket, side_strides,
                          stat_strides, tok_strides)


def _prep(*xs):
    """Last dim contiguous; bf16 upcast under the interpreter."""
    out = []
    for x in xs:
        if INTERPRET and x.dtype == torch.bfloat16:
            x = x.float()
        out.append(x if x.stride(-1) == 1 else x.contiguous())
    return out


def _seq(layout: SeqLayout, device):
    return layout.starts.to(device, torch.int32).contiguous(), layout.lens.to(device, torch.int32).contiguous()


def _check(q, k):
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"triton path: head_dim must be a power of two in [16, 256], got {d}")


def forward(q, k, v, layout: SeqLayout, scale: float, spec: StatsSpec | None, out, st: dict, col_pass: bool):
    _check(q, k)
    packed = layout.packed
    out_dtype = out.dtype
    q, k, v = _prep(q, k, v)
    out_k = out if out.dtype == q.dtype else torch.empty(out.shape, dtype=q.dtype, device=out.device)
    starts, lens = _seq(layout, q.device)
    hq, hkv = (q.shape[1], k.shape[1])
    lse = st["lse"]
    ent, dist, waad, mass = st.get("entropy", lse), st.get("distance", lse), st.get("waad", lse), st.get("mass")
    n_cls = spec.n_classes if spec is not None else 0
    cls = spec.key_classes.clamp(-1, 127).to(torch.int8).contiguous() if n_cls else starts
    stats_on = spec is not None and any(n != "lse" and n != "fai_sum" for n in st)
    qk_scale = scale * LOG2E
    grid = lambda meta: (triton.cdiv(layout.max_len, meta["BLOCK_M"]), hq, layout.n_seqs)
    _attn_fwd[grid](
        q, k, v, out_k, lse, ent, dist, waad, mass if mass is not None else lse, cls, starts, lens, qk_scale,
        *tok_strides(q, packed), *tok_strides(k, packed), *tok_strides(v, packed), *tok_strides(out_k, packed),
        *stat_strides(lse, packed), *(stat_strides(mass, packed) if mass is not None else (0, 0, 0)),
        *(side_strides(cls, packed) if n_cls else (0, 0)), len_bucket(layout.max_len),
        GROUP=hq // hkv, HEAD_DIM=q.shape[-1], STATS=stats_on,
        ENTROPY=stats_on and spec.entropy, DIST=stats_on and spec.distance,
        WAAD_W=int(spec.waad_window or 0) if stats_on else 0, N_CLASSES=n_cls if stats_on else 0,
        C_PAD=max(2, triton.next_power_of_2(max(n_cls, 1))), DOT_PREC=dot_precision(q.dtype),
    )
    if out_k is not out:
        out.copy_(out_k.to(out_dtype))
    for name in ("entropy", "distance", "waad"):
        assert name not in st or st[name].stride() == lse.stride()
    if col_pass:
        column_pass(q, k, lse, layout, scale, spec, st["fai_sum"])


def column_pass(q, k, lse, layout: SeqLayout, scale: float, spec: StatsSpec, fai_sum):
    """Standalone FAI band column sums into `fai_sum` (stat layout, same strides as lse)."""
    packed = layout.packed
    q, k = _prep(q, k)
    starts, lens = _seq(layout, q.device)
    hq, hkv = q.shape[1], k.shape[1]
    resp = spec.response_mask
    resp_t = resp.to(torch.int8).contiguous() if resp is not None else starts
    blk = col_blocks(q.shape[-1], q.dtype)
    grid = (triton.cdiv(layout.max_len, blk["BLOCK_N"]), hq, layout.n_seqs)
    assert fai_sum.stride() == lse.stride()
    _attn_col[grid](
        q, k, lse, resp_t, fai_sum, starts, lens, scale * LOG2E, int(spec.fai_band[0]), int(spec.fai_hi),
        *tok_strides(q, packed), *tok_strides(k, packed), *stat_strides(lse, packed),
        *(side_strides(resp_t, packed) if resp is not None else (0, 0)),
        GROUP=hq // hkv, HEAD_DIM=q.shape[-1], HAS_RESP=resp is not None, DOT_PREC=dot_precision(q.dtype),
        BLOCK_M=blk["BLOCK_M"], BLOCK_N=blk["BLOCK_N"], num_warps=blk["num_warps"], num_stages=blk["num_stages"],
    )


def backward(do, q, k, v, out, lse, layout: SeqLayout, scale: float, spec: StatsSpec | None, dq, dk, dv, fai_sum):
    packed = layout.packed
    grads = (dq, dk, dv)
    q, k, v, do, out = _prep(q, k, v, do, out)
    dq_k, dk_k, dv_k = (g if g.dtype == q.dtype else torch.empty(g.shape, dtype=q.dtype, device=g.device) for g in grads)
    starts, lens = _seq(layout, q.device)
    hq, hkv = q.shape[1], k.shape[1]
    delta = (out.float() * do.float()).sum(-1)
    if not packed:
        delta = delta.contiguous()
    assert delta.stride() == lse.stride()
    col = fai_sum is not None
    resp = spec.response_mask if col else None
    resp_t = resp.to(torch.int8).contiguous() if resp is not None else starts
    blk = bwd_blocks(q.shape[-1], q.dtype)
    prec = dot_precision(q.dtype)
    ss = stat_strides(lse, packed)
    _attn_bwd_dkdv[(triton.cdiv(layout.max_len, blk["BLOCK_N1"]), hkv, layout.n_seqs)](
        q, k, v, do, dk_k, dv_k, lse, delta, resp_t, fai_sum if col else lse, starts, lens, scale, scale * LOG2E,
        int(spec.fai_band[0]) if col else 0, int(spec.fai_hi) if col else 0,
        *tok_strides(q, packed), *tok_strides(k, packed), *tok_strides(v, packed), *tok_strides(do, packed),
        *tok_strides(dk_k, packed), *tok_strides(dv_k, packed), *ss,
        *(side_strides(resp_t, packed) if resp is not None else (0, 0)),
        GROUP=hq // hkv, HEAD_DIM=q.shape[-1], COL=col, HAS_RESP=resp is not None, DOT_PREC=prec,
        BLOCK_M=blk["BLOCK_M1"], BLOCK_N=blk["BLOCK_N1"], num_warps=blk["num_warps"], num_stages=blk["num_stages"],
    )
    _attn_bwd_dq[(triton.cdiv(layout.max_len, blk["BLOCK_M2"]), hq, layout.n_seqs)](
        q, k, v, do, dq_k, lse, delta, starts, lens, scale, scale * LOG2E,
        *tok_strides(q, packed), *tok_strides(k, packed), *tok_strides(v, packed), *tok_strides(do, packed),
        *tok_strides(dq_k, packed), *ss,
        GROUP=hq // hkv, HEAD_DIM=q.shape[-1], DOT_PREC=prec,
        BLOCK_M=blk["BLOCK_M2"], BLOCK_N=blk["BLOCK_N2"], num_warps=blk["num_warps"], num_stages=blk["num_stages"],
    )
    for g, gk in zip(grads, (dq_k, dk_k, dv_k)):
        if gk is not g:
            g.copy_(gk)
