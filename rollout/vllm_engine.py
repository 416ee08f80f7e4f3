"""One vLLM engine, meant to live in its own Ray actor (`ray.remote(VLLMEngine)`).

It takes token ids (the trainer tokenizes, so segment spans stay aligned with what the model
sees) and returns token ids plus the sampler's logprobs of the sampled tokens, under the
*processed* distribution (after temperature/top-p), which is what PPO's ratio needs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass
class EngineConfig:
    model_path: str
    dtype: str = "float32"
    max_model_len: int = 256
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.1
    seed: int = 0


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class VLLMEngine:
    def __init__(self, cfg: EngineConfig, transport: str = "safetensors"):
        # Built here, not at import: vLLM spawns workers (ENVIRONMENT.md trap 4).
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        from vllm import LLM

        from rollout.vllm_internals import WORKER_EXTENSION

        t0 = time.perf_counter()
        self.cfg = cfg
        self.transport = transport
        self.llm = LLM(
            model=cfg.model_path,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            seed=cfg.seed,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
        )
        self.weight_version = 0
        self.start_s = time.perf_counter() - t0

    def ready(self) -> dict:
        return {"start_s": self.start_s, "pid": os.getpid()}

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seeds: list[int] | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt; a per-prompt seed makes sampling reproducible (resume)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                logprobs=0 if temperature > 0 else None,
                seed=None if seeds is None else seeds[i],
            )
            for i in range(len(prompt_token_ids))
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids], params,
            use_tqdm=False,
        )
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

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Logprob of each token given the ones before it (first token: none) — to compare
        the engine's weights with the learner's."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], sp,
                                 use_tqdm=False)
        return [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], s[1:])]
                for o, s in zip(outs, sequences)]

    def update_weights(self, payload, version: int) -> dict:
        results = self.llm.collective_rpc("receive_weights", args=(self.transport, payload))
        # Cached KV of earlier prompts was computed with the old weights.
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return {"version": version, "load_s": max(r["load_s"] for r in results)}

    def get_weight_version(self) -> int:
        return self.weight_version
