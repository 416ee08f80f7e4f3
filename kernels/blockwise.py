"""The CPU path: pure PyTorch, O(N) memory for the output, O(chunk * N) for statistics.

The local pipeline runs on CPU, where the Triton interpreter is far too slow. This path:

* splits the input into dense causal *segments* (the whole batch when nothing is padded,
  else one sequence at a time: packed sequences and padded rows are sliced as views), so
  no padding mask is ever needed;
* computes out and lse with torch's fused CPU flash-attention op (in fp32; on CPU it is
  ~9x faster than any chunked softmax written in PyTorch, and its fp16 backward is very
  slow, so inputs are upcast), and the gradients with its backward op. Where that op is
  unavailable (non-CPU tensors, or FUSED = False) a query-chunked softmax does the same;
* computes the statistics in a second, query-chunked pass that recomputes
  p = exp(s - lse) for `chunk` rows at a time (chunk sized so that one [Hq, chunk, keys]
  fp32 block is about CHUNK_BYTES), renormalised by its own row sums: distance and
  key-class masses as one small matmul of p with [relative position, class indicators],
  WAAD and FAI only on the columns within reach of the window / band, entropy as
  -sum p log p.

A causal dense segment needs no masks beyond the diagonal block of each chunk, which is
why the padded case is sliced per row instead of masked.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from .spec import SeqLayout, StatsSpec

CHUNK_BYTES = 16 << 20
FUSED = True  # use aten's fused CPU attention for out / lse / grads when available
_NEG_INF = float("-inf")


def _chunk(n_heads_batch: int, n_keys: int) -> int:
    return int(max(16, min(1024, CHUNK_BYTES // max(1, 4 * n_heads_batch * n_keys))))


def _fused_ok(x: Tensor) -> bool:
    return FUSED and x.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _whole_batch(layout: SeqLayout) -> bool:
    """Padded rows that all start at index 0 (no padding, or right padding) are one dense
    segment: a real query row never sees a padding key (it lies in its future), padding rows
    are computed, kept out of FAI's rows (`_row_side`) and zeroed by the caller. One call
    over the batch instead of a Python loop over rows (≈ 10× faster for short rows)."""
    return not layout.packed and bool((layout.starts == 0).all())


def _zero_padding_rows(layout: SeqLayout, *xs: Tensor) -> tuple[Tensor, ...]:
    """For a right-padded whole batch: copies with padding rows set to 0, so that whatever the
    padding slots hold (garbage, NaN) cannot reach real rows through the padding rows' own
    attention (forward) or their output gradient (backward). Otherwise the inputs as they are."""
    if not _whole_batch(layout) or bool((layout.lens == layout.n_storage).all()):
        return xs
    idx = torch.arange(layout.n_storage, device=layout.lens.device)
    pad = (idx[None, :] >= layout.lens[:, None])[:, None, :, None]  # [B, 1, N, 1]
    return tuple(x.masked_fill(pad.to(x.device), 0) for x in xs)


def _row_side(layout: SeqLayout, spec: StatsSpec | None, sel) -> dict:
    """Per-row side inputs of a segment: response_mask and, for a right-padded whole batch,
    which rows are real tokens."""
    side = {}
    if spec is not None and spec.response_mask is not None:
        side["response_mask"] = sel(spec.response_mask, "side")
    if _whole_batch(layout) and not bool((layout.lens == layout.n_storage).all()):
        idx = torch.arange(layout.n_storage, device=layout.lens.device)
        side["row_valid"] = idx[None, :] < layout.lens[:, None]
    return side


def _segments(layout: SeqLayout):
    """Yield `select(x, kind)` functions mapping storage tensors to one dense causal
    segment: kind "tok" ([B,H,N,d] / [T,H,d] -> [b,H,n,d]), "stat" ([B,H,N,...] /
    [T,H,...] -> [b,H,n,...]) or "side" ([B,N] / [T] -> [b,n])."""
    if _whole_batch(layout):
        yield lambda x, kind: x
        return
    for s in range(layout.n_seqs):
        a, n = int(layout.starts[s]), int(layout.lens[s])
        if n == 0:
            continue
        if layout.packed:
            yield lambda x, kind, a=a, n=n: (x[a:a + n].unsqueeze(0) if kind == "side"
                                             else x[a:a + n].transpose(0, 1).unsqueeze(0))
        else:
            yield lambda x, kind, s=s, a=a, n=n: (x[s:s + 1, a:a + n] if kind == "side" else x[s:s + 1, :, a:a + n])


def _expand_kv(x: Tensor, group: int) -> Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def forward(q, k, v, layout: SeqLayout, scale: float, spec: StatsSpec | None, out, st: dict, col_pass: bool):
    """Fill `out` and the statistic tensors in `st` (lse always; others per spec;
    'fai_sum' only when col_pass)."""
    q, k, v = _zero_padding_rows(layout, q, k, v)
    for sel in _segments(layout):
        qs, ks, vs = sel(q, "tok"), sel(k, "tok"), sel(v, "tok")
        lse = sel(st["lse"], "stat")
        o, l = _out_lse(qs, ks, vs, scale)
        sel(out, "tok").copy_(o)
        lse.copy_(l)
        want = {n: sel(t, "stat") for n, t in st.items() if n != "lse" and (n != "fai_sum" or col_pass)}
        if want:
            side = _row_side(layout, spec, sel)
            if spec.key_classes is not None:
                side["key_classes"] = sel(spec.key_classes, "side")
            t0 = time.perf_counter()
            _stats(qs, ks, l, scale, spec, want, side)
            _charge_stats_time(time.perf_counter() - t0)


def _charge_stats_time(seconds: float) -> None:
    """Add the statistics pass's time to the active capture (on CPU it is a separate, timed pass)."""
    from .capture import active_capture  # lazy: capture imports this module through api

    cap = active_capture()
    if cap is not None and cap._result is not None:
        r = cap._result
        r.stats_seconds = seconds if math.isnan(r.stats_seconds) else r.stats_seconds + seconds


