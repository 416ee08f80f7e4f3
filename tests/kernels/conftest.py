"""Kernel tests. The Triton interpreter must be switched on before triton is first
imported (vLLM and transformers may import it), so it is set here, at collection."""

import os

try:  # CUDA present: run the real kernels; otherwise interpret them on CPU
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one pinned forward tiling on GPU: stats-on and stats-off must give bit-identical outputs
os.environ.setdefault("KERNELS_AUTOTUNE", "0")

import zlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def gen(request):
    """This test's own random stream: a CPU generator seeded from the test's name (with its
    parameters), so every case is fixed and reproducible and no test reads the global RNG."""
    import torch

    name = f"{request.node.module.__name__}::{request.node.name}"
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


@pytest.fixture(autouse=True)
def _global_rng_untouched():
    """A test that draws from torch's global RNG fails: its data would depend on what ran
    before it. (Module-scoped fixtures are set up before this check starts; they draw from
    local generators too: see kernel_testlib.seeded_model.)"""
    import torch

    before = torch.random.get_rng_state()
    yield
    assert torch.equal(torch.random.get_rng_state(), before), \
        "this test drew from torch's global RNG; draw from a local generator (the `gen` fixture)"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output buffer the kernels fill starts as NaN (see kernels.api.POISON)."""
    import kernels.api

    monkeypatch.setattr(kernels.api, "POISON", True)
