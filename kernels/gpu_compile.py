"""Compile the GPU path's Triton kernels for sm_80 / sm_90 on a machine without a GPU.

Why: the CPU machines only ever *interpret* the kernels (TRITON_INTERPRET=1), which checks
numerics but none of what a GPU imposes: that the kernel lowers through Triton's NVIDIA
backend and ptxas at all, that its shared memory fits the architecture's per-block limit
(an autotune config over the limit raises OutOfResources at launch, which the autotuner
silently counts as "infinitely slow"), and how many registers it needs (255 is the cap;
beyond it ptxas spills to local memory, which is slow). Triton compiles for a `GPUTarget`
without a device, with its bundled ptxas; this module does that for every launch the GPU
path can make and reads the resources back.

Every launch = kernel x constexpr variant x tile config x head dim x dtype x arch:

* forward `_attn_fwd` with each config of `fwd_configs()` as the GPU autotunes it (not the
  interpreter's or KERNELS_AUTOTUNE=0's single one), in the STATS variants of FWD_VARIANTS;
* the FAI column pass `_attn_col` at `col_blocks(d, dtype)`, with and without response mask;
* the backward `_attn_bwd_dkdv` (without / with the in-loop column statistic) and
  `_attn_bwd_dq` at `bwd_blocks(d, dtype)`;
* head dims 64 and 128; bf16, fp16 and fp32 (`model.dtype` may be any of them, and the
  learner's default is fp32); sm_80 (A100) and sm_90 (H100).

Integer arguments are specialised the way Triton's JIT does at a launch (a value of 1
becomes a constant, a multiple of 16 gets a divisibility hint, pointers are 16-byte
aligned), from the argument values `triton_backend.py` passes for a padded batch as the
transformers hook hands it over (q/k/v are [B, N, H, d] transposed). A packed batch
differs only in a few such hints (stride_b = 0, a unit head stride in the statistics).

What this cannot tell: speed, and runtime errors that depend on data. The results are
Triton 3.9's (installed here); the GPU machines may run another Triton with another ptxas.

Needs TRITON_INTERPRET unset in the compiling process (the interpreter replaces the
kernels by Python objects that cannot be compiled): `compile_all` runs its compiles in
fresh worker processes with it removed, so it also works from inside the test suite.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

# Opt-in maximum of dynamic shared memory per block (CUDA programming guide, compute
# capabilities table): what a kernel may use at most after cudaFuncSetAttribute, which
# Triton's launcher requests for kernels above 48 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_REGISTERS = 255  # per thread; ptxas spills past this

# The forward's statistic constexprs as triton_backend.forward derives them from a StatsSpec.
FWD_VARIANTS = {
    # spec None or only lse/FAI: STATS off, every statistic flag zeroed (the baseline kernel;
    # also the training forward and key_class_mass)
    "off": dict(STATS=False, ENTROPY=False, DIST=False, WAAD_W=0, N_CLASSES=0, C_PAD=2),
    # what the RL pipeline's scoring forward asks: credit (distance, WAAD W=10; FAI is the
    # column pass) merged with AVAR's two key classes (rl/scoring_plan.py)
    "pipeline": dict(STATS=True, ENTROPY=False, DIST=True, WAAD_W=10, N_CLASSES=2, C_PAD=2),
    # the heaviest launch the API allows: every statistic, MAX_CLASSES = 8 key classes
    "all": dict(STATS=True, ENTROPY=True, DIST=True, WAAD_W=10, N_CLASSES=8, C_PAD=8),
}
COL_VARIANTS = {"plain": dict(HAS_RESP=False), "resp": dict(HAS_RESP=True)}
DKDV_VARIANTS = {"plain": dict(COL=False, HAS_RESP=False), "col": dict(COL=True, HAS_RESP=False),
                 "col+resp": dict(COL=True, HAS_RESP=True)}
DQ_VARIANTS = {"plain": {}}
VARIANTS = {"fwd": FWD_VARIANTS, "col": COL_VARIANTS, "dkdv": DKDV_VARIANTS, "dq": DQ_VARIANTS}

# The example batch whose argument values are specialised (only their divisibility matters)
B, N, HQ, GROUP = 4, 2048, 16, 2
HKV = HQ // GROUP
H_LO, H_HI = 10, 100  # the FAI band the pipeline uses


@dataclass(frozen=True)
class Launch:
    """One compile: which kernel, which constexprs, which tiles, for which GPU."""
    kernel: str  # "fwd" | "col" | "dkdv" | "dq"
    variant: str  # a key of VARIANTS[kernel]
    tiles: tuple  # ((name, value), ...): the BLOCK_* constexprs
    num_warps: int
    num_stages: int
    head_dim: int
    dtype: str  # "bfloat16" | "float16" | "float32"
    arch: int  # 80 | 90

    @property
    def config(self) -> str:
        blocks = "x".join(str(v) for _, v in self.tiles)
        return f"{blocks} w{self.num_warps} s{self.num_stages}"


@dataclass
class Result:
    """What the compile of one Launch gave; `ok` is the verdict (spills only warn)."""
    launch: Launch
    shared: int = -1  # bytes, from the compiled metadata
    limit: int = 0  # the architecture's per-block maximum
    registers: int = -1  # per thread, from cuobjdump
    stack: int = -1  # bytes per thread (the stack frame holds the spills)
    local: int = -1  # bytes per thread of local memory, cuobjdump's LOCAL
    spill_stores: int = -1  # bytes, from ptxas' -v report
    spill_loads: int = -1
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and 0 <= self.shared <= self.limit

    @property
    def problem(self) -> str:
        if self.error is not None:
            last = self.error.strip().splitlines()[-1:] or [""]
            return "compile error: " + last[0][:200]
        if self.shared > self.limit:
            return f"shared memory {self.shared} B > limit {self.limit} B"
        return ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["launch"]["config"] = self.launch.config
        d["ok"] = self.ok
        return d


# ---------------------------------------------------------------- which launches

def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def fwd_tiles(autotune: bool = True) -> list[tuple[tuple, int, int]]:
    """The forward's GPU configs as (tiles, num_warps, num_stages): the autotuned list, or
    with autotune=False the KERNELS_AUTOTUNE=0 pin (interpreter and environment ignored)."""
    from .triton_util import fwd_configs

    return [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
            for c in fwd_configs(interpret=False, autotune=autotune)]


def _fixed_tiles(kernel: str, d: int, dtype: torch.dtype) -> tuple[tuple, int, int]:
    """The column pass's / backward's single GPU config (as triton_backend launches them)."""
    from .triton_util import bwd_blocks, col_blocks

    if kernel == "col":
        b = col_blocks(d, dtype, interpret=False)
        return (("BLOCK_M", b["BLOCK_M"]), ("BLOCK_N", b["BLOCK_N"])), b["num_warps"], b["num_stages"]
    b = bwd_blocks(d, dtype, interpret=False)
    m, n = ("BLOCK_M1", "BLOCK_N1") if kernel == "dkdv" else ("BLOCK_M2", "BLOCK_N2")
    return (("BLOCK_M", b[m]), ("BLOCK_N", b[n])), b["num_warps"], b["num_stages"]


def _for_inputs(tile_list: list[tuple[tuple, int, int]], dtype: torch.dtype) -> list:
    """The forward configs a launch with `dtype` inputs may try (triton_util.configs_for_inputs,
    the autotuner's prune hook): 32-bit inputs get the tiles that fit."""
    import triton

    from .triton_util import configs_for_inputs

    configs = [triton.Config(dict(t), num_warps=w, num_stages=s) for t, w, s in tile_list]
    return [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
            for c in configs_for_inputs(configs, torch.tensor([], dtype=dtype).element_size())]


def launches(kernels=("fwd", "col", "dkdv", "dq"), archs=ARCHS, head_dims=HEAD_DIMS, dtypes=DTYPES,
             fwd_variants=tuple(FWD_VARIANTS), fwd_tile_list=None) -> list[Launch]:
    """Every launch of the given kernels: all their variants (the forward's: fwd_variants),
    the forward over fwd_tile_list (default: every config the GPU autotunes over)."""
    fwd_tile_list = fwd_tile_list if fwd_tile_list is not None else fwd_tiles(autotune=True)
    out = []
    for kernel in kernels:
        variants = fwd_variants if kernel == "fwd" else list(VARIANTS[kernel])
        for arch in archs:
            for d in head_dims:
                for dt in dtypes:
                    tiles = (_for_inputs(fwd_tile_list, dt) if kernel == "fwd"
                             else [_fixed_tiles(kernel, d, dt)])
                    for variant in variants:
                        for t, w, s in tiles:
                            out.append(Launch(kernel, variant, t, w, s, d, str(dt).removeprefix("torch."), arch))
    return out


def full_sweep() -> list[Launch]:
    """Everything the GPU path can launch (benchmarks/compile_kernels.py)."""
    return launches()


def ci_subset() -> list[Launch]:
    """A few compiles that cover every kernel (tests/kernels/test_kernel_compile.py), d128
    bf16, both archs: each kernel at its pinned / only config in its heaviest variant (the
    forward also stats-off), plus the forward config with the most shared memory; and the
    forward an fp32 model gets on sm_80, the tightest case (every 16-bit config over it)."""
    common = dict(archs=ARCHS, head_dims=(128,), dtypes=(torch.bfloat16,))
    out = launches(("fwd",), fwd_variants=("off", "all"), fwd_tile_list=fwd_tiles(autotune=False), **common)
    heaviest = {"col": "resp", "dkdv": "col+resp", "dq": "plain"}
    out += [x for x in launches(tuple(heaviest), **common) if x.variant == heaviest[x.kernel]]
    biggest = max(fwd_tiles(autotune=True), key=lambda cfg: _fwd_smem_estimate(cfg, 128, 2))
    out += launches(("fwd",), fwd_variants=("all",), fwd_tile_list=[biggest], **common)
    return out + launches(("fwd",), archs=(80,), head_dims=(128,), dtypes=(torch.float32,),
                          fwd_variants=("all",))


def _fwd_smem_estimate(cfg, d: int, elem: int) -> int:
    """Ranks forward configs by shared memory: the Q tile plus num_stages K and V tiles (the
    software pipeline's buffers). Only a ranking: the compiled figure is metadata.shared."""
    tiles, _, stages = cfg
    t = dict(tiles)
    return (t["BLOCK_M"] * d + stages * 2 * t["BLOCK_N"] * d) * elem


# ---------------------------------------------------------------- the argument values

def _example_args(launch: Launch) -> dict:
    """Argument name -> value as triton_backend.py passes them for a padded [B, N] batch
    (a torch dtype stands for a tensor of that dtype); constexprs are added by the caller."""
    dt = _dtype(launch.dtype)
    d, f32, i32, i8 = launch.head_dim, torch.float32, torch.int32, torch.int8
    q_s = (N * HQ * d, HQ * d, d)  # q as transformers gives it: [B, N, Hq, d].transpose(1, 2)
    k_s = (N * HKV * d, HKV * d, d)
    o_s = (HQ * N * d, d, N * d)  # kernel outputs / do: contiguous [B, H, N, d]
    kg_s = (HKV * N * d, d, N * d)  # dk, dv
    st_s = (HQ * N, 1, N)  # lse and the other statistics: contiguous [B, Hq, N]
    side_s = (N, 1)  # response mask / key classes: [B, N] int8

    def strides(prefix: str, vals) -> dict:
        names = {2: "bn", 3: "bnh"}[len(vals)]
        return {f"stride_{prefix}{c}": v for c, v in zip(names, vals)}

    c = VARIANTS[launch.kernel][launch.variant]
    if launch.kernel == "fwd":
        n_cls = c["N_CLASSES"]
        a = dict(Q=dt, K=dt, V=dt, Out=dt, Lse=f32, Ent=f32, Dist=f32, Waad=f32, Mass=f32,
                 Cls=i8 if n_cls else i32, Starts=i32, Lens=i32, qk_scale=0.1)
        a |= strides("q", q_s) | strides("k", k_s) | strides("v", k_s) | strides("o", o_s) | strides("s", st_s)
        a |= strides("a", (HQ * N * n_cls, n_cls, N * n_cls) if n_cls else (0, 0, 0))
        a |= strides("c", side_s if n_cls else (0, 0))
        a["LEN_KEY"] = N
        return a
    resp = c.get("HAS_RESP", False)
    if launch.kernel == "col":
        a = dict(Q=dt, K=dt, Lse=f32, Resp=i8 if resp else i32, FaiSum=f32, Starts=i32, Lens=i32, qk_scale=0.1,
                 h_lo=H_LO, h_hi=H_HI)
        return a | strides("q", q_s) | strides("k", k_s) | strides("s", st_s) | strides("r", side_s if resp else (0, 0))
    if launch.kernel == "dkdv":
        col = c["COL"]
        a = dict(Q=dt, K=dt, V=dt, DO=dt, DK=dt, DV=dt, Lse=f32, Delta=f32, Resp=i8 if resp else i32, FaiSum=f32,
                 Starts=i32, Lens=i32, sm_scale=0.1, qk_scale=0.1, h_lo=H_LO if col else 0, h_hi=H_HI if col else 0)
        a |= strides("q", q_s) | strides("k", k_s) | strides("v", k_s) | strides("do", o_s)
        a |= strides("dk", kg_s) | strides("dv", kg_s) | strides("s", st_s)
        return a | strides("r", side_s if resp else (0, 0))
    a = dict(Q=dt, K=dt, V=dt, DO=dt, DQ=dt, Lse=f32, Delta=f32, Starts=i32, Lens=i32, sm_scale=0.1, qk_scale=0.1)
    a |= strides("q", q_s) | strides("k", k_s) | strides("v", k_s) | strides("do", o_s) | strides("dq", o_s)
    return a | strides("s", st_s)


_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int8: "i8"}


