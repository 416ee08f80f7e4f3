"""What to compute (`StatsSpec`), what comes back (`AttnStats`), and how the input is laid out.

These types are shared by the three implementations (reference, blockwise, triton) so
that the tests can compare them field by field, and by the `transformers` hook.

Layouts (the same for inputs, outputs and statistics):

* padded: q ``[B, Hq, N, d]``, k/v ``[B, Hkv, N, d]`` (the layout `transformers`
  attention functions receive), optional ``attention_mask [B, N]`` (1 = real token).
  Real tokens of a row must be one contiguous run (left *or* right padding), so that a
  token's position inside its sequence is ``index - first_real_index``.
  Per-token statistics are ``[B, Hq, N]`` (``mass``: ``[B, Hq, N, C]``); padding
  positions hold 0.
* packed (variable length): q ``[T, Hq, d]``, k/v ``[T, Hkv, d]``, ``cu_seqlens``
  int ``[S + 1]`` (cumulative lengths, as in flash-attn's varlen API).
  Statistics are ``[T, Hq]`` (``mass``: ``[T, Hq, C]``).

Per-token side inputs (``key_classes``, ``response_mask``) are ``[B, N]`` (padded) or
``[T]`` (packed), i.e. indexed like the tokens.

GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)`` (the `repeat_kv` convention).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_CLASSES = 8  # "a few" key classes: each costs one masked row-sum per key tile


@dataclass(frozen=True, eq=False)
class StatsSpec:
    """Which statistics to compute (all row statistics are expectations under p_i.).

    entropy      -- H_i = -sum_j p_ij log p_ij (nats)
    distance     -- look-back distance sum_j p_ij (i - j)
    waad_window  -- W: windowed distance sum_j p_ij min(i - j, W); None = off
    key_classes  -- per-token int class ids (negative = no class); with n_classes = C
                    gives mass[..., c] = sum_{j: class_j = c} p_ij. A spec may name
                    n_classes without key_classes (a template, e.g. for a capture) but a
                    call needs both.
    fai_band     -- (H_lo, H_hi): future attention influence of key j, the mean of p_ij
                    over rows i in [j + H_lo, j + H_hi] (inside the sequence and, when
                    response_mask is given, only response rows). H_hi None = to the end
                    (analysis mode). No such row: fai = 0.
    fai_in_backward -- when a backward will run, compute the FAI column sums inside the
                    backward's dK/dV loop instead of a separate column pass; the
                    `fai_sum` tensor is then filled (in place) by ``loss.backward()``.
    lse is always returned (it is free).
    """

    entropy: bool = False
    distance: bool = False
    waad_window: int | None = None
    key_classes: Tensor | None = None
    n_classes: int = 0
    fai_band: tuple[int, int | None] | None = None
    response_mask: Tensor | None = None
    fai_in_backward: bool = False

    def __post_init__(self):
        if self.waad_window is not None and self.waad_window < 1:
            raise ValueError(f"waad_window must be >= 1, got {self.waad_window}")
        if self.key_classes is not None and self.n_classes == 0:
            raise ValueError("key_classes given but n_classes == 0")
        if not 0 <= self.n_classes <= MAX_CLASSES:
            raise ValueError(f"n_classes must be in [0, {MAX_CLASSES}], got {self.n_classes}")
        if self.fai_band is not None:
            lo, hi = self.fai_band
            if lo < 0 or (hi is not None and hi < lo):
                raise ValueError(f"fai_band must satisfy 0 <= H_lo <= H_hi, got {self.fai_band}")

    @classmethod
    def all(cls, waad_window: int = 10, fai_band=(10, 100), **kw) -> "StatsSpec":
        """Every row statistic plus FAI: the paper defaults (W = 10, band [10, 100])."""
        return cls(entropy=True, distance=True, waad_window=waad_window, fai_band=fai_band, **kw)

    def replace(self, **kw) -> "StatsSpec":
        return dataclasses.replace(self, **kw)

    @property
    def fai_hi(self) -> int:
        """Upper band edge as an int (a huge value stands for 'to the end')."""
        assert self.fai_band is not None
        return (1 << 30) if self.fai_band[1] is None else int(self.fai_band[1])


@dataclass
class AttnStats:
    """Per-token, per-query-head statistics (fp32, detached). See the module docstring
    for the layout; fields that were not requested are None."""

    lse: Tensor
    entropy: Tensor | None = None
    distance: Tensor | None = None
    waad: Tensor | None = None
    mass: Tensor | None = None
    fai_sum: Tensor | None = None  # column sums of p over the band (response rows only)
    fai_count: Tensor | None = None  # rows in the band per key token (head independent)

    @property
    def fai(self) -> Tensor | None:
        """Mean over the band: fai_sum / count (0 where the band holds no row)."""
        if self.fai_sum is None:
            return None
        cnt = self.fai_count.unsqueeze(-1 if self.fai_sum.dim() == 2 else 1)
        return torch.where(cnt > 0, self.fai_sum / cnt.clamp(min=1), torch.zeros_like(self.fai_sum))

    def fields(self) -> dict[str, Tensor]:
        """The computed statistics by name (fai as the mean), for comparisons and logs."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["fai"] = self.fai
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class SeqLayout:
    """Where each sequence lives in the storage tensors.

    Sequence s owns token rows ``starts[s] .. starts[s] + lens[s] - 1`` of batch row s
    (padded) or of the single packed axis (packed).
    """

    packed: bool
    starts: Tensor  # int64 [S]
    lens: Tensor  # int64 [S]
    max_len: int
    n_storage: int  # N (padded) or T (packed): length of the token axis

    @property
    def n_seqs(self) -> int:
        return int(self.starts.numel())


