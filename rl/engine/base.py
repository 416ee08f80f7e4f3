"""The training-engine boundary: everything outside rl/engine/ sees only this.

Nothing outside the engine knows it is DeepSpeed, so another backend (FSDP2, Megatron) is one
more file here. Batches cross the boundary as dicts of [B, T] tensors (see rl/batch.py for
their meaning). The engine takes its objective as a `Loss` object (pickled into the Ray actor
that holds the engine): the policy loss, the cold start's, a method's extra terms — it runs
whichever it is given through its `Forwards` and never chooses one by name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class LossOut:
    """One micro-batch's share of a loss: `value` (already over the minibatch's global
    normaliser), its metrics, and per metric the tokens (or rows) it is an average over, so
    micro-batches and ranks combine into the minibatch's average."""
    value: torch.Tensor
    metrics: dict[str, float]
    weights: dict[str, float]


class Forwards(ABC):
    """What a loss may run on the model being trained, inside one micro-batch."""

    @abstractmethod
    def logprobs(self, b: dict, temperature: float, entropy: bool = False):
        """Per-token (logprobs, entropy or None) [B, T]: packed rows where they apply."""

    @abstractmethod
    def logits(self, *row_sets: dict) -> list[torch.Tensor]:
        """[B_i, T_i, V] logits of each row set, all from one forward (every rank runs the same
        number of forwards under ZeRO-3, whatever its mix of rows)."""

    @abstractmethod
    def attention(self, layers, spec, grad_mass: bool = False):
        """An AttentionCapture (kernels/capture.py) on the model's layers: statistics of the
        forwards run inside it; with `grad_mass`, key-class masses that carry gradient."""

    @abstractmethod
    def frozen_logprobs(self, name: str, b: dict) -> torch.Tensor:
        """[B, T, V] next-token log-probs of the frozen model `name` loaded beside the policy
        (DSEngineConfig.frozen_models)."""


class Loss(ABC):
    """A training objective the engine runs without knowing what it is."""

    def bind(self, rows: dict[str, torch.Tensor], extra: dict[str, dict]) -> "Loss":
        """This loss for one minibatch (`rows`, plus any extra row sets by name), before it is
        split over ranks and micro-batches: where global normalisers are counted."""
        return self

    @abstractmethod
    def __call__(self, model: Forwards, b: dict, temperature: float) -> LossOut:
        """One micro-batch `b` (tensors; its share of extra row sets under b["extra"][name])."""


class Readable(ABC):
    """What a Probe may read of a model, inside the process that holds it."""

    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The model itself (e.g. for gradients with respect to its input embeddings)."""

    @abstractmethod
    def next_token_logprobs(self, b: dict, temperature: float) -> torch.Tensor:
        """[B, T, V] log-probs of the next token at every position (column 0 all zeros)."""


class Probe(ABC):
    """A read of a model that is not a training step — gradient sensitivities, top-k
    next-token targets —, handed to the engine as an object like a Loss: the
    engine runs it without knowing what it is. Returns [B, ...] tensors (or a tuple of them)."""

    @abstractmethod
    def __call__(self, model: Readable, b: dict):
        ...


class ScoringEngine(ABC):
    """What a model that is read but not trained answers: a frozen model, and the policy
    itself (every TrainEngine is one)."""

    @abstractmethod
    def score(self, batch: dict[str, torch.Tensor], temperature: float,
              stats: dict | None = None) -> dict[str, torch.Tensor]:
        """No-grad forward: per-token `logprobs` and `entropy` [B, T] of the model (and the
        attention statistics `stats` asks for: rl/engine/frozen.py `scored`)."""

    @abstractmethod
    def probe(self, batch: dict[str, torch.Tensor], probe: Probe):
        """`probe` run on this model over the batch; its tensors come back on the CPU."""


class TrainEngine(ScoringEngine):

    @abstractmethod
    def ref_score(self, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """Per-token logprobs of the frozen reference model (KL); raises if none was loaded."""

    @abstractmethod
    def train_minibatch(self, micro_batches: list[dict], loss: Loss,
                        temperature: float) -> dict[str, float]:
        """Forward/backward of `loss` (bound to the minibatch) over the micro-batches, then one
        optimizer step (or a logged skip)."""

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
