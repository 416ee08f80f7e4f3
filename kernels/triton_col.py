"""Triton column pass: FAI column sums sum_i p_ij over the band i - j in [H_lo, H_hi].

FAI needs each row's *final* lse, so it cannot finish inside the forward; this second
pass has the shape of the backward's dK/dV loop: a program holds BLOCK_N keys of one
query head and streams only the query tiles that intersect the band
[n0 + H_lo, n0 + BLOCK_N - 1 + H_hi], recomputing p = exp2(q k^T * scale - lse2).
Work is O(N * (H_hi - H_lo)), not O(N^2); H_hi = "infinite" gives full future column
sums (analysis mode). GQA: the grid is query-head major (each program reads its kv
head's keys), so no atomics are needed and results are deterministic.

Rows count only when they are inside the sequence and, with HAS_RESP, response rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attn_col(Q, K, Lse, Resp, FaiSum, Starts, Lens, qk_scale, h_lo, h_hi,
              stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
              stride_sb, stride_sn, stride_sh, stride_rb, stride_rn,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_RESP: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    hq = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(Lens + b)
    start = tl.load(Starts + b)
    n0 = pid_n * BLOCK_N
    if n0 < seq_len:
        kvh = hq // GROUP
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        rows_n = (start + offs_n).to(tl.int64)
        col_ok = offs_n < seq_len
        k = tl.load(K + b * stride_kb + kvh * stride_kh + rows_n[:, None] * stride_kn + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        col = tl.zeros([BLOCK_N], dtype=tl.float32)
        # query rows that can hold a band cell of this key tile
        lo = n0 + h_lo
        hi = tl.minimum(seq_len - 1 - n0, h_hi) + n0 + BLOCK_N  # exclusive; h_hi may be ~2^30
        hi = tl.minimum(hi, seq_len)
        first = (lo // BLOCK_M) * BLOCK_M
        for m0 in range(first, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            rows_m = (start + offs_m).to(tl.int64)
            row_ok = offs_m < seq_len
            if HAS_RESP:
                resp = tl.load(Resp + b * stride_rb + rows_m * stride_rn, mask=row_ok, other=0)
                row_ok = row_ok & (resp != 0)
            q = tl.load(Q + b * stride_qb + hq * stride_qh + rows_m[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(Lse + b * stride_sb + hq * stride_sh + rows_m * stride_sn, mask=row_ok, other=0.0)
            lse2 = lse2 * 1.4426950408889634
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            t = offs_m[:, None] - offs_n[None, :]
            band = (t >= h_lo) & (t <= h_hi) & row_ok[:, None] & col_ok[None, :]
            p = tl.where(band, tl.exp2(s - lse2[:, None]), 0.0)
            col += tl.sum(p, 0)
        tl.store(FaiSum + b * stride_sb + hq * stride_sh + rows_n * stride_sn, col, mask=col_ok)
