"""The training-engine boundary: everything outside rl/engine/ sees only this.

Nothing outside the engine knows it is DeepSpeed, so another backend (FSDP2, Megatron) is one
more file here. Batches cross the boundary as dicts of [B, T] tensors (see rl/batch.py for
their meaning); losses are chosen by name and config, not passed as closures, because the
engine lives in a Ray actor on another process.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import torch


class ScoringEngine(ABC):
    """What a model that is read but not trained answers: the LeaF teacher, and the policy
    itself (every TrainEngine is one)."""

    @abstractmethod
    def score(self, batch: dict[str, torch.Tensor], temperature: float) -> dict[str, torch.Tensor]:
        """No-grad forward: per-token `logprobs` and `entropy` [B, T] of the model."""

    @abstractmethod
    def input_grad_norms(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T] ‖∂L/∂e_t‖₂: gradient of each row's mean response cross-entropy with respect
        to its input embeddings (LeaF's sensitivity); no parameter gradient is kept."""

    @abstractmethod
    def topk_logprobs(self, batch: dict[str, torch.Tensor], k: int,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k next-token ids and log-probs [B, T, k] per position (distillation targets)."""


class TrainEngine(ScoringEngine):

    @abstractmethod
    def ref_score(self, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """Per-token logprobs of the frozen reference model (KL); raises if none was loaded."""

    @abstractmethod
    def train_minibatch(self, micro_batches: list[dict[str, torch.Tensor]], loss: str,
                        loss_cfg, normaliser: float, temperature: float) -> dict[str, float]:
        """Forward/backward over the micro-batches, then one optimizer step (or a logged skip)."""

    @abstractmethod
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (gathered) weights in HF naming; every rank must iterate, rank 0 gets values."""

    @abstractmethod
    def set_lr(self, lr: float) -> None: ...

    @abstractmethod
    def save(self, path: str) -> None:
        """Model + optimizer + scheduler state; every rank calls it with the same path."""

    @abstractmethod
    def load(self, path: str) -> None: ...

    @abstractmethod
    def export_hf(self, path: str) -> None:
        """An HF folder (safetensors + config + tokenizer) that vLLM and transformers load."""
