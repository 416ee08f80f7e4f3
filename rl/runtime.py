"""Starting the distributed pieces: Ray, the rollout engines, the learner group.

Kept apart from the trainer so tests build exactly the pieces the trainer builds.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import ray

from rl.config import learner_attention
from rl.engine.deepspeed_engine import DSEngineConfig
from rl.learner_group import LearnerGroup, with_accum
from rollout.vllm_engine import EngineConfig, VLLMEngine

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]

# Quiet, offline-friendly defaults for every process Ray starts.
ACTOR_ENV = {
    "PYTHONPATH": str(ROOT),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CONFIGURE_LOGGING": "0",
    "RAY_DEDUP_LOGS": "1",
}


def init_ray(cluster) -> None:
    """Join the cluster at cluster.address (cluster=ray), or start a private local instance
    (cluster=local) — private even when RAY_ADDRESS is set or a `ray start` cluster (running,
    or crashed and leaving its address file) exists: Ray would otherwise join that one, and
    refuse the local instance's num_cpus ("When connecting to an existing cluster, num_cpus
    and num_gpus must not be provided")."""
    if ray.is_initialized():
        return
    env = {**ACTOR_ENV}
    if cluster.address:
        log.info("joining the Ray cluster at %s", cluster.address)
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
        return
    # Logical CPUs only gate scheduling; actors take fractions, phases alternate in time.
    num_cpus = cluster.num_cpus or max(os.cpu_count() or 1, 4)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=True,
             logging_level=logging.WARNING)


@contextmanager
def stage_session(cfg):
    """For entry points that run one pipeline stage (launch.sft, launch.distill): the config
    checked before anything starts, Ray up for the stage's actors, and down afterwards."""
    from rl.config import check_config

    check_config(cfg)
    init_ray(cfg.cluster)
    try:
        yield
    finally:
        ray.shutdown()


def engine_config(cfg, model_path: str, seed: int) -> EngineConfig:
    r = cfg.rollout
    return EngineConfig(
        model_path=model_path, dtype=cfg.model.dtype, max_model_len=r.max_model_len,
        enforce_eager=r.enforce_eager, gpu_memory_utilization=r.gpu_memory_utilization,
        seed=seed, chunked_prefill=r.chunked_prefill,
        max_num_batched_tokens=r.max_num_batched_tokens, max_num_seqs=r.max_num_seqs)


def start_engine(cfg, model_path: str, seed: int):
    remote = ray.remote(num_cpus=cfg.rollout.num_cpus_per_engine)(VLLMEngine)
    return remote.remote(engine_config(cfg, model_path, seed))


def start_engines(cfg, model_path: str) -> list:
    return [start_engine(cfg, model_path, cfg.seed + i) for i in range(cfg.rollout.num_engines)]


def learner_config(cfg, model_path: str, lr: float, minibatch_size: int,
                  ref_model_path: str | None = None,
                  teacher_model_path: str | None = None) -> DSEngineConfig:
    lc = cfg.learner
    base = DSEngineConfig(
        model_path=model_path, lr=lr, weight_decay=cfg.algorithm.weight_decay,
        grad_clip=cfg.algorithm.grad_clip, zero_stage=lc.zero_stage,
        micro_batch_size=lc.micro_batch_size, dtype=cfg.model.dtype,
        gradient_checkpointing=lc.gradient_checkpointing, ref_model_path=ref_model_path,
        teacher_model_path=teacher_model_path,
        backend=lc.backend, seed=cfg.seed, attention=learner_attention(cfg), attn_impl=lc.attn_impl,
        plain_attention=lc.plain_attention,
        stats_layers=lc.stats_layers)
    return with_accum(base, minibatch_size, lc.num_ranks)


def start_learner(cfg, model_path: str, lr: float, minibatch_size: int,
                  ref_model_path: str | None = None,
                  teacher_model_path: str | None = None) -> LearnerGroup:
    lc = cfg.learner
    return LearnerGroup(learner_config(cfg, model_path, lr, minibatch_size, ref_model_path,
                                       teacher_model_path),
                        num_ranks=lc.num_ranks, num_cpus_per_rank=lc.num_cpus_per_rank,
                        torch_threads=lc.torch_threads)


def wait_ready(engines) -> list[dict]:
    return ray.get([e.ready.remote() for e in engines])