def _out_lse(q, k, v, scale):
    """(out fp32 [b,Hq,n,d], lse fp32 [b,Hq,n]) of dense causal attention."""
    g = q.shape[1] // k.shape[1]
    if _fused_ok(q):
        q32, k32, v32 = q.float(), _expand_kv(k.float(), g), _expand_kv(v.float(), g)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q32, k32, v32, 0.0, True, scale=scale)
    return _chunked_out_lse(q, k, v, scale)


def _chunked_out_lse(q, k, v, scale):
    """The same in plain ops, query-chunked (any device)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    kf, vf = k.float().unsqueeze(2), v.float().unsqueeze(2)  # [b,Hkv,1,n,d]
    out = torch.empty(b, hq, n, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    chunk = _chunk(b * hq, n)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        s = torch.matmul(q[:, :, r0:r1].float().reshape(b, hkv, hq // hkv, r1 - r0, d),
                         kf[..., :r1, :].transpose(-1, -2)).mul_(scale)
        s[..., r0:].masked_fill_(_future(r0, r1, q.device), _NEG_INF)
        lse_c = torch.logsumexp(s, -1, keepdim=True)
        p = s.sub_(lse_c).exp_()
        out[:, :, r0:r1] = torch.matmul(p, vf[..., :r1, :]).reshape(b, hq, r1 - r0, -1)
        lse[:, :, r0:r1] = lse_c.reshape(b, hq, r1 - r0)
    return out, lse


def _future(r0: int, r1: int, device) -> Tensor:
    """[c, c] True where key j > query i inside the diagonal block of rows r0..r1-1."""
    i = torch.arange(r1 - r0, device=device)
    return i[None, :] > i[:, None]


def _stats(q, k, lse, scale, spec: StatsSpec, want: dict, side: dict):
    """Row statistics and FAI column sums of one dense causal segment, chunked by rows."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    kf = k.float().unsqueeze(2)
    dev = q.device
    C = spec.n_classes if "mass" in want else 0
    dist_on = "distance" in want
    # value columns for one matmul with p: [class indicators..., (chunk start - j)]
    vals = None
    if C or dist_on:
        cols = [torch.stack([side["key_classes"] == c for c in range(C)], -1).float()] if C else []
        if dist_on:
            cols.append(torch.zeros(b, n, 1, device=dev))
        vals = torch.cat(cols, -1)[:, None, None]  # [b,1,1,n,C(+1)]
    W = spec.waad_window if "waad" in want else None
    fai = want.get("fai_sum")
    if fai is not None:
        fai.zero_()
        lo, hi = spec.fai_band[0], spec.fai_hi
        rows_ok = side["response_mask"].bool() if "response_mask" in side else torch.ones(b, n, dtype=torch.bool, device=dev)
        if "row_valid" in side:
            rows_ok = rows_ok & side["row_valid"].to(dev)
    jpos = torch.arange(n, device=dev, dtype=torch.float32)
    chunk = _chunk(b * hq, n)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        c = r1 - r0
        qc = q[:, :, r0:r1].float().reshape(b, hkv, g, c, d) * scale
        lp = torch.matmul(qc, kf[..., :r1, :].transpose(-1, -2))
        lp.sub_(lse[:, :, r0:r1].reshape(b, hkv, g, c, 1))  # log p
        fut = _future(r0, r1, dev)
        lp[..., r0:].masked_fill_(fut, _NEG_INF)
        p = torch.exp(lp) if "entropy" in want else lp.exp_()
        # The lse may come from another kernel (the fused op) whose rounding differs from
        # ours: every statistic is divided by our own row sum l (~1), which cancels that
        # error to first order, on the reduced results rather than on p (one pass fewer).
        l = p.sum(-1, keepdim=True)
        inv = 1.0 / l
        put = lambda name, x: want[name][:, :, r0:r1].copy_(x.reshape(want[name][:, :, r0:r1].shape))
        if vals is not None:
            if dist_on:
                vals[..., -1] = r0 - jpos  # sum_j p (i - j) = (i - r0) + sum_j p (r0 - j): no cancellation
            pv = torch.matmul(p, vals[..., :r1, :]).mul_(inv)
            if C:
                put("mass", pv[..., :C])
            if dist_on:
                put("distance", pv[..., -1] + torch.arange(c, device=dev, dtype=torch.float32))
        if W is not None:  # W - sum_{0 <= i-j < W} p (W - (i - j)): only W columns per row
            a = max(0, r0 - W + 1)
            t = (torch.arange(r0, r1, device=dev)[:, None] - torch.arange(a, r1, device=dev)[None, :])
            wt = torch.where((t >= 0) & (t < W), W - t, 0).float()
            put("waad", W - (p[..., a:r1] * wt).sum(-1) * inv[..., 0])
        if fai is not None and r1 - 1 - lo >= 0:  # columns j with some row i - j in [lo, hi]
            a, e = max(0, r0 - hi), r1 - lo
            t = torch.arange(r0, r1, device=dev)[:, None] - torch.arange(a, e, device=dev)[None, :]
            band = ((t >= lo) & (t <= hi))[None] & rows_ok[:, r0:r1, None]  # [b, c, cols]
            colsum = (p[..., a:e] * (band[:, None, None] * inv)).sum(-2)  # [b,Hkv,G,cols]
            fai[:, :, a:e] += colsum.reshape(b, hq, e - a)
        if "entropy" in want:  # log l - sum p log p / l; masked cells: p = 0, log p = -inf
            lp[..., r0:].masked_fill_(fut, 0.0)
            put("entropy", torch.log(l[..., 0]) - lp.mul_(p).sum(-1) * inv[..., 0])


