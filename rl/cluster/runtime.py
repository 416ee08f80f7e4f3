"""Starting the distributed pieces: Ray, the rollout engines, the learner group.

Kept apart from the trainer so tests build exactly the pieces the trainer builds.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import ray

from rl.config_checks import engine_attention
from rl.engine.deepspeed_engine import DSEngineConfig
from rl.cluster.learner_group import LearnerGroup, with_accum
from rl.cluster.placement import check_shared_dirs, cluster_gpus
from rl.cluster.rollout_group import RolloutGroup
from rl.cluster.remote_calls import get_all
from rollout.vllm_engine import EngineConfig, VLLMEngine
from rollout.weight_sync import get_transport

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]  # the repository (actors import from it)

# Set by Ray's job supervisor in a submitted job's driver (ray/_private/runtime_env/constants.py).
RAY_JOB_RUNTIME_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Quiet, offline-friendly defaults for every process Ray starts (a submitted job gets them
# from launch/ray_job.yaml instead).
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
        # A driver started by `ray job submit` runs inside the job's runtime env (its uploaded
        # working_dir, launch/ray_job.yaml's variables), which every actor inherits; Ray refuses
        # a second one here, and our PYTHONPATH would point other nodes at the head's copy.
        in_job = RAY_JOB_RUNTIME_ENV in os.environ
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env=None if in_job else {"env_vars": env})
        return
    # Logical CPUs only gate scheduling; actors take fractions, phases alternate in time.
    num_cpus = cluster.num_cpus or max(os.cpu_count() or 1, 4)
    store = int(cluster.object_store_gb * 2**30) if cluster.object_store_gb else None
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=store, include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=True,
             logging_level=logging.WARNING)


@contextmanager
def stage_session(cfg):
    """For entry points that run one pipeline stage (launch.sft, launch.distill): the config
    checked before anything starts, Ray up for the stage's actors, and down afterwards."""
    from rl.loop.cold_start import base_model_path, num_layers
    from rl.config_checks import check_config, check_layers

    check_config(cfg)
    check_layers(cfg, num_layers(base_model_path(cfg, Path(cfg.cache_dir))))  # before any actor
    init_ray(cfg.cluster)
    try:
        check_shared_dirs([cfg.output_dir, cfg.cache_dir], cfg.cluster.placement_timeout_s)
        yield
    finally:
        ray.shutdown()


def engine_config(cfg, model_path: str, seed: int, gpus: float = 0.0) -> EngineConfig:
    """`gpus`: Ray's GPUs per engine (`engine_gpus`, once Ray is up)."""
    r = cfg.rollout
    return EngineConfig(
        model_path=model_path, dtype=cfg.model.dtype, max_model_len=r.max_model_len,
        enforce_eager=r.enforce_eager, gpu_memory_utilization=r.gpu_memory_utilization,
        gpu_share=gpus / r.tensor_parallel_size,
        seed=seed, chunked_prefill=r.chunked_prefill,
        max_num_batched_tokens=r.max_num_batched_tokens, max_num_seqs=r.max_num_seqs,
        tensor_parallel_size=r.tensor_parallel_size, sleep_level=r.sleep_level,
        torch_threads=r.torch_threads, cpu_groups=cpu_groups(cfg))


def cpu_groups(cfg) -> int:
    """Actor groups computing at once on a node, for the default CPU threads: the loop is
    synchronous (learner, then engines), or the engines generate while the learner updates.
    (Assumes they share the node; set learner/rollout.torch_threads when they do not.)"""
    return 2 if cfg.rollout.async_steps > 0 else 1


def engine_gpus(cfg) -> float:
    r = cfg.rollout
    if r.num_gpus_per_engine is not None:
        return r.num_gpus_per_engine
    return float(r.tensor_parallel_size) if cluster_gpus() else 0.0


def learner_gpus(cfg) -> float:
    g = cfg.learner.num_gpus_per_rank
    return g if g is not None else (1.0 if cluster_gpus() else 0.0)


