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

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output buffer the kernels fill starts as NaN (see kernels.api.POISON)."""
    import kernels.api

    monkeypatch.setattr(kernels.api, "POISON", True)
