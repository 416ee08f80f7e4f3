"""How weights travel from the learner to the rollout engines: one small transport interface.

The trainer never branches on the transport. A transport packs named tensors on the learner
side into a payload that Ray can carry, and unpacks it inside the vLLM worker, where
`rollout.vllm_internals` loads it. On CPU the payload is a safetensors blob (ENVIRONMENT.md
trap 5: tensors nested in RPC arguments arrive as lists, bytes arrive intact). A GPU transport
(vLLM's NCCL/IPC weight-transfer engines) implements the same three methods, sending buckets
over a collective instead of returning a blob.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Iterator

import torch


class WeightTransport(ABC):
    name: str

    @abstractmethod
    def pack(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> object:
        """Learner side: turn (name, full tensor) pairs into something the engines receive."""

    @abstractmethod
    def unpack(self, payload: object) -> Iterator[tuple[str, torch.Tensor]]:
        """Engine side (inside the vLLM worker): the (name, tensor) pairs to load."""

    def payload_bytes(self, payload: object) -> int:
        return len(payload) if isinstance(payload, (bytes, bytearray)) else 0


class SafetensorsTransport(WeightTransport):
    """Whole state as one safetensors blob through the Ray object store (CPU, small models)."""

    name = "safetensors"

    def pack(self, named_tensors):
        from safetensors.torch import save

        return save({n: t.detach().contiguous().cpu() for n, t in named_tensors})

    def unpack(self, payload):
        from safetensors.torch import load

        yield from load(bytes(payload)).items()


TRANSPORTS = {"safetensors": SafetensorsTransport}


def get_transport(name: str = "safetensors") -> WeightTransport:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {name!r}; known: {sorted(TRANSPORTS)}")
    return TRANSPORTS[name]()
