"""Typed schemas for every Hydra config group.

Hydra validates the composed YAML against these dataclasses, so an unknown key or a value of
the wrong type fails at composition time, naming the key — before Ray or any actor starts.
Defaults here are the embedded local-CPU run; each group's YAML under conf/ documents its keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from rl.algorithms.overlong import OverlongConfig, validate as validate_overlong
from rl.tiny_model import TinyModelSpec
from rl.tiny_vl import TinyVisionSpec
from rollout.vllm_engine import scheduling_args


@dataclass
class ModelConfig:
    name: str = "tiny"
    # An HF folder or hub name. None: build the tiny char-level model from `tiny`.
    path: Optional[str] = None
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    # With path=None: null builds a text-only Qwen3 from `tiny`; a vision tower here builds a
    # Qwen2.5-VL instead (text part from `tiny`), for image tasks (conf/model/tiny_vl.yaml).
    vision: Optional[TinyVisionSpec] = None
    dtype: str = "float32"
    # A folder with a chat template renders prompts with it (rl/prompt_format.py); these keys
    # are passed to it (e.g. Qwen3's {enable_thinking: false}).
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    # For a folder WITHOUT a chat template only: text before each prompt / between prompt and
    # response (a template stand-in; must be '' when the folder has a template).
    prompt_prefix: str = ""
    response_prefix: str = ""


@dataclass
class TaskConfig:
    name: str = "arith"
    params: Dict[str, Any] = field(default_factory=dict)
    seed: int = 1234
    eval_size: int = 200


@dataclass
class ColdStartConfig:
    """Supervised warm-start on the task's worked solutions, before RL."""
    # null: on for a model built here (model.path=null: random weights), off for a checkpoint
    # given as model.path (RL starts from it, as in every peer); true/false: always/never.
    enabled: Optional[bool] = None
    steps: int = 260
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    # Skip the stage when a checkpoint with the same model/task/cold-start config exists.
    reuse: bool = True
    # task.params overrides for the SFT data only (e.g. {distractor_prob: 0.0}: a student
    # that never saw a distractor, for LeaF); RL and evaluation use task.params.
    task_params: Dict[str, Any] = field(default_factory=dict)
    # lm: next-token loss on the solutions. agto: + AVAR's attention terms (avar.agto_*).
    objective: str = "lm"


@dataclass
class AvarConfig:
    """AVAR (arXiv 2603.03825): attention to the evidence against attention to the system
    prompt, read from the kernels' key-class masses (rl/avar/)."""
    evidence: str = "evidence"        # the key class set against the system prompt: evidence (text tasks) | image (VLM)
    layers: str = "all"               # layers VAS, VARS and AGTO read: all | middle:n
    eps: float = 1e-6                 # ε of r_visual's and L_sys's denominators / logs
    vas: str = "auto"                 # VAS at every evaluation: auto (when AGTO or VARS is on) | always | never
    agto_alpha: float = 0.15          # cold_start.objective=agto: weight α of L_img (raise evidence attention)
    agto_beta: float = 0.15           # ... and β of L_sys (lower system attention)
    vars_coef: float = 0.0            # VARS λ_v: reward += λ_v · r_visual of correct responses (0 = off; paper 0.3)
    vars_norm: str = "none"           # r_visual's scale: none | clip (at vars_clip) | group_z (z-score over a group's correct responses)
    vars_clip: float = 10.0


@dataclass
class TeacherTrainConfig:
    """How the project trains its own tiny teacher: the cold-start SFT code, on the task's
    data with these parameter overrides (e.g. distractors, so it learns to ignore them)."""
    task_params: Dict[str, Any] = field(default_factory=dict)
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30


def _teacher_tiny() -> TinyModelSpec:
    return TinyModelSpec(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=3, num_key_value_heads=1)


