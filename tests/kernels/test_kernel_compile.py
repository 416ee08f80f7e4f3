"""The Triton kernels compile for real GPUs (sm_80, sm_90) and fit their shared memory.

The other kernel tests interpret the kernels on CPU, which says nothing about whether they
lower through Triton's NVIDIA backend and ptxas, or whether a tile config fits the
architecture's shared memory per block (a config over it is dropped at launch, silently,
by the autotuner). Triton compiles for a GPUTarget without a GPU: this compiles a subset
(kernels.gpu_compile.ci_subset: every kernel at its pinned / only config, d128 bf16, both
archs, plus the forward config with the most shared memory, and fp32's forward on sm_80) and fails on a compile error
or shared memory over the limit; registers and spills are printed. The full sweep is
benchmarks/compile_kernels.py (kernels/README.md has its table).

This process interprets (TRITON_INTERPRET=1, conftest.py), and interpreted kernels cannot
be compiled: gpu_compile.compile_all compiles in spawned workers without that variable.
"""

import pytest
import torch

from kernels import gpu_compile
from kernels.gpu_compile import SHARED_LIMIT, Launch

pytest.importorskip("triton")
pytestmark = pytest.mark.timeout(600)  # ~20 s alone on 2 cores; a slow shared machine gets room

# A column pass whose streamed query tiles (256 rows x d128 bf16 = 64 KiB) are buffered 6 deep:
# over both limits by construction, and cheap to compile (about 1.5 s)
TOO_BIG = [Launch("col", "plain", (("BLOCK_M", 256), ("BLOCK_N", 16)), 4, 6, 128, "bfloat16", arch)
           for arch in gpu_compile.ARCHS]
# Triton rejects it: tl.arange needs a power-of-two length
NOT_POW2 = Launch("col", "plain", (("BLOCK_M", 48), ("BLOCK_N", 16)), 4, 2, 128, "bfloat16", 90)


@pytest.fixture(scope="module")
def compiled():
    """The CI subset, the over-limit launches and the one Triton rejects, in one pool."""
    todo = gpu_compile.ci_subset()
    results = gpu_compile.compile_all(todo + TOO_BIG + [NOT_POW2])
    return results[:len(todo)], results[len(todo):-1], results[-1]


def test_subset_covers_every_kernel_and_the_gpu_configs():
    """The subset has each kernel on each arch, the forward's pinned GPU config and the
    autotune config with the most shared memory, whatever this process's environment
    (it interprets and pins, so its own fwd_configs() is a different, single config)."""
    todo = gpu_compile.ci_subset()
    assert {(x.kernel, x.arch) for x in todo} == {(k, a) for k in ("fwd", "col", "dkdv", "dq") for a in (80, 90)}
    gpu_list = gpu_compile.fwd_tiles(autotune=True)
    pinned = gpu_compile.fwd_tiles(autotune=False)
    assert len(gpu_list) > 1 and len(pinned) == 1 and pinned[0] not in gpu_list
    fwd = {(x.tiles, x.num_warps, x.num_stages) for x in todo
           if x.kernel == "fwd" and x.dtype == "bfloat16"}
    assert pinned[0] in fwd and (fwd - set(pinned)) <= set(gpu_list) and len(fwd) == 2
    fp32 = [x for x in todo if x.kernel == "fwd" and x.dtype == "float32"]
    assert [(x.arch, x.head_dim, x.config) for x in fp32] == [(80, 128, "64x64 w4 s2")]


def test_32_bit_inputs_autotune_over_the_tiles_that_fit():
    """The forward's GPU configs all need more than sm_80's shared memory for fp32 inputs at
    head dim 128 (176–384 KiB of 163: the fp32 rows of kernels/README.md's sweep before this
    rule): an fp32 model's first forward on an A100 failed. The autotuner's prune hook gives
    32-bit inputs the configs within FP32_TILE (or that tile), 16-bit ones the full list."""
    from kernels.triton_util import fwd_configs, prune_fwd_configs

    def tiles(configs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]

    gpu = fwd_configs(interpret=False, autotune=True)
    for dtype in (torch.bfloat16, torch.float16):
        assert prune_fwd_configs(gpu, {"Q": torch.empty(0, dtype=dtype)}) == gpu
    assert tiles(prune_fwd_configs(gpu, {"Q": torch.empty(0, dtype=torch.float32)})) == [(64, 64, 4, 2)]
    small = fwd_configs(interpret=True)  # within the tile already: kept as it is
    assert prune_fwd_configs(small, {"Q": torch.empty(0, dtype=torch.float32)}) == small


def test_subset_compiles_within_shared_memory(compiled, capsys):
    results, _, _ = compiled
    with capsys.disabled():
        print("\n" + gpu_compile.markdown_table(results) + "\n" + gpu_compile.summary(results))
    for r in results:
        x = r.launch
        assert r.error is None, f"{x}: {r.error}"
        assert 0 < r.shared <= SHARED_LIMIT[x.arch], f"{x}: shared {r.shared} B > {SHARED_LIMIT[x.arch]} B"
        assert r.ok
        # the resources were read back, not left at their "unknown" defaults
        assert 0 < r.registers <= gpu_compile.MAX_REGISTERS and r.stack >= 0 and r.spill_stores >= 0, x


def test_over_the_limit_is_a_failure(compiled):
    """The check bites: a launch that compiles but needs more shared memory than a block
    may have is reported as a failure (and as a shared memory problem, not a compile error)."""
    _, bad, _ = compiled
    for r in bad:
        assert r.error is None, r.error
        assert r.shared > SHARED_LIMIT[r.launch.arch]
        assert not r.ok and "shared memory" in r.problem
    assert "FAIL" in gpu_compile.markdown_table(bad) and "0/2 ok" in gpu_compile.summary(bad)


def test_a_compile_error_is_a_failure(compiled):
    """A launch Triton rejects comes back as a failed record, not an exception or a pass;
    so does compiling in this interpreting process (the kernels are not compilable here)."""
    _, _, rejected = compiled
    assert rejected.error is not None and "power of 2" in rejected.error, rejected.error
    assert not rejected.ok and rejected.problem.startswith("compile error")
    here = gpu_compile.compile_launch(gpu_compile.ci_subset()[0])
    assert not here.ok and "TRITON_INTERPRET must be unset" in here.error


def test_argument_specialisation_matches_triton():
    """gpu_compile specialises integer arguments as Triton's JIT does at a launch (value 1
    -> constexpr, multiples of 16 -> divisibility hint), so the compiled code is the code a
    launch gets."""
    jit = pytest.importorskip("triton.runtime.jit")
    if not hasattr(jit, "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    for v in (0, 1, 2, 10, 16, 100, 2048, 64 * 2048 * 16, 2**33, 0.1, torch.bfloat16, torch.int8, torch.float32):
        arg = torch.empty(4, dtype=v) if isinstance(v, torch.dtype) else v
        ty, spec = jit.native_specialize_impl(BaseBackend, arg, False, True, True)
        assert gpu_compile._specialise(v) == (ty, spec == "D"), v
