"""Triton forward: FlashAttention-2 style causal GQA attention with optional row statistics.

One program owns BLOCK_M query rows of one query head of one sequence and streams the
key tiles left of the diagonal (no masking needed there) and then the diagonal tiles
(causal + length mask). Softmax runs in base 2 (exp2), with the running max m and
denominator l.

With STATS=False (constexpr; the launcher then also zeroes ENTROPY, DIST, WAAD_W and
N_CLASSES) none of the statistic code is emitted: that build *is* the baseline kernel. With STATS=True each statistic is one more running accumulator,
rescaled by alpha = 2^(m_old - m_new) exactly like l, and divided by l at the end:
  entropy   e = sum p~ (s - m)           -> H = ln2 (log2 l - e / l)
  distance  d = sum p~ (i - j)           -> d / l (accumulated per tile relative to the
            tile start, so it costs one multiply-add per element and never cancels)
  WAAD      w = sum_{i-j<W} p~ (W-(i-j))  -> W - w / l (element work only on tiles within
            W of the diagonal)
  masses    a [BLOCK_M, C_PAD] columns, one masked row-sum per class present in the tile
The column statistic (FAI) needs every row's final lse: see triton_col.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_util import fwd_configs, prune_fwd_configs


@triton.jit
def _fwd_tile(acc, m_i, l_i, e_i, d_i, w_i, a_i, q, K, V, Cls, b, start, seq_len, n0, m0, offs_m, kvh,
              stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_cb, stride_cn, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, ENTROPY: tl.constexpr,
              DIST: tl.constexpr, WAAD_W: tl.constexpr, N_CLASSES: tl.constexpr, C_PAD: tl.constexpr,
              DOT_PREC: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_n = (start + offs_n).to(tl.int64)
    k_ptrs = K + b * stride_kb + kvh * stride_kh + rows_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + kvh * stride_vh + rows_n[:, None] * stride_vn + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < seq_len)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_ij = tl.sum(p, 1)
    if ENTROPY:
        shifted = s - m_new[:, None]
        if MASKED:
            shifted = tl.where(valid, shifted, 0.0)  # 0 * -inf would be NaN
        dm = tl.where(m_i > float("-inf"), m_i - m_new, 0.0)  # first tile: l_i = 0, m_i = -inf
        e_i = alpha * (e_i + l_i * dm) + tl.sum(p * shifted, 1)
    if DIST:
        rel = tl.arange(0, BLOCK_N).to(tl.float32)
        d_i = d_i * alpha + (offs_m - n0).to(tl.float32) * l_ij - tl.sum(p * rel[None, :], 1)
    if WAAD_W > 0:
        w_i = w_i * alpha
        # only tiles with some i - j < W contribute (the rest has min(i - j, W) = W)
        if n0 + BLOCK_N + WAAD_W > m0 + 1:
            t = offs_m[:, None] - offs_n[None, :]
            w_i += tl.sum(p * tl.where(t < WAAD_W, WAAD_W - t, 0).to(tl.float32), 1)
    if N_CLASSES > 0:
        a_i = a_i * alpha[:, None]
        cls = tl.load(Cls + b * stride_cb + rows_n * stride_cn, mask=offs_n < seq_len, other=-1).to(tl.int32)
        if tl.max(cls, 0) >= 0:  # a tile with no classed key skips the element work
            cidx = tl.arange(0, C_PAD)
            for c in tl.static_range(N_CLASSES):
                mc = tl.sum(tl.where(cls[None, :] == c, p, 0.0), 1)
                a_i += tl.where(cidx[None, :] == c, mc[:, None], 0.0)
    l_i = l_i * alpha + l_ij
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i, e_i, d_i, w_i, a_i


@triton.autotune(configs=fwd_configs(), key=["HEAD_DIM", "LEN_KEY", "STATS", "ENTROPY", "DIST", "WAAD_W", "N_CLASSES"],
                 prune_configs_by={"early_config_prune": prune_fwd_configs})
@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, Ent, Dist, Waad, Mass, Cls, Starts, Lens, qk_scale,
              stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
              stride_ob, stride_on, stride_oh, stride_sb, stride_sn, stride_sh, stride_ab, stride_an, stride_ah,
              stride_cb, stride_cn, LEN_KEY,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, STATS: tl.constexpr, ENTROPY: tl.constexpr,
              DIST: tl.constexpr, WAAD_W: tl.constexpr, N_CLASSES: tl.constexpr, C_PAD: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (most causal work) tiles first
    hq = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(Lens + b)
    start = tl.load(Starts + b)
    m0 = pid_m * BLOCK_M
    if m0 < seq_len:
        kvh = hq // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        rows_m = (start + offs_m).to(tl.int64)
        row_ok = offs_m < seq_len
        q = tl.load(Q + b * stride_qb + hq * stride_qh + rows_m[:, None] * stride_qn + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        e_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        d_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        w_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        a_i = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
        # keys left of the tile's diagonal: every cell visible, no mask
        for n0 in range(0, m0, BLOCK_N):
            acc, m_i, l_i, e_i, d_i, w_i, a_i = _fwd_tile(
                acc, m_i, l_i, e_i, d_i, w_i, a_i, q, K, V, Cls, b, start, seq_len, n0, m0, offs_m, kvh,
                stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_cb, stride_cn, qk_scale,
                HEAD_DIM, BLOCK_N, False, ENTROPY, DIST, WAAD_W, N_CLASSES, C_PAD, DOT_PREC)
        # the diagonal tiles: causal and length mask
        hi = tl.minimum(m0 + BLOCK_M, seq_len)
        for n0 in range(m0, hi, BLOCK_N):
            acc, m_i, l_i, e_i, d_i, w_i, a_i = _fwd_tile(
                acc, m_i, l_i, e_i, d_i, w_i, a_i, q, K, V, Cls, b, start, seq_len, n0, m0, offs_m, kvh,
                stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_cb, stride_cn, qk_scale,
                HEAD_DIM, BLOCK_N, True, ENTROPY, DIST, WAAD_W, N_CLASSES, C_PAD, DOT_PREC)
        inv_l = 1.0 / l_i
        out = acc * inv_l[:, None]
        tl.store(Out + b * stride_ob + hq * stride_oh + rows_m[:, None] * stride_on + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        soff = b * stride_sb + hq * stride_sh + rows_m * stride_sn
        tl.store(Lse + soff, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)
        if STATS:
            if ENTROPY:
                tl.store(Ent + soff, (tl.log2(l_i) - e_i * inv_l) * 0.6931471805599453, mask=row_ok)
            if DIST:
                tl.store(Dist + soff, d_i * inv_l, mask=row_ok)
            if WAAD_W > 0:
                tl.store(Waad + soff, WAAD_W - w_i * inv_l, mask=row_ok)
            if N_CLASSES > 0:
                cidx = tl.arange(0, C_PAD)
                aoff = b * stride_ab + hq * stride_ah + rows_m * stride_an
                tl.store(Mass + aoff[:, None] + cidx[None, :], a_i * inv_l[:, None],
                         mask=row_ok[:, None] & (cidx[None, :] < N_CLASSES))