@dataclass
class TeacherConfig:
    """A frozen teacher for LeaF (conf/teacher/): none | tiny (built and trained here) | hf."""
    name: str = "none"
    path: Optional[str] = None        # hf: an HF folder with the student's tokenizer
    # actors: its own Ray actors (on a cluster, its own GPUs); distillation targets travel as
    # top-k log-probs + tail mass. colocated: loaded inside every learner rank; full
    # next-token distributions, no transfer (small teachers).
    placement: str = "actors"
    topk: int = 64
    num_actors: int = 1
    num_cpus_per_actor: float = 0.5
    torch_threads: int = 1
    tiny: TinyModelSpec = field(default_factory=_teacher_tiny)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


@dataclass
class LeafConfig:
    """LeaF's confounder detection (read by distill=leaf|leaf_response and by the RL terms)."""
    quantile: float = 0.10            # confounders: Δ ≤ the per-sample order statistic at ⌊n·q⌋ ...
    cap: float = 0.5                  # ... capped at this value (§2.1)
    pruning: str = "span"             # span (one counterfactual per span) | collective (all spans at once)
    validate: bool = True             # keep a counterfactual only if teacher and student both answer it correctly
    chunk: int = 64                   # rows per gradient pass
    # LeaF inside RL (§2.7, our extension, not in the paper). Each step, on the step's prompts
    # (the best response of each group as the continuation): confounders → one pruned copy.
    kl_coef: float = 0.0              # (b) weight of KL(p_T ‖ p_S) on pruned prompt ⊕ response, added to the policy loss
    counterfactual_groups: int = 0    # (c) prompts per step whose pruned copy is also rolled out as an extra GRPO group


@dataclass
class DistillConfig:
    """Offline distillation from the teacher between the cold start and RL (conf/distill/):
    none | kd (plain KD) | leaf (LeaF, instruction level) | leaf_response (+ response level).
    `python -m launch.distill` runs it alone; `launch.train` starts RL from its checkpoint."""
    name: str = "none"
    steps: int = 150                  # optimizer steps of the KD loss (the same budget for every mode)
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 10
    # λ (§2.3): the share of original (unpruned) rows in each batch once counterfactuals exist;
    # the rest are pruned counterfactuals, cycled. kd uses originals only.
    mix: float = 0.5
    detect_samples: int = 512         # train problems the student answers (greedy); LeaF detects on the ones it gets wrong
    detect_offset: int = 1_000_000    # their data position (apart from the KD originals at 0, 1, ...)
    response_segments: int = 2        # leaf_response: the solution is cut into this many parts; the first is context
    reuse: bool = True                # skip the stage when the same checkpoint is cached


@dataclass
class AlgorithmConfig:
    # Advantage estimator: grpo (group mean baseline, optional std scaling) | rloo (leave-one-out).
    advantage: str = "grpo"
    std_normalize: bool = True        # False = Dr.GRPO
    loss_agg: str = "token_mean"      # token_mean | seq_mean
    n_samples: int = 8                # responses per prompt
    prompts_per_step: int = 32
    minibatch_size: int = 128         # responses per optimizer step (global, all ranks)
    epochs: int = 1                   # passes over the step's rollouts
    clip_low: float = 0.2
    clip_high: float = 0.28           # clip-higher (DAPO); = clip_low gives symmetric PPO-clip
    kl_coef: float = 0.0              # > 0 loads a frozen reference model
    kl_estimator: str = "k3"          # k1 | k3
    entropy_coef: float = 0.0
    # Importance weight ρ = π_old / π_sampler for the sampler/learner gap (async rollouts: the
    # sampler is up to rollout.async_steps versions old). tis_cap = c; 0 disables it.
    tis_cap: float = 0.0
    tis_mode: str = "truncate"        # truncate: min(ρ, c) | mask: drop tokens with ρ outside [1/c, c]
    # Responses cut at rollout.max_new_tokens (DAPO §3.4, rl/algorithms/overlong.py): keep
    # (trained as they are) | filter (out of the loss, still in their group's baseline) |
    # penalty (reward += overlong_penalty · R_length, ramping to -1 over the last
    # overlong_buffer tokens before the limit).
    overlong: str = "keep"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    lr: float = 5e-5
    lr_warmup_steps: int = 10         # linear warm-up of the RL learning rate (fresh Adam)
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class RewardConfig:
    # Extra components by name or "package.module:function", with weights; the task's own
    # verifier always counts with weight 1. Weight 0 = computed and logged only.
    components: Dict[str, float] = field(default_factory=lambda: {"format": 0.0})
    num_workers: int = 1
    timeout_s: float = 5.0