def _specialise(value):
    """(signature type, divisible by 16?) of one argument, Triton's JIT rules at a launch:
    ints equal to 1 become constexprs, ints that are multiples of 16 (and 16-byte aligned
    pointers) get tt.divisibility=16, floats are fp32."""
    if isinstance(value, torch.dtype):
        return "*" + _TYPE[value], True
    if isinstance(value, float):
        return "fp32", False
    if value == 1:
        return "constexpr", False
    return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0


def _constexprs(launch: Launch) -> dict:
    from .triton_util import dot_precision

    c = dict(GROUP=GROUP, HEAD_DIM=launch.head_dim, DOT_PREC=dot_precision(_dtype(launch.dtype)))
    return c | VARIANTS[launch.kernel][launch.variant] | dict(launch.tiles)


def _kernel(name: str):
    """The JITFunction behind a kernel (`.fn` unwraps triton.autotune)."""
    import triton

    from .triton_bwd import _attn_bwd_dkdv, _attn_bwd_dq
    from .triton_col import _attn_col
    from .triton_fwd import _attn_fwd

    k = {"fwd": _attn_fwd, "col": _attn_col, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[name]
    while not isinstance(k, triton.runtime.JITFunction):
        if not hasattr(k, "fn"):
            raise RuntimeError(f"{name} is a {type(k).__name__}, not compilable: TRITON_INTERPRET must be unset")
        k = k.fn
    return k


# ---------------------------------------------------------------- compiling

def compile_launch(launch: Launch) -> Result:
    """Compile one launch for its GPUTarget and read back shared memory, registers, stack
    and spills. Never raises on a compile error: it becomes Result.error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.errors import TritonError

    res = Result(launch, limit=SHARED_LIMIT[launch.arch])
    t0 = time.perf_counter()
    try:
        fn = _kernel(launch.kernel)
        cx = _constexprs(launch)
        args = _example_args(launch)
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in cx:
                signature[name] = "constexpr"
                continue
            ty, div16 = _specialise(args[name])
            signature[name] = ty
            if ty == "constexpr":
                cx[name] = args[name]
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        missing = set(args) - set(fn.arg_names)
        assert not missing, f"example arguments not in the kernel's signature: {missing}"
        src = ASTSource(fn=fn, signature=signature, constexprs=cx, attrs=attrs)
        log = io.StringIO()
        # always_compile: a cache hit would skip ptxas and so its -v report (the spills)
        with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            triton.knobs.compilation.always_compile = True
            triton.knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(src, target=GPUTarget("cuda", launch.arch, 32),
                                      options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages,
                                                   enable_fp_fusion=True))  # the default the GPU path runs with
        res.seconds = time.perf_counter() - t0
        res.shared = int(compiled.metadata.shared)
        res.registers, res.stack, res.local = _resource_usage(compiled.asm["cubin"])
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        if m:
            res.spill_stores, res.spill_loads = int(m.group(1)), int(m.group(2))
    except (TritonError, RuntimeError, subprocess.CalledProcessError) as e:
        # Triton's compile errors and OutOfResources, ptxas (PTXASError), cuobjdump, and a
        # kernel that cannot be compiled in this process: the finding, not a crash
        res.seconds = time.perf_counter() - t0
        res.error = f"{type(e).__name__}: {e}"
    return res


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, local bytes) of the cubin's kernel, from the bundled cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    func = txt.split("Function ", 1)[1]

    def get(key):
        return int(re.search(rf"\b{key}:(\d+)", func).group(1))

    return get("REG"), get("STACK"), get("LOCAL")


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(todo: list[Launch], workers: int | None = None, progress=None) -> list[Result]:
    """Compile every launch, `workers` at a time (default: one per CPU), each in a fresh
    spawned process with TRITON_INTERPRET removed; results in the order of `todo`.
    `progress(result)` is called as each one finishes."""
    workers = workers or os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    results: dict[int, Result] = {}
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        futs = {pool.submit(compile_launch, x): i for i, x in enumerate(todo)}
        for f in concurrent.futures.as_completed(futs):
            r = f.result()
            results[futs[f]] = r
            if progress is not None:
                progress(r)
    return [results[i] for i in range(len(todo))]


# ---------------------------------------------------------------- reporting

def markdown_table(results: list[Result]) -> str:
    """One row per compile: kernel, variant, config, d, dtype, arch, shared / limit,
    registers, stack and spills, seconds, and the verdict."""
    rows = ["| kernel | variant | config | d | dtype | arch | shared KiB / limit | regs | stack B | spill st/ld B "
            "| s | ok |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        x = r.launch
        spill = f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores >= 0 else "?"
        ok = "yes" if r.ok else "**FAIL** " + r.problem
        rows.append(f"| {x.kernel} | {x.variant} | {x.config} | {x.head_dim} | {x.dtype} | sm_{x.arch} | "
                    f"{r.shared / 1024:.1f} / {r.limit // 1024} | {r.registers} | {r.stack} | {spill} | "
                    f"{r.seconds:.1f} | {ok} |")
    return "\n".join(rows)


def summary(results: list[Result]) -> str:
    """Per arch: the largest shared memory and register count, and the launches that spill."""
    lines = []
    for arch in sorted({r.launch.arch for r in results}):
        rs = [r for r in results if r.launch.arch == arch and r.error is None]
        if not rs:
            continue
        big = max(rs, key=lambda r: r.shared)
        reg = max(r.registers for r in rs)
        spills = [r for r in rs if r.spill_stores > 0]
        lines.append(f"sm_{arch}: max shared {big.shared / 1024:.1f} KiB of {SHARED_LIMIT[arch] // 1024} "
                     f"({big.launch.kernel} {big.launch.config} d{big.launch.head_dim} {big.launch.dtype}); "
                     f"max registers {reg}; {len(spills)}/{len(rs)} launches spill"
                     + (f" (worst {max(r.spill_stores for r in spills)} B stores)" if spills else ""))
    bad = [r for r in results if not r.ok]
    lines.append(f"{len(results) - len(bad)}/{len(results)} ok" + "".join(
        f"\n  FAIL {r.launch.kernel} {r.launch.variant} {r.launch.config} d{r.launch.head_dim} "
        f"{r.launch.dtype} sm_{r.launch.arch}: {r.problem}" for r in bad))
    return "\n".join(lines)
