"""Small shared pieces of the Triton path: interpreter detection, launch configurations
and the stride bookkeeping that lets one kernel serve packed and padded layouts.

Every kernel addresses token t of sequence s of head h as
    base + s * stride_b + (start_s + t) * stride_n + h * stride_h
which is the padded layout with stride_b = batch stride, start_s = first real token, or
the packed layout with stride_b = 0, start_s = cu_seqlens[s].

Only APIs present in Triton 3.6 are used (the GPU machines run 3.6, CPU ones 3.9).
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


def tok_strides(x: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(stride_b, stride_n, stride_h) of a q/k/v/out tensor ([B, H, N, d] or [T, H, d])."""
    assert x.stride(-1) == 1, "last dimension must be contiguous"
    if packed:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(2), x.stride(1)


def stat_strides(x: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(stride_b, stride_n, stride_h) of a statistic ([B, H, N(, C)] or [T, H(, C)])."""
    if packed:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(2), x.stride(1)


def side_strides(x: torch.Tensor, packed: bool) -> tuple[int, int]:
    """(stride_b, stride_n) of a per-token side input ([B, N] or [T])."""
    if packed:
        return 0, x.stride(0)
    return x.stride(0), x.stride(1)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots (TF32 would lose the test's accuracy);
    fp16/bf16 dots are exact products with fp32 accumulation anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def len_bucket(n: int) -> int:
    """Autotune key: the next power of two of the longest sequence."""
    return triton.next_power_of_2(max(int(n), 16))


def fwd_configs() -> list[triton.Config]:
    """One pinned config under the interpreter (more than one fails there) or when
    KERNELS_AUTOTUNE=0 (tests: stats-on and stats-off must then share the tiling and give
    bit-identical outputs); a few on GPU otherwise (each config keeps BLOCK_M % BLOCK_N == 0)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if os.environ.get("KERNELS_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
    ]


def bwd_blocks(head_dim: int, dtype: torch.dtype) -> dict:
    """Backward tiles: dK/dV programs hold BLOCK_N1 keys and stream BLOCK_M1 queries;
    dQ programs hold BLOCK_M2 queries and stream BLOCK_N2 keys (the Triton tutorial's
    split and sizes for 16-bit inputs; halved for fp32, whose tiles take twice the memory)."""
    if INTERPRET:
        return dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=2)
    # d128: 8 warps, or the two [128, 128] fp32 accumulators (dK, dV) alone need 256 registers/thread
    return dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, num_warps=4 if head_dim <= 64 else 8,
                num_stages=3)


def col_blocks(head_dim: int, dtype: torch.dtype) -> dict:
    """Column pass: a program holds BLOCK_N keys and streams the band's BLOCK_M query tiles."""
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