def start_engine(cfg, model_path: str, seed: int):
    """One engine outside the rollout group (warm-start checks, benchmarks)."""
    r = cfg.rollout
    gpus = engine_gpus(cfg)
    remote = ray.remote(num_cpus=r.num_cpus_per_engine, num_gpus=gpus,
                        resources=dict(r.resources_per_engine) or None)(VLLMEngine)
    return remote.remote(engine_config(cfg, model_path, seed, gpus), "safetensors")


def start_engines(cfg, model_path: str) -> RolloutGroup:
    """The rollout group: rollout.num_engines engines in one placement group."""
    r, c = cfg.rollout, cfg.cluster
    gpus = engine_gpus(cfg)
    return RolloutGroup([engine_config(cfg, model_path, cfg.seed + i, gpus)
                         for i in range(r.num_engines)],
                        transport=cfg.learner.weight_transport, num_cpus=r.num_cpus_per_engine, num_gpus=gpus,
                        resources=dict(r.resources_per_engine), max_restarts=r.max_restarts,
                        call_timeout_s=c.call_timeout_s, placement_timeout_s=c.placement_timeout_s)


def learner_config(cfg, model_path: str, lr: float, minibatch_size: int,
                  ref_model_path: str | None = None,
                  frozen_models: dict[str, str] | None = None) -> DSEngineConfig:
    lc = cfg.learner
    base = DSEngineConfig(
        model_path=model_path, lr=lr, weight_decay=cfg.algorithm.weight_decay,
        grad_clip=cfg.algorithm.grad_clip, zero_stage=lc.zero_stage,
        micro_batch_size=lc.micro_batch_size, dtype=cfg.model.dtype,
        gradient_checkpointing=lc.gradient_checkpointing, ref_model_path=ref_model_path,
        frozen_models=dict(frozen_models or {}),
        backend=lc.backend, seed=cfg.seed, **engine_attention(cfg),
        stats_layers=lc.stats_layers, collective_timeout_s=cfg.cluster.call_timeout_s,
        offload_between_updates=lc.offload_between_updates, compile=lc.compile,
        padding_free=lc.padding_free)
    return with_accum(base, minibatch_size, lc.num_ranks)


def start_learner(cfg, model_path: str, lr: float, minibatch_size: int,
                  ref_model_path: str | None = None,
                  frozen_models: dict[str, str] | None = None) -> LearnerGroup:
    lc = cfg.learner
    return LearnerGroup(learner_config(cfg, model_path, lr, minibatch_size, ref_model_path,
                                       frozen_models),
                        num_ranks=lc.num_ranks, num_cpus_per_rank=lc.num_cpus_per_rank,
                        torch_threads=lc.torch_threads, cpu_groups=cpu_groups(cfg),
                        num_gpus_per_rank=learner_gpus(cfg),
                        transport=get_transport(lc.weight_transport,
                                                bucket_bytes=lc.weight_bucket_mb << 20),
                        resources_per_rank=dict(lc.resources_per_rank),
                        call_timeout_s=cfg.cluster.call_timeout_s,
                        placement_timeout_s=cfg.cluster.placement_timeout_s)


def wait_ready(engines: list, timeout_s: float | None = None) -> list[dict]:
    return get_all([e.ready.remote() for e in engines], timeout_s, "engine start")


def write_placement(path: Path, ranks: list[dict], engines: list[dict]) -> None:
    """Where every actor runs (node, GPUs, rank environment): `placement.json` in the run
    folder, and one line each in the log."""
    path.write_text(json.dumps({"learner_ranks": ranks, "engines": engines}, indent=1))
    for r in ranks:
        log.info("learner rank %s: node %s, GPUs %s, rank %s of %s on its node, MASTER_ADDR %s",
                 r["rank"], r["node_id"][:8], r["gpu_ids"] or "none", r["node_local_rank"],
                 r["local_world_size"], r["master_addr"])
    for i, e in enumerate(engines):
        log.info("rollout engine %d: node %s, GPUs %s", i, e["node_id"][:8], e["gpu_ids"] or "none")
