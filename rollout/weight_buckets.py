"""Named tensors packed into flat byte buckets of bounded size, and back: pure PyTorch.

Why buckets: a whole-model blob costs a second copy of the model on both ends of a sync (the
learner builds it, the engine decodes all of it before loading). In buckets, each side holds
one bucket's worth of extra memory at a time, and the same layout can later be sent bucket by
bucket over a collective. vLLM 0.32 has a packer (`weight_transfer/packed_tensor.py`), but it
closes a chunk only after it *exceeds* the buffer size and it needs vLLM on the learner side;
here a bucket never exceeds `bucket_bytes` unless it holds a single tensor larger than that.

The wire form is plain Python (bytes, str, lists of ints): tensors nested in vLLM's RPC
arguments arrive as lists, bytes arrive intact (shared/ENVIRONMENT.md, trap 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

# Each tensor starts on a 16-byte boundary, so a byte slice can be viewed as any dtype
# (`view(dtype)` needs the storage offset to be a multiple of the element size; 16 covers
# complex128).
ALIGN = 16
WIRE_FORMAT = "weight-buckets/1"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in its bucket."""

    name: str
    dtype: str  # torch dtype name ("bfloat16"): torch.dtype objects do not survive every RPC
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the bucket, a multiple of ALIGN

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class Bucket:
    data: bytes
    slots: tuple[TensorSlot, ...]

    def to_wire(self) -> dict:
        return {"data": self.data,
                "names": [s.name for s in self.slots],
                "dtypes": [s.dtype for s in self.slots],
                "shapes": [list(s.shape) for s in self.slots],
                "offsets": [s.offset for s in self.slots]}

    @classmethod
    def from_wire(cls, wire: dict) -> "Bucket":
        slots = tuple(TensorSlot(n, d, tuple(int(x) for x in s), int(o)) for n, d, s, o in
                      zip(wire["names"], wire["dtypes"], wire["shapes"], wire["offsets"],
                          strict=True))
        data = wire["data"]
        return cls(data if isinstance(data, bytes) else bytes(data), slots)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's contents as a flat uint8 tensor on CPU (bf16, bool and 0-d tensors too)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _seal(pending: list[tuple[TensorSlot, torch.Tensor]]) -> Bucket:
    size = pending[-1][0].offset + pending[-1][1].numel()
    buf = bytearray(size)
    if size:
        view = torch.frombuffer(buf, dtype=torch.uint8)
        for slot, raw in pending:
            view[slot.offset:slot.offset + raw.numel()].copy_(raw)
    return Bucket(bytes(buf), tuple(slot for slot, _ in pending))


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> Iterator[Bucket]:
    """Buckets in input order; lazy, so a consumer that sends each one on holds one at a time.

    A bucket holds at most `bucket_bytes` (alignment padding counted); a tensor larger than
    that gets a bucket of its own rather than an error, since a model's largest tensor (the
    embeddings) is often the one that would not fit.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    seen: set[str] = set()
    pending: list[tuple[TensorSlot, torch.Tensor]] = []
    end = 0
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(name)
        raw = _as_bytes(tensor)
        offset = _aligned(end)
        if pending and offset + raw.numel() > bucket_bytes:
            yield _seal(pending)
            pending, offset = [], 0
        pending.append((TensorSlot(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset),
                        raw))
        end = offset + raw.numel()
    if pending:
        yield _seal(pending)


def unpack_bucket(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors, as views of one writable copy of its bytes (one bucket of memory;
    the views keep it alive as long as a loader holds any of them)."""
    data = bucket.data
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
           else torch.empty(0, dtype=torch.uint8))
    out = []
    for slot in bucket.slots:
        n = slot.nbytes
        if slot.offset % ALIGN or slot.offset + n > len(data):
            raise ValueError(f"slot of {slot.name!r} ({slot.offset}+{n}) does not fit a "
                             f"{len(data)}-byte bucket")
        out.append((slot.name, buf[slot.offset:slot.offset + n]
                    .view(dtype_from_name(slot.dtype)).reshape(slot.shape)))
    return out


def buckets_to_wire(buckets: Iterable[Bucket]) -> dict:
    return {"format": WIRE_FORMAT, "buckets": [b.to_wire() for b in buckets]}


def iter_wire(payload: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a wire payload, decoded one bucket at a time."""
    if not isinstance(payload, dict) or payload.get("format") != WIRE_FORMAT:
        raise ValueError(f"not a {WIRE_FORMAT} payload")
    for wire in payload["buckets"]:
        yield from unpack_bucket(Bucket.from_wire(wire))


def wire_bytes(payload: dict) -> int:
    return sum(len(b["data"]) for b in payload["buckets"])