def backward(do, q, k, v, out, lse, layout: SeqLayout, scale: float, spec: StatsSpec | None, dq, dk, dv, fai_sum):
    """Fill dq, dk, dv (and fai_sum when given: the FAI column statistic of the band)."""
    do, q, k, v = _zero_padding_rows(layout, do, q, k, v)
    for sel in _segments(layout):
        qs, ks, vs = sel(q, "tok"), sel(k, "tok"), sel(v, "tok")
        l = sel(lse, "stat")
        gq, gk, gv = _grads(sel(do, "tok"), qs, ks, vs, sel(out, "tok"), l, scale)
        sel(dq, "tok").copy_(gq)
        sel(dk, "tok").copy_(gk)
        sel(dv, "tok").copy_(gv)
        if fai_sum is not None:
            side = _row_side(layout, spec, sel)
            _stats(qs, ks, l, scale, spec, {"fai_sum": sel(fai_sum, "stat")}, side)


def _grads(do, q, k, v, out, lse, scale):
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if _fused_ok(q):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.float(), q.float(), _expand_kv(k.float(), g), _expand_kv(v.float(), g), out.float(), lse.contiguous(),
            0.0, True, scale=scale)
        if g > 1:
            dk = dk.reshape(b, hkv, g, n, d).sum(2)
            dv = dv.reshape(b, hkv, g, n, -1).sum(2)
        return dq, dk, dv
    return _chunked_grads(do, q, k, v, out, lse, scale)


def _chunked_grads(do, q, k, v, out, lse, scale):
    """FlashAttention's backward in plain ops, query-chunked (any device)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    kf, vf = k.float(), v.float()
    dq = torch.empty(b, hq, n, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(b, hkv, n, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(b, hkv, n, v.shape[-1], dtype=torch.float32, device=q.device)
    delta = (do.float() * out.float()).sum(-1)
    chunk = _chunk(b * hq, n)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        c = r1 - r0
        qc = q[:, :, r0:r1].float().reshape(b, hkv, g, c, d)
        doc = do[:, :, r0:r1].float().reshape(b, hkv, g, c, -1)
        p = torch.matmul(qc, kf[:, :, None, :r1].transpose(-1, -2)).mul_(scale)
        p.sub_(lse[:, :, r0:r1].reshape(b, hkv, g, c, 1))
        p[..., r0:].masked_fill_(_future(r0, r1, q.device), _NEG_INF)
        p.exp_()
        dv[:, :, :r1] += torch.einsum("bhgij,bhgid->bhjd", p, doc)
        dp = torch.matmul(doc, vf[:, :, None, :r1].transpose(-1, -2))
        ds = p.mul_(dp.sub_(delta[:, :, r0:r1].reshape(b, hkv, g, c, 1)))
        del dp
        dq[:, :, r0:r1] = (torch.matmul(ds, kf[:, :, None, :r1]) * scale).reshape(b, hq, c, d)
        dk[:, :, :r1] += torch.einsum("bhgij,bhgid->bhjd", ds, qc) * scale
    return dq, dk, dv
