"""Cross-field checks of a composed config, and what a checked config implies (the credit
method, the learner's attention, which AVAR terms run, the overlong handling).

Hydra's types (rl/config.py) catch unknown keys and wrong types; these catch values that only
fail together, before Ray or any actor starts, each naming the key.
"""
from __future__ import annotations

from rl.algorithms.overlong import OverlongConfig, validate as validate_overlong
from rl.loop.manifest import VERIFY_MODES
from rollout.vllm_engine import scheduling_args


VALID_CHOICES = {
    "algorithm.advantage": ("grpo", "rloo"),
    "algorithm.loss_agg": ("token_mean", "seq_mean"),
    "algorithm.kl_estimator": ("k1", "k3"),
    "algorithm.tis_mode": ("truncate", "mask"),
    "algorithm.overlong": ("keep", "filter", "penalty"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("auto", "offline", "online", "disabled"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "learner.attention": ("auto", "sdpa", "kernels", "kernels_everywhere"),
    "learner.weight_transport": ("safetensors", "buckets", "nccl", "ipc"),
    "rollout.sleep_level": (0, 1, 2),
    "teacher.name": ("none", "tiny", "hf"),
    "teacher.placement": ("actors", "colocated"),
    "distill.name": ("none", "kd", "leaf", "leaf_response"),
    "leaf.name": ("none", "rl"),
    "leaf.pruning": ("span", "collective"),
    "leaf.unit": ("token", "word"),
    "avar.name": ("none", "vas", "vars", "agto", "agto_vars"),
    "avar.evidence": ("evidence", "image"),
    "avar.vars_norm": ("none", "clip", "group_z"),
    "avar.agto_at": ("cold_start", "stage"),
    "learner.zero_stage": (0, 1, 2, 3),
    "learner.backend": (None, "gloo", "nccl"),
    "cluster.name": ("local", "ray"),
}
# Settings that must be at least 1 (counts), or above 0 (shares and rates).
AT_LEAST_ONE = ("rollout.num_engines", "rollout.max_new_tokens", "rollout.tensor_parallel_size",
                "learner.num_ranks", "learner.micro_batch_size", "learner.torch_threads",
                "rollout.torch_threads",
                "learner.weight_bucket_mb", "algorithm.prompts_per_step",
                "algorithm.minibatch_size", "eval_every", "save_every")
ABOVE_ZERO = ("rollout.temperature", "rollout.top_p", "rollout.gpu_memory_utilization",
              "rollout.num_cpus_per_engine", "learner.num_cpus_per_rank",
              "cluster.call_timeout_s", "cluster.placement_timeout_s")
NOT_NEGATIVE = ("rollout.max_restarts", "max_failures", "rollout.num_gpus_per_engine",
                "learner.num_gpus_per_rank", "rollout.async_steps", "algorithm.tis_cap")
# Keys that moved (rl/config.py: null in the schema unless an old command line sets them).
MOVED_KEYS = {
    "cold_start.objective": "AGTO is a choice of the avar group: avar=agto (or avar=agto_vars "
                            "with VARS); cold_start.objective=lm is the default",
    "avar.vas": "VAS is measured whenever AVAR is on: avar=vas measures it alone",
    "leaf.kl_coef": "LeaF's RL terms are the leaf group: leaf=rl leaf.kd_coef=<weight> "
                    "(leaf.counterfactual_groups=<G>); algorithm.kl_coef is the KL to the reference",
    "learner.attn_impl": "the kernels' implementation follows the device (Triton on GPU, "
                         "blockwise on CPU); learner.attention=kernels|kernels_everywhere|sdpa|auto",
    "learner.plain_attention": "learner.attention=kernels_everywhere runs every forward through "
                               "the kernels (plain_attention=kernels); learner.attention=kernels "
                               "keeps stock attention where no statistics are captured",
}
# Layer selections read by the statistics capture (kernels/capture.py `select_layers`).
LAYER_KEYS = ("learner.stats_layers", "avar.layers")


def overlong_config(cfg) -> OverlongConfig:
    a = cfg.algorithm
    return OverlongConfig(a.overlong, a.overlong_buffer, a.overlong_penalty)


def check_config(cfg) -> None:
    """Cross-field checks Hydra's types cannot express; raises ValueError naming the key."""
    from omegaconf import OmegaConf

    for key, instead in MOVED_KEYS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            raise ValueError(f"config key {key}={value!r} was moved: {instead}")
    for key, allowed in VALID_CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ValueError(f"config key {key}={value!r}: must be one of {allowed}")
    check_sizes(cfg)
    check_layers(cfg)
    check_cluster(cfg)
    a, lr = cfg.algorithm, cfg.learner
    groups = a.prompts_per_step + extra_groups(cfg)
    batch = groups * a.n_samples
    if batch % a.minibatch_size:
        raise ValueError(
            f"algorithm.minibatch_size={a.minibatch_size} must divide "
            f"(prompts_per_step + leaf.counterfactual_groups with leaf=rl) * n_samples={batch}")
    if a.minibatch_size % lr.num_ranks:
        raise ValueError(
            f"algorithm.minibatch_size={a.minibatch_size} must be a multiple of "
            f"learner.num_ranks={lr.num_ranks}")
    if cfg.rollout.num_engines > a.prompts_per_step:
        raise ValueError(f"rollout.num_engines={cfg.rollout.num_engines} must not exceed "
                         f"algorithm.prompts_per_step={a.prompts_per_step}")
    if a.n_samples < 2:
        raise ValueError("algorithm.n_samples must be >= 2 for group baselines")
    validate_overlong(overlong_config(cfg), cfg.rollout.max_new_tokens)
    check_rollout(cfg)
    check_teacher(cfg)
    credit = build_credit(cfg)  # unknown method or parameter: named here
    if credit.stats_request() and lr.attention == "sdpa":
        raise ValueError(f"credit={cfg.credit.name} reads attention statistics: learner.attention "
                         "must be kernels (or auto), not sdpa")
    check_avar(cfg)


def check_sizes(cfg) -> None:
    from omegaconf import OmegaConf

    for key in AT_LEAST_ONE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ValueError(f"config key {key}={OmegaConf.select(cfg, key)}: must be >= 1")
    for key in ABOVE_ZERO:
        value = OmegaConf.select(cfg, key)
        if value is not None and not value > 0:
            raise ValueError(f"config key {key}={OmegaConf.select(cfg, key)}: must be > 0")
    for key in NOT_NEGATIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 0:
            raise ValueError(f"config key {key}={value}: must be >= 0")
    for key in ("rollout.resources_per_engine", "learner.resources_per_rank"):
        for name, amount in OmegaConf.select(cfg, key).items():
            if not amount > 0 or name in ("CPU", "GPU"):
                raise ValueError(f"config key {key}.{name}={amount}: custom Ray resources must "
                                 "be > 0 and not CPU/GPU (use num_cpus_*/num_gpus_*)")
    r = cfg.rollout
    if r.top_p > 1 or (r.gpu_memory_utilization or 0) > 1:
        raise ValueError(f"rollout.top_p={r.top_p} and rollout.gpu_memory_utilization="
                         f"{r.gpu_memory_utilization} must be in (0, 1]")
    if r.eval_temperature < 0 or r.eval_samples < 0:
        raise ValueError("rollout.eval_temperature and rollout.eval_samples must be >= 0")
    if r.async_steps > 0 and r.sleep_level > 0:
        raise ValueError(f"rollout.async_steps={r.async_steps} generates while the learner "
                         f"updates, but rollout.sleep_level={r.sleep_level} puts the engines to "
                         "sleep for the update (one shared GPU): use one or the other")
    if 0 < cfg.algorithm.tis_cap < 1:
        raise ValueError(f"algorithm.tis_cap={cfg.algorithm.tis_cap}: the cap c must be >= 1 "
                         "(or 0 = off)")
    if cfg.steps < 0 or cfg.keep_last < 0:
        raise ValueError(f"steps={cfg.steps} and keep_last={cfg.keep_last} must be >= 0 "
                         "(steps=0: evaluate the starting policy only; keep_last=0: keep all)")
    if cfg.verify_checkpoints not in VERIFY_MODES:
        raise ValueError(f"verify_checkpoints={cfg.verify_checkpoints!r}: one of {VERIFY_MODES}")
    if cfg.cluster.num_cpus is not None and cfg.cluster.num_cpus < 1:
        raise ValueError(f"cluster.num_cpus={cfg.cluster.num_cpus}: must be >= 1 (or null)")
    store = cfg.cluster.object_store_gb
    if store is not None and (cfg.cluster.address or store < 0.1):
        raise ValueError(f"cluster.object_store_gb={store}: sets a local instance's store, "
                         "at least 0.1 GiB (a cluster's is set by `ray start --object-store-memory`)")


def check_layers(cfg, num_layers: int = 1 << 16) -> None:
    """The layer selections' form; with the model's `num_layers`, also their range (the
    cold start checks that against the base model before anything trains)."""
    from omegaconf import OmegaConf

    from kernels.capture import select_layers

    for key in LAYER_KEYS:
        try:
            select_layers(OmegaConf.select(cfg, key), num_layers)
        except ValueError as e:
            raise ValueError(f"config key {key}: {e}") from None


CPU_CHOICE = {"learner.backend": "gloo, or null for the per-device default",
              "learner.weight_transport": "safetensors or buckets",
              "rollout.sleep_level": "0; vLLM's sleep mode is GPU only"}


def check_cluster(cfg) -> None:
    from omegaconf import OmegaConf

    c = cfg.cluster
    if c.name == "local" and c.address:
        raise ValueError(f"cluster=local starts a private Ray instance, but cluster.address="
                         f"{c.address!r} is set: to join a running cluster use cluster=ray "
                         "(cluster.address=auto or ray://host:10001)")
    if c.name == "ray" and not c.address:
        raise ValueError("cluster=ray joins a running Ray cluster: set cluster.address "
                         "(auto, or ray://host:10001)")
    gpu_only = {"learner.backend": ("nccl",), "learner.weight_transport": ("nccl", "ipc"),
                "rollout.sleep_level": (1, 2)}
    for key, values in gpu_only.items():
        value = OmegaConf.select(cfg, key)
        if value in values and c.name == "local":
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"{key}={value} needs GPUs: this machine has none (CPU: "
                                 f"{CPU_CHOICE[key]})")
    if cfg.learner.offload_between_updates and cfg.learner.zero_stage not in (1, 2):
        raise ValueError("learner.offload_between_updates needs learner.zero_stage 1 or 2 "
                         "(DeepSpeed's offload_states moves ZeRO-3 state only with its FusedAdam)")
    if cfg.learner.compile and (learner_attention(cfg) != "sdpa" or cfg.learner.zero_stage == 3):
        raise ValueError("learner.compile needs the stock attention (learner.attention sdpa: no "
                         "credit or AVAR reading attention statistics) and learner.zero_stage "
                         "0-2 (ZeRO-3 gathers parameters in hooks the compiled graph would skip)")
    lc = cfg.learner
    if lc.weight_transport == "ipc" and lc.num_ranks > 1:
        raise ValueError("learner.weight_transport=ipc needs learner.num_ranks=1 (vLLM's IPC "
                         "sender gathers over the learner's process group); use nccl")
    if lc.weight_transport == "ipc" and cfg.rollout.tensor_parallel_size > 1:
        raise ValueError("learner.weight_transport=ipc reads the learner's GPU buffers from an "
                         "engine on the same GPU; a tensor-parallel engine (rollout."
                         f"tensor_parallel_size={cfg.rollout.tensor_parallel_size}) spans "
                         "several: use nccl")
    if (lc.num_ranks > 1 and lc.num_gpus_per_rank is not None and 0 < lc.num_gpus_per_rank < 1
            and lc.backend != "gloo"):
        raise ValueError(f"learner.num_gpus_per_rank={lc.num_gpus_per_rank} with "
                         f"learner.num_ranks={lc.num_ranks}: Ray packs fractional GPUs, so ranks "
                         "share a GPU, and NCCL refuses two ranks of one group on one GPU "
                         "('Duplicate GPU detected'); give each rank a whole GPU, one rank, or "
                         "learner.backend=gloo")


def extra_groups(cfg) -> int:
    """GRPO groups a step adds to its prompts' (LeaF's counterfactual groups, leaf=rl)."""
    return max(cfg.leaf.counterfactual_groups, 0) if cfg.leaf.name == "rl" else 0


def avar_masses_needed(cfg) -> bool:
    """Does any AVAR part read key-class masses (every AVAR choice measures VAS)?"""
    return cfg.avar.name != "none"


def check_avar(cfg) -> None:
    v = cfg.avar
    if v.vars_coef <= 0 or v.agto_alpha < 0 or v.agto_beta < 0 or v.eps <= 0 or v.vars_clip <= 0:
        raise ValueError("avar.vars_coef, avar.eps and avar.vars_clip must be > 0 and "
                         "avar.agto_alpha, avar.agto_beta >= 0 (avar=vas for VAS without VARS)")
    from omegaconf import OmegaConf

    from rl.methods.avar.scores import system_prefix_share

    system_prefix_share(v.system)
    st = v.agto_stage
    if st.steps < 1 or st.batch_size < 1 or st.lr <= 0 or st.warmup_steps < 0:
        raise ValueError(f"avar.agto_stage: steps and batch_size must be >= 1, lr > 0 and "
                         f"warmup_steps >= 0, got {OmegaConf.to_container(st)}")
    if (avar_masses_needed(cfg) and v.evidence == "image" and cfg.model.path is None
            and cfg.model.vision is None):
        raise ValueError("avar.evidence=image reads attention to image tokens: it needs a "
                         "vision-language model (model=tiny_vl) and an image task")
    if avar_masses_needed(cfg) and cfg.learner.attention == "sdpa":
        raise ValueError(f"avar={v.name} reads attention masses: learner.attention must be "
                         "kernels (or auto), not sdpa")


def check_rollout(cfg) -> None:
    """Engine settings that would only fail inside the engine actor, checked here first.
    A local run's engines share the driver's device; on a cluster they are re-checked where
    they start."""
    import torch

    from rl.cluster.runtime import engine_config

    r = cfg.rollout
    if r.max_new_tokens < 1 or r.max_new_tokens >= r.max_model_len:
        raise ValueError(f"rollout.max_new_tokens={r.max_new_tokens} must be in "
                         f"[1, rollout.max_model_len={r.max_model_len})")
    on_gpu = torch.cuda.is_available() if cfg.cluster.address is None else True
    scheduling_args(engine_config(cfg, "<model>", seed=0), on_gpu)


def check_teacher(cfg) -> None:
    t = cfg.teacher
    if t.name == "hf" and not t.path:
        raise ValueError("teacher=hf needs teacher.path (an HF folder)")
    if t.name != "hf" and t.path:
        raise ValueError(f"teacher.path is only read with teacher=hf (teacher.name={t.name!r})")
    if t.topk < 1 or t.num_actors < 1:
        raise ValueError("teacher.topk and teacher.num_actors must be >= 1")
    lf = cfg.leaf
    if lf.name == "rl" and t.name == "none":
        raise ValueError("leaf=rl needs a teacher: teacher=tiny (its default) or teacher=hf "
                         "teacher.path=...")
    if lf.kd_coef < 0 or lf.counterfactual_groups < 0:
        raise ValueError("leaf.kd_coef and leaf.counterfactual_groups must be >= 0")
    if lf.name == "rl" and lf.kd_coef == 0 and lf.counterfactual_groups == 0:
        raise ValueError("leaf=rl with leaf.kd_coef=0 and leaf.counterfactual_groups=0 does "
                         "nothing: set one of them, or leaf=none")
    d = cfg.distill
    if d.name != "none" and t.name == "none":
        raise ValueError(f"distill={d.name} distils from a teacher: set teacher=tiny or "
                         "teacher=hf teacher.path=...")
    if not 0.0 <= d.mix <= 1.0:
        raise ValueError(f"distill.mix={d.mix} must be in [0, 1]")
    if not 0.0 < cfg.leaf.quantile < 1.0 or not 0.0 < cfg.leaf.cap <= 1.0:
        raise ValueError("leaf.quantile must be in (0, 1) and leaf.cap in (0, 1]")
    if d.steps < 1 or d.batch_size < 1 or d.detect_samples < 1 or d.response_segments < 2:
        raise ValueError("distill.steps, batch_size, detect_samples must be >= 1 and "
                         "response_segments >= 2")
    if d.batch_size % cfg.learner.num_ranks:
        raise ValueError(f"distill.batch_size={d.batch_size} must be a multiple of "
                         f"learner.num_ranks={cfg.learner.num_ranks}")


def build_credit(cfg):
    """The configured credit method (typed parameters; raises naming a bad key)."""
    from rl.methods.credit import from_config

    return from_config(cfg)


def learner_attention(cfg) -> str:
    """learner.attention with `auto` resolved: the kernels only when a method reads attention
    statistics."""
    if cfg.learner.attention != "auto":
        return cfg.learner.attention
    return "kernels" if build_credit(cfg).stats_request() or avar_masses_needed(cfg) else "sdpa"


def engine_attention(cfg) -> dict:
    """learner.attention as the engine's settings: the attention of forwards that capture
    statistics, and of the others."""
    attention = learner_attention(cfg)
    if attention == "sdpa":
        return {"attention": "sdpa", "plain_attention": "sdpa"}
    plain = "kernels" if attention == "kernels_everywhere" else "sdpa"
    return {"attention": "kernels", "plain_attention": plain}
