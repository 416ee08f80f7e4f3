"""Typed schemas for every Hydra config group.

Hydra validates the composed YAML against these dataclasses, so an unknown key or a value of
the wrong type fails at composition time, naming the key — before Ray or any actor starts.
Defaults here are the embedded local-CPU run; each group's YAML under conf/ documents its keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from rl.models.tiny_model import TinyModelSpec
from rl.models.tiny_vl import TinyVisionSpec


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
    # A folder with a chat template renders prompts with it (rl/tasks/prompt_format.py); these keys
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
class SftSchedule:
    """The training loop every supervised stage shares (the cold start, the tiny teacher's
    training, offline distillation): optimizer steps, rows per step, the peak learning rate
    and its linear warm-up (then cosine decay to 10%)."""
    steps: int = 260
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30


# Keys marked MOVED were renamed or folded into a config group. They stay in the schema (null)
# so that an old command line fails at start naming the new spelling (rl/config_checks.py
# MOVED_KEYS) instead of as an unknown key.
@dataclass
class ColdStartConfig(SftSchedule):
    """Supervised warm-start on the task's worked solutions, before RL."""
    # null: on for a model built here (model.path=null: random weights), off for a checkpoint
    # given as model.path (RL starts from it, as in every peer); true/false: always/never.
    enabled: Optional[bool] = None
    # Skip the stage when a checkpoint with the same model/task/cold-start config exists.
    reuse: bool = True
    # task.params overrides for the SFT data only (e.g. {distractor_prob: 0.0}: a student
    # that never saw a distractor, for LeaF); RL and evaluation use task.params.
    task_params: Dict[str, Any] = field(default_factory=dict)
    objective: Optional[str] = None   # MOVED: avar=agto (or avar=agto_vars)


@dataclass
class AvarConfig:
    """AVAR (arXiv 2603.03825; conf/avar/): attention to the evidence against attention to
    the system prompt, read from the kernels' key-class masses (rl/methods/avar/). The group's choice
    says which parts run: none | vas (measured at evaluations) | vars (+ VARS reward shaping)
    | agto (+ the AGTO cold start) | agto_vars (both)."""
    name: str = "none"
    evidence: str = "evidence"        # the key class set against the system prompt: evidence (text tasks) | image (VLM)
    layers: str = "all"               # layers VAS, VARS and AGTO read: all | middle:n
    eps: float = 1e-6                 # ε of r_visual's and L_sys's denominators / logs
    agto_alpha: float = 0.15          # AGTO: weight α of L_img (raise evidence attention)
    agto_beta: float = 0.15           # ... and β of L_sys (lower system attention)
    # Where AGTO trains (avar=agto|agto_vars): cold_start = the cold start's objective from the
    # built model's random weights; stage = a short stage of its own (`agto_stage`) after the
    # LM cold start — the authors' setting, a trained model at a low learning rate.
    agto_at: str = "cold_start"
    agto_stage: SftSchedule = field(default_factory=lambda: SftSchedule(
        steps=60, batch_size=64, lr=1e-4, warmup_steps=6))
    # The system keys that VAS, VARS and AGTO set against the evidence: instruction (the task's
    # instruction tokens) | template_prefix:<share> (the first share of the prompt, its first
    # token — a real model's attention sink — included; the authors' set, e.g. template_prefix:0.4)
    system: str = "instruction"
    vars_coef: float = 0.3            # VARS λ_v: reward += λ_v · r_visual of correct responses (paper 0.3)
    vars_norm: str = "none"           # r_visual's scale: none | clip (at vars_clip) | group_z (z-score over a group's correct responses)
    vars_clip: float = 10.0
    vas: Optional[str] = None         # MOVED: avar=vas measures VAS alone; every AVAR choice measures it


@dataclass
class TeacherTrainConfig(SftSchedule):
    """How the project trains its own tiny teacher: the cold-start SFT code, on the task's
    data with these parameter overrides (e.g. distractors, so it learns to ignore them)."""
    task_params: Dict[str, Any] = field(default_factory=dict)
    steps: int = 600


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
    """LeaF (conf/leaf/): its confounder detection (read by distill=leaf|leaf_response too) and,
    with leaf=rl, its terms inside RL (§2.7, our extension, not in the paper): each step, on
    the step's prompts (the best response of each group as the continuation), confounders →
    one pruned copy."""
    name: str = "none"                # none | rl
    quantile: float = 0.10            # confounders: Δ ≤ the per-sample order statistic at ⌊n·q⌋ ...
    cap: float = 0.5                  # ... capped at this value (§2.1)
    unit: str = "token"               # what is scored, thresholded and pruned: token (the paper) | word (mean Δ per \w+ run or punctuation token; whole words pruned)
    pruning: str = "span"             # span (one counterfactual per span) | collective (all spans at once)
    validate: bool = True             # keep a counterfactual only if teacher and student both answer it correctly
    chunk: int = 64                   # rows per gradient pass
    kd_coef: float = 0.1              # leaf=rl (b): weight of KL(p_T ‖ p_S) on pruned prompt ⊕ response, added to the policy loss (0 = off)
    counterfactual_groups: int = 16   # leaf=rl (c): prompts per step whose pruned copy is also rolled out as an extra GRPO group (0 = off)
    kl_coef: Optional[float] = None   # MOVED: leaf=rl leaf.kd_coef=...


@dataclass
class DistillConfig(SftSchedule):
    """Offline distillation from the teacher between the cold start and RL (conf/distill/):
    none | kd (plain KD) | leaf (LeaF, instruction level) | leaf_response (+ response level).
    `python -m launch.distill` runs it alone; `launch.train` starts RL from its checkpoint."""
    name: str = "none"
    steps: int = 150                  # optimizer steps of the KD loss (the same budget for every mode)
    lr: float = 1e-3
    warmup_steps: int = 10
    # λ (§2.3): the least share of original (unpruned) rows per batch. Counterfactuals are used
    # once each, spread over the steps (the authors' data mixing), up to 1 − λ of a batch; kd
    # uses originals only.
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
    # Placement (rl/cluster/placement.py). None = tensor_parallel_size GPUs when the Ray cluster has
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
    # The learner's attention. sdpa: the model's stock attention in every forward. kernels: our
    # fused kernels (kernels/: Triton on GPU, blockwise PyTorch on CPU) in the forwards that
    # capture statistics, stock attention in the others (faster on CPU). kernels_everywhere:
    # ours in every forward, training's included (statistics off where none are captured).
    # auto: kernels when a method reads attention statistics, else sdpa.
    attention: str = "auto"
    attn_impl: Optional[str] = None       # MOVED: learner.attention
    plain_attention: Optional[str] = None  # MOVED: learner.attention=kernels_everywhere
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
    # How a checkpoint is checked against its manifest on resume and after it is written:
    # full (every file's size and checksum) | fast (sizes; checksums of files up to 64 MiB)
    verify_checkpoints: str = "full"
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