@dataclass
class CreditConfig:
    name: str = "none"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutConfig:
    num_engines: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_model_len: int = 256
    enforce_eager: bool = True
    # The share of its device's memory an engine takes for weights + KV cache; None = the
    # per-device default (rollout/vllm_engine.py memory_utilization): 0.1 of host RAM on CPU,
    # 0.9 of a GPU of its own, 0.7 × its share of a GPU it shares with the learner.
    gpu_memory_utilization: Optional[float] = None
    num_cpus_per_engine: float = 0.5
    eval_temperature: float = 0.0     # 0 = greedy held-out evaluation
    eval_samples: int = 4             # sampled responses per held-out problem (0 = skip)
    # Engine scheduling (rollout/vllm_engine.py scheduling_args); None = per-device default:
    # chunked prefill off on CPU (seeded sampling cannot survive a split prefill there), on on GPU.
    chunked_prefill: Optional[bool] = None
    max_num_batched_tokens: Optional[int] = None  # tokens per engine step; CPU: max(4096, max_model_len)
    max_num_seqs: Optional[int] = None            # sequences per engine step; None = vLLM's 256
    tensor_parallel_size: int = 1     # GPUs one engine shards its model over
    # Placement (rl/placement.py). None = tensor_parallel_size GPUs when the Ray cluster has
    # GPUs, else 0.
    num_gpus_per_engine: Optional[float] = None
    resources_per_engine: Dict[str, float] = field(default_factory=dict)  # custom Ray resources
    max_restarts: int = 3             # Ray restarts of a dead engine (its prompts are re-issued)
    # Sharing one GPU with the learner: vLLM sleep mode between generations (GPU only).
    # 0: never | 1: weights to CPU, KV cache dropped | 2: both dropped (the sync reloads)
    sleep_level: int = 0
    # CPU threads per engine. None = the cores ÷ the engines on the node (the loop is
    # synchronous: the learner idles while they generate); halved with async_steps > 0
    torch_threads: Optional[int] = None
    # Policy versions a batch may lag the learner that trains on it: 0 = synchronous; k > 0 =
    # the engines generate steps t+1..t+k while the learner scores and updates step t
    async_steps: int = 0


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    zero_stage: int = 2
    micro_batch_size: int = 128       # responses per rank per forward
    gradient_checkpointing: bool = False
    backend: Optional[str] = None     # gloo | nccl; None = gloo on CPU, nccl on GPU
    # sdpa | kernels (fused attention that emits statistics) | auto: kernels when the credit
    # method reads attention statistics, else sdpa
    attention: str = "auto"
    attn_impl: str = "auto"           # auto (triton on GPU, blockwise on CPU) | blockwise | triton
    # With kernels: attention of forwards that record no statistics (training, other layers):
    # sdpa (faster on CPU) | kernels (ours with statistics off)
    plain_attention: str = "sdpa"
    stats_layers: str = "middle:5"    # layers whose statistics are captured: all | middle:n
    num_cpus_per_rank: float = 0.5
    # Per rank. None = the cores this process may use ÷ the group's ranks on its node: the
    # loop is synchronous, so the engines sit idle while the learner computes (2 threads on this
    # 2-core machine: update 0.82 → 0.54 s, scoring 0.25 → 0.15 s, benchmarks/bench_step.py);
    # halved with rollout.async_steps > 0 (both compute at once: 2 + 2 threads on 2 cores made
    # the update 8× slower)
    torch_threads: Optional[int] = None
    num_gpus_per_rank: Optional[float] = None  # None = 1 when the Ray cluster has GPUs, else 0
    # How weights reach the engines (rollout/weight_sync.py): safetensors (one blob through the
    # object store) | buckets (the same, loaded bucket by bucket) | nccl | ipc (GPU only:
    # rank 0 sends into the engines through vLLM's weight-transfer engines; untested here)
    weight_transport: str = "safetensors"
    weight_bucket_mb: int = 256
    # Sharing one GPU with an engine: optimizer state, fp32 master weights and gradient buffers
    # wait in CPU memory between updates (DeepSpeed offload_states; the bf16 weights stay)
    offload_between_updates: bool = False
    resources_per_rank: Dict[str, float] = field(default_factory=dict)  # custom Ray resources
    # torch.compile the policy (dynamic shapes; learner.attention sdpa, ZeRO 0-2): its forwards
    # and backwards ~1.5x faster on CPU, after a compile of ~35 s (2 cores) at the first update
    # and the first scoring forward of every learner start
    compile: bool = False
    # Forwards on packed rows: the batch's real tokens in one row, a GRPO group's shared prefix
    # once, attention per sequence (rl/engine/packing.py, kernels/varlen.py; checked against
    # padded rows on a small batch at start). Text batches with learner.attention sdpa;
    # false = right-padded rows
    padding_free: bool = True


