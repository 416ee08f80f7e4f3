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


def fwd_configs(interpret: bool = INTERPRET, autotune: bool | None = None) -> list[triton.Config]:
    """One pinned config under the interpreter (more than one fails there) or when
    KERNELS_AUTOTUNE=0 (tests: stats-on and stats-off must then share the tiling and give
    bit-identical outputs); a few on GPU otherwise (each config keeps BLOCK_M % BLOCK_N == 0).
    The arguments (default: this process's environment) let gpu_compile.py ask for the GPU
    lists from a process that interprets or pins."""
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if autotune is None:
        autotune = os.environ.get("KERNELS_AUTOTUNE", "1") != "0"
    if not autotune:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
    ]


# The forward's largest tiling for 32-bit inputs. Their tiles take twice a 16-bit tile's shared
# memory: at head dim 128 every autotuned config needs 176–384 KiB (sm_80 has 163) and the
# launch fails, while 64 × 64 with 2 stages needs 112 KiB (compiled for sm_80 and sm_90 on CPU:
# kernels/README.md, "GPU compile check").
FP32_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def fits_fp32(block_m: int, block_n: int, num_stages: int) -> bool:
    return (block_m <= FP32_TILE["BLOCK_M"] and block_n <= FP32_TILE["BLOCK_N"]
            and num_stages <= FP32_TILE["num_stages"])


def configs_for_inputs(configs: list, element_size: int) -> list:
    """The forward configs a launch may try: all of them for 16-bit inputs; for 32-bit ones
    those within FP32_TILE, or FP32_TILE itself when none is (the autotuner would otherwise
    launch an over-sized one after all failed, and compile each for minutes first)."""
    if element_size < 4:
        return configs
    fits = [c for c in configs if fits_fp32(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)]
    return fits or [triton.Config({"BLOCK_M": FP32_TILE["BLOCK_M"], "BLOCK_N": FP32_TILE["BLOCK_N"]},
                                  num_warps=FP32_TILE["num_warps"],
                                  num_stages=FP32_TILE["num_stages"])]


def prune_fwd_configs(configs, named_args, **_) -> list:
    """`triton.autotune`'s early_config_prune hook (runs when there is more than one config)."""
    return configs_for_inputs(configs, named_args["Q"].element_size())


def bwd_blocks(head_dim: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """Backward tiles: dK/dV programs hold BLOCK_N1 keys and stream BLOCK_M1 queries;
    dQ programs hold BLOCK_M2 queries and stream BLOCK_N2 keys (the Triton tutorial's
    split and sizes for 16-bit inputs; halved for fp32, whose tiles take twice the memory)."""
    if interpret:
        return dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=2)
    # d128: 8 warps, or the two [128, 128] fp32 accumulators (dK, dV) alone need 256 registers/thread
    return dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, num_warps=4 if head_dim <= 64 else 8,
                num_stages=3)


def col_blocks(head_dim: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """Column pass: a program holds BLOCK_N keys and streams the band's BLOCK_M query tiles."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
