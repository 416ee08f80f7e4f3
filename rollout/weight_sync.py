"""How weights travel from the learner to the rollout engines: one small transport interface.

Two kinds, told apart by `collective` (the one place a trainer looks at which it has):

- Payload transports ("safetensors", "buckets") turn the learner's tensors into one object Ray
  can carry. The driver puts it in the object store once; every engine unpacks it inside its
  vLLM worker, where `rollout.vllm_internals.WeightReceiver.receive_weights` loads it. They run
  anywhere, CPU included (ENVIRONMENT.md trap 5: tensors nested in RPC arguments arrive as
  lists, bytes arrive intact, so payloads are bytes and plain lists).
- Collective transports ("nccl", "ipc") cannot be a payload: NCCL's sender and receivers must
  sit in the same broadcast at once, and a CUDA IPC buffer must stay alive until the engine
  has read it. So the learner's rank 0 drives the engines itself, through vLLM 0.32's
  weight-transfer protocol (init once; start / update... / finish per sync), and its
  communicator outlives one sync: `connect` once, `send` per sync. Engines built for one
  take `engine_llm_kwargs()` into `vllm.LLM(...)`. The vLLM-touching half lives in
  `rollout.vllm_weight_transfer`; these classes only choose and check.

Every transport takes `bucket_bytes`, so a trainer passes its config the same way whichever
it picked ("safetensors" sends one blob and ignores it).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable, Iterator

import torch

from rollout import weight_buckets

DEFAULT_BUCKET_BYTES = 256 << 20


class WeightTransport(ABC):
    name: ClassVar[str]
    collective: ClassVar[bool] = False

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if int(bucket_bytes) <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.bucket_bytes = int(bucket_bytes)

    def engine_llm_kwargs(self) -> dict:
        """Extra `vllm.LLM(...)` arguments an engine needs to receive through this transport."""
        return {}


class PayloadTransport(WeightTransport):
    @abstractmethod
    def pack(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> object:
        """Learner side: turn (name, full tensor) pairs into something the engines receive."""

    @abstractmethod
    def unpack(self, payload: object) -> Iterator[tuple[str, torch.Tensor]]:
        """Engine side (inside the vLLM worker): the (name, tensor) pairs to load."""

    def payload_bytes(self, payload: object) -> int:
        return len(payload) if isinstance(payload, (bytes, bytearray)) else 0


class SafetensorsTransport(PayloadTransport):
    """Whole state as one safetensors blob through the Ray object store (CPU, small models)."""

    name = "safetensors"

    def pack(self, named_tensors):
        from safetensors.torch import save

        return save({n: t.detach().contiguous().cpu() for n, t in named_tensors})

    def unpack(self, payload):
        from safetensors.torch import load

        yield from load(bytes(payload)).items()


class BucketedTransport(PayloadTransport):
    """The state as byte buckets of at most `bucket_bytes` (`rollout.weight_buckets`).

    The payload still carries the whole model through Ray, but the worker decodes and loads it
    one bucket at a time (safetensors decodes every tensor before the first is loaded), so the
    engine's extra memory is about one bucket instead of one model. It also takes aliased
    tensors (a tied state dict), which safetensors refuses.
    """

    name = "buckets"

    def pack(self, named_tensors):
        return weight_buckets.buckets_to_wire(
            weight_buckets.pack_buckets(named_tensors, self.bucket_bytes))

    def unpack(self, payload):
        yield from weight_buckets.iter_wire(payload)

    def payload_bytes(self, payload):
        return weight_buckets.wire_bytes(payload)


def require_cuda(transport: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"weight transport {transport!r} moves weights GPU to GPU (NCCL broadcast or CUDA "
            "IPC) and needs CUDA, but torch.cuda.is_available() is False in this process; "
            "use 'buckets' or 'safetensors' on CPU")


class CollectiveTransport(WeightTransport):
    """Learner-driven transfer through vLLM's weight-transfer engines (see module docstring).

    Not run on a GPU in this repository (the development machines have none, and the lent GPU
    has no vLLM): the CPU tests only check that it is chosen, configured and refused on CPU.
    """

    collective = True
    backend: ClassVar[str]  # vLLM's WeightTransferConfig.backend

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(bucket_bytes)
        self._sender = None

    def engine_llm_kwargs(self) -> dict:
        require_cuda(self.name)
        return {"weight_transfer_config": {"backend": self.backend}}

    def connect(self, engines: list, rank: int) -> None:
        """On every learner rank, once, before the first `send`. `engines`: the engine actor
        handles (rank 0 only; other ranks pass []). The engine actors must expose
        `rollout.vllm_weight_transfer.CollectiveReceiver`'s methods."""
        require_cuda(self.name)
        from rollout.vllm_weight_transfer import open_sender

        self._sender = open_sender(self.backend, engines, rank, self.bucket_bytes)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
             version: int) -> dict[str, float]:
        """On every learner rank, per sync (they all iterate `named_tensors`, which gathers
        under ZeRO-3); rank 0 sends and finishes the update on every engine before returning."""
        require_cuda(self.name)
        if self._sender is None:
            raise RuntimeError(f"weight transport {self.name!r}: call connect() before send()")
        return self._sender.send(named_tensors, version)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None


class NcclTransport(CollectiveTransport):
    """One NCCL group: learner rank 0 plus every engine's worker; each bucket (vLLM's packed
    buffer of `bucket_bytes`, closed once it exceeds that size) is broadcast once to all."""

    name = "nccl"
    backend = "nccl"


class IpcTransport(CollectiveTransport):
    """CUDA IPC for an engine on the learner's own GPU: rank 0 copies each bucket into one
    reused GPU buffer of `bucket_bytes` and the engine reads it in place. Every tensor must
    fit in a bucket; a one-rank learner only (see `rollout.vllm_weight_transfer`)."""

    name = "ipc"
    backend = "ipc"


TRANSPORTS: dict[str, type[WeightTransport]] = {
    t.name: t for t in (SafetensorsTransport, BucketedTransport, NcclTransport, IpcTransport)}


def get_transport(name: str = "safetensors", **options) -> WeightTransport:
    """`options`: `bucket_bytes` (every transport accepts it)."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {name!r}; known: {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](**options)