@dataclass
class ClusterConfig:
    name: str = "local"
    address: Optional[str] = None     # None = start a local Ray instance
    num_cpus: Optional[int] = None
    # A local instance's object store (shared memory), GiB; null: Ray's default, 30% of RAM.
    # Weight payloads pass through it, and pages it has once used stay resident, so on a small
    # machine a large model's payloads fill it up to that size (benchmarks/results/real_shape/).
    object_store_gb: Optional[float] = None
    # Longest wait for one call into the actors (a generation, a minibatch update, a sync): a
    # dead actor is noticed at once, a silent one after this; then the run recovers or stops.
    call_timeout_s: float = 900.0
    placement_timeout_s: float = 120.0  # longest wait for the resources of an actor group


@dataclass
class LoggerConfig:
    name: str = "wandb"               # wandb | none
    project: str = "attn-credit-rl"
    mode: str = "auto"                # auto (online if logged in, else offline) | offline | online
    sample_table_rows: int = 8
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    leaf: LeafConfig = field(default_factory=LeafConfig)
    avar: AvarConfig = field(default_factory=AvarConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "default"
    seed: int = 0
    steps: int = 150
    eval_every: int = 25
    save_every: int = 20
    keep_last: int = 2
    resume: bool = False
    output_dir: str = "outputs/${name}/seed${seed}"
    # Base models and cold-start checkpoints, shared by runs with the same config.
    cache_dir: str = "outputs/cache"
    # Stop (as if killed) after this step; for resume tests. None = run all steps.
    stop_after: Optional[int] = None
    # Learner-group failures (a dead or hung rank) survived by restarting the group from the
    # last checkpoint; one more stops the run.
    max_failures: int = 2


def register_configs() -> None:
    """Make the schema the base of conf/config.yaml so Hydra type-checks every group."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


VALID_CHOICES = {
    "algorithm.advantage": ("grpo", "rloo"),
    "algorithm.loss_agg": ("token_mean", "seq_mean"),
    "algorithm.kl_estimator": ("k1", "k3"),
    "algorithm.tis_mode": ("truncate", "mask"),
    "algorithm.overlong": ("keep", "filter", "penalty"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("auto", "offline", "online", "disabled"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "learner.attention": ("auto", "sdpa", "kernels"),
    "learner.attn_impl": ("auto", "blockwise", "triton", "reference"),
    "learner.plain_attention": ("sdpa", "kernels"),
    "learner.weight_transport": ("safetensors", "buckets", "nccl", "ipc"),
    "rollout.sleep_level": (0, 1, 2),
    "teacher.name": ("none", "tiny", "hf"),
    "teacher.placement": ("actors", "colocated"),
    "distill.name": ("none", "kd", "leaf", "leaf_response"),
    "leaf.pruning": ("span", "collective"),
    "cold_start.objective": ("lm", "agto"),
    "avar.evidence": ("evidence", "image"),
    "avar.vas": ("auto", "always", "never"),
    "avar.vars_norm": ("none", "clip", "group_z"),
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
# Layer selections read by the statistics capture (kernels/capture.py `select_layers`).
LAYER_KEYS = ("learner.stats_layers", "avar.layers")


def overlong_config(cfg) -> OverlongConfig:
    a = cfg.algorithm
    return OverlongConfig(a.overlong, a.overlong_buffer, a.overlong_penalty)


def check_config(cfg) -> None:
    """Cross-field checks Hydra's types cannot express; raises ValueError naming the key."""
    from omegaconf import OmegaConf

    for key, allowed in VALID_CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ValueError(f"config key {key}={value!r}: must be one of {allowed}")
    check_sizes(cfg)
    check_layers(cfg)
    check_cluster(cfg)
    a, lr = cfg.algorithm, cfg.learner
    groups = a.prompts_per_step + max(cfg.leaf.counterfactual_groups, 0)
    batch = groups * a.n_samples
    if batch % a.minibatch_size:
        raise ValueError(
            f"algorithm.minibatch_size={a.minibatch_size} must divide "
            f"(prompts_per_step + leaf.counterfactual_groups) * n_samples={batch}")
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


def _agto_or_vars(cfg) -> bool:
    return cfg.cold_start.objective == "agto" or cfg.avar.vars_coef > 0


def vas_at_eval(cfg) -> bool:
    return cfg.avar.vas == "always" or (cfg.avar.vas == "auto" and _agto_or_vars(cfg))


def avar_masses_needed(cfg) -> bool:
    """Does any AVAR part read key-class masses (AGTO cold start, VARS, VAS at eval)?"""
    return _agto_or_vars(cfg) or vas_at_eval(cfg)


def check_avar(cfg) -> None:
    v = cfg.avar
    if v.vars_coef < 0 or v.agto_alpha < 0 or v.agto_beta < 0 or v.eps <= 0 or v.vars_clip <= 0:
        raise ValueError("avar.vars_coef, agto_alpha, agto_beta must be >= 0 and avar.eps, "
                         "vars_clip > 0")
    if (avar_masses_needed(cfg) and v.evidence == "image" and cfg.model.path is None
            and cfg.model.vision is None):
        raise ValueError("avar.evidence=image reads attention to image tokens: it needs a "
                         "vision-language model (model=tiny_vl) and an image task")
    if avar_masses_needed(cfg) and cfg.learner.attention == "sdpa":
        raise ValueError("AVAR (cold_start.objective=agto, avar.vars_coef > 0 or avar.vas) reads "
                         "attention masses: learner.attention must be kernels (or auto), not sdpa")


def check_rollout(cfg) -> None:
    """Engine settings that would only fail inside the engine actor, checked here first.
    A local run's engines share the driver's device; on a cluster they are re-checked where
    they start."""
    import torch

    from rl.runtime import engine_config

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
    if (lf.kl_coef > 0 or lf.counterfactual_groups > 0) and t.name == "none":
        raise ValueError("leaf.kl_coef / leaf.counterfactual_groups need a teacher: set "
                         "teacher=tiny or teacher=hf teacher.path=...")
    if lf.kl_coef < 0 or lf.counterfactual_groups < 0:
        raise ValueError("leaf.kl_coef and leaf.counterfactual_groups must be >= 0")
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
    from omegaconf import OmegaConf

    from rl.credit import build

    params = OmegaConf.to_container(cfg.credit.params, resolve=True) if not isinstance(
        cfg.credit.params, dict) else dict(cfg.credit.params)
    return build(cfg.credit.name, params, seed=cfg.seed)


def learner_attention(cfg) -> str:
    """learner.attention with `auto` resolved: the kernels only when credit or AVAR reads
    attention statistics."""
    if cfg.learner.attention != "auto":
        return cfg.learner.attention
    return "kernels" if build_credit(cfg).stats_request() or avar_masses_needed(cfg) else "sdpa"
