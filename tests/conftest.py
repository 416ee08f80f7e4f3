"""Shared fixtures. The real components (Ray, vLLM, DeepSpeed, Triton) run here; their slow
start-ups are shared per session rather than mocked."""
from __future__ import annotations

import os
import shutil

# Must precede the first `import triton` anywhere (vLLM imports it too).
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs actors."""
    import ray

    from rl.config import ClusterConfig
    from rl.cluster.runtime import init_ray

    init_ray(ClusterConfig())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen3 + char tokenizer folder (untied embeddings)."""
    from rl.models.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL (random LM, glyph-pretrained tower) + char tokenizer with Qwen-VL's
    special tokens + processor."""
    from rl.models.tiny_vl import build_tiny_vl_model

    return str(build_tiny_vl_model(tmp_path_factory.mktemp("tiny_vl")))


@pytest.fixture(scope="session")
def bpe_small_dir(tmp_path_factory):
    """A small Qwen3 of the kind a download gives: byte-level BPE tokenizer, ChatML chat
    template, two eos ids in generation_config.json, padded tied vocabulary (rl/models/bpe_model.py)."""
    from rl.models.bpe_model import SMALL_SHAPE, build_bpe_model, task_corpus

    return str(build_bpe_model(tmp_path_factory.mktemp("bpe_small"), SMALL_SHAPE,
                               task_corpus(per_task=300)))