def make_layout(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, attention_mask: Tensor | None) -> SeqLayout:
    """Check shapes and build the layout; raise with a clear message on misuse."""
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("give either cu_seqlens (packed) or attention_mask (padded), not both")
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            raise ValueError("packed input: q [T, Hq, d], k/v [T, Hkv, d]")
        T, hq, _ = q.shape
        hkv = k.shape[1]
        cu = cu_seqlens.to(device=q.device, dtype=torch.long)
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != T:
            raise ValueError(f"cu_seqlens must run from 0 to T={T}, got {cu_seqlens.tolist()}")
        lens = cu[1:] - cu[:-1]
        if (lens < 0).any():
            raise ValueError("cu_seqlens must be non-decreasing")
        layout = SeqLayout(True, cu[:-1].clone(), lens, int(lens.max()), T)
    else:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError("padded input: q [B, Hq, N, d], k/v [B, Hkv, N, d]")
        B, hq, N, _ = q.shape
        hkv = k.shape[1]
        if k.shape[0] != B or k.shape[2] != N or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if attention_mask is None:
            starts = torch.zeros(B, dtype=torch.long, device=q.device)
            lens = torch.full((B,), N, dtype=torch.long, device=q.device)
        else:
            m = attention_mask.to(q.device).bool()
            if m.shape != (B, N):
                raise ValueError(f"attention_mask must be [B, N] = {(B, N)}, got {tuple(m.shape)}")
            lens = m.sum(1)
            starts = torch.where(lens > 0, m.int().argmax(1), torch.zeros_like(lens))
            idx = torch.arange(N, device=q.device)
            contiguous = (idx >= starts[:, None]) & (idx < (starts + lens)[:, None])
            if not torch.equal(contiguous, m):
                raise ValueError("attention_mask: the real tokens of each row must be contiguous (left or right padding)")
        layout = SeqLayout(False, starts, lens, N, N)
    if k.shape[-1] != q.shape[-1] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    return layout


def token_positions(layout: SeqLayout, device) -> tuple[Tensor, Tensor]:
    """(pos, valid) over the storage token axis: position inside the sequence, and
    whether the slot is a real token. Shapes [B, N] (padded) or [T] (packed)."""
    if layout.packed:
        T = layout.n_storage
        seq = torch.repeat_interleave(torch.arange(layout.n_seqs, device=device), layout.lens, output_size=T)
        pos = torch.arange(T, device=device) - layout.starts[seq]
        return pos, torch.ones(T, dtype=torch.bool, device=device)
    idx = torch.arange(layout.n_storage, device=device)
    pos = idx[None, :] - layout.starts[:, None]
    valid = (pos >= 0) & (pos < layout.lens[:, None])
    return pos, valid


def fai_count(layout: SeqLayout, spec: StatsSpec, device) -> Tensor:
    """Number of rows i in [j + H_lo, j + H_hi] inside j's sequence (and the response),
    per key token j: the FAI denominator. Head independent; [B, N] or [T], float32."""
    lo, hi = spec.fai_band[0], spec.fai_hi
    pos, valid = token_positions(layout, device)
    resp = valid if spec.response_mask is None else (spec.response_mask.to(device).bool() & valid)
    if layout.packed:
        resp, pos, valid = resp[None], pos[None], valid[None]
    # rows are counted with an inclusive prefix sum along the storage axis; a row i of
    # key j's sequence has storage index start + pos_i, so the band maps to an index range
    csum = torch.nn.functional.pad(resp.long().cumsum(-1), (1, 0))  # csum[x] = #resp in [0, x)
    n = resp.shape[-1]
    idx = torch.arange(n, device=device).expand_as(pos)
    seq_end = idx - pos + _seq_len_per_token(layout, device).view_as(pos)  # exclusive end of j's sequence
    first = (idx + lo).clamp(max=n)
    last = torch.minimum(idx + min(hi, n) + 1, seq_end).clamp(max=n)
    cnt = (csum.gather(-1, last) - csum.gather(-1, torch.minimum(first, last))).clamp(min=0)
    cnt = torch.where(valid, cnt, torch.zeros_like(cnt)).float()
    return cnt[0] if layout.packed else cnt


def _seq_len_per_token(layout: SeqLayout, device) -> Tensor:
    if layout.packed:
        return torch.repeat_interleave(layout.lens, layout.lens, output_size=layout.n_storage)
    return layout.lens[:, None].expand(-1, layout.n_storage)


def stat_shape(layout: SeqLayout, n_heads: int) -> tuple[int, ...]:
    return (layout.n_storage, n_heads) if layout.packed else (layout.n_seqs, n_heads, layout.n_storage)


def check_side_inputs(layout: SeqLayout, spec: StatsSpec | None) -> None:
    """Per-token side inputs must be indexed like the tokens."""
    if spec is None:
        return
    if spec.n_classes and spec.key_classes is None:
        raise ValueError(f"n_classes={spec.n_classes} needs key_classes (per-token class ids)")
    want = (layout.n_storage,) if layout.packed else (layout.n_seqs, layout.n_storage)
    for name in ("key_classes", "response_mask"):
        t = getattr(spec, name)
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} (indexed like the tokens), got {tuple(t.shape)}")
