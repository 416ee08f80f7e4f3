"""Triton backward: dK/dV and dQ kernels (FlashAttention-2 recipe), causal GQA, varlen.

p is recomputed from the saved lse (p = exp2(q k^T * scale * log2e - lse * log2e)) and
delta_i = sum_d o_i do_i is precomputed, so ds = p * (dp - delta).

_attn_bwd_dkdv: a program holds BLOCK_N1 keys of one *kv* head and loops over the GROUP
query heads that read it and over the query tiles on or below the diagonal, so dK/dV of
a GQA group are summed in registers (no atomics, deterministic). With COL=True it also
sums p over the FAI band per query head (the "inside the backward" column statistic:
one extra masked reduction on values already in registers).

_attn_bwd_dq: a program holds BLOCK_M2 query rows and loops over the key tiles up to
its diagonal.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, Lse, Delta, Resp, FaiSum, Starts, Lens, sm_scale, qk_scale, h_lo, h_hi,
                   stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                   stride_dob, stride_don, stride_doh, stride_dkb, stride_dkn, stride_dkh,
                   stride_dvb, stride_dvn, stride_dvh, stride_sb, stride_sn, stride_sh, stride_rb, stride_rn,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, COL: tl.constexpr, HAS_RESP: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(Lens + b)
    start = tl.load(Starts + b)
    n0 = pid_n * BLOCK_N
    if n0 < seq_len:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        rows_n = (start + offs_n).to(tl.int64)
        col_ok = offs_n < seq_len
        k = tl.load(K + b * stride_kb + kvh * stride_kh + rows_n[:, None] * stride_kn + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + kvh * stride_vh + rows_n[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        first = (n0 // BLOCK_M) * BLOCK_M
        for g in tl.static_range(GROUP):
            hq = kvh * GROUP + g
            col = tl.zeros([BLOCK_N], dtype=tl.float32)
            for m0 in range(first, seq_len, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                rows_m = (start + offs_m).to(tl.int64)
                row_ok = offs_m < seq_len
                q = tl.load(Q + b * stride_qb + hq * stride_qh + rows_m[:, None] * stride_qn + offs_d[None, :],
                            mask=row_ok[:, None], other=0.0)
                do = tl.load(DO + b * stride_dob + hq * stride_doh + rows_m[:, None] * stride_don + offs_d[None, :],
                             mask=row_ok[:, None], other=0.0)
                soff = b * stride_sb + hq * stride_sh + rows_m * stride_sn
                lse2 = tl.load(Lse + soff, mask=row_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(Delta + soff, mask=row_ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
                vis = (offs_m[None, :] >= offs_n[:, None]) & row_ok[None, :] & col_ok[:, None]
                p_t = tl.where(vis, tl.exp2(s_t - lse2[None, :]), 0.0)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
                if COL:  # only query tiles that meet the band [n0 + lo, n0 + BLOCK_N - 1 + hi] do work
                    if (m0 + BLOCK_M - 1 >= n0 + h_lo) & (m0 - n0 - BLOCK_N + 1 <= h_hi):
                        t = offs_m[None, :] - offs_n[:, None]
                        band = (t >= h_lo) & (t <= h_hi)
                        if HAS_RESP:
                            resp = tl.load(Resp + b * stride_rb + rows_m * stride_rn, mask=row_ok, other=0)
                            band = band & (resp[None, :] != 0)
                        col += tl.sum(tl.where(band, p_t, 0.0), 1)
            if COL:
                tl.store(FaiSum + b * stride_sb + hq * stride_sh + rows_n * stride_sn, col, mask=col_ok)
        tl.store(DK + b * stride_dkb + kvh * stride_dkh + rows_n[:, None] * stride_dkn + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + b * stride_dvb + kvh * stride_dvh + rows_n[:, None] * stride_dvn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, Lse, Delta, Starts, Lens, sm_scale, qk_scale,
                 stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                 stride_dob, stride_don, stride_doh, stride_dqb, stride_dqn, stride_dqh, stride_sb, stride_sn, stride_sh,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
        do = tl.load(DO + b * stride_dob + hq * stride_doh + rows_m[:, None] * stride_don + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        soff = b * stride_sb + hq * stride_sh + rows_m * stride_sn
        lse2 = tl.load(Lse + soff, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + soff, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        hi = tl.minimum(m0 + BLOCK_M, seq_len)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rows_n = (start + offs_n).to(tl.int64)
            col_ok = offs_n < seq_len
            k = tl.load(K + b * stride_kb + kvh * stride_kh + rows_n[:, None] * stride_kn + offs_d[None, :],
                        mask=col_ok[:, None], other=0.0)
            v = tl.load(V + b * stride_vb + kvh * stride_vh + rows_n[:, None] * stride_vn + offs_d[None, :],
                        mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            vis = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :] & row_ok[:, None]
            p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        tl.store(DQ + b * stride_dqb + hq * stride_dqh + rows_m[:, None] * stride_dqn + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
