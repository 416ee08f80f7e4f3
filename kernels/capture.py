"""Collect per-(layer, head, token) attention statistics during one model forward.

Usage (the learner's scoring or training forward):

    from kernels import StatsSpec
    from kernels.capture import AttentionCapture

    cap = AttentionCapture(model, layers="middle:5",
                           spec=StatsSpec.all(waad_window=10, fai_band=(10, 100)), impl="auto")
    with cap(response_mask=resp_mask) as stats:      # per-batch side inputs here
        logits = model(input_ids, attention_mask=am).logits
    stats[18].waad             # [B, Hq, N] fp32 (padded) or [T, Hq] (packed)
    stats.stack("distance")    # [n_layers, B, Hq, N]

The constructor installs the hook (`kernels.hf_hook.install`) if the model is not yet
switched to it. Layers: "all", a list of indices, "middle:n" (n evenly spaced layers in
the middle third, ⌊L/3⌋..⌊2L/3⌋: L = 36, n = 5 gives 12, 15, 18, 21, 24), or "none".
Within one `with` block each selected layer keeps the statistics of its last forward
call; forwards re-run inside a backward (gradient checkpointing) are not recorded. With
`spec.fai_in_backward=True`, `fai_sum` is filled by the backward of that forward (it may
run after the block); under reentrant checkpointing the original forward runs without
grad, so the column pass fills it in the forward instead.

AVAR's cold-start loss: `AttentionCapture(..., spec=StatsSpec(n_classes=2),
grad_mass=True)` and `with cap(key_classes=ids) as st:` give `st.grad_mass[layer]`, the
attention mass on each key class *with* gradient (one extra attention call per selected
layer whose values are class indicators; O(N) memory).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .api import resolve_impl
from .spec import AttnStats, StatsSpec

_ACTIVE: contextvars.ContextVar["AttentionCapture | None"] = contextvars.ContextVar("kernels_capture", default=None)


def active_capture() -> "AttentionCapture | None":
    return _ACTIVE.get()


def select_layers(layers: str | Sequence[int], num_layers: int) -> list[int]:
    """Resolve a layer selection to sorted, unique, valid layer indices: 'all', 'none',
    'middle:<n>' (n layers spread over the middle third), or layer indices as a list or as a
    string ('3', '2,5')."""
    forms = "'all', 'none', 'middle:<n>' (n >= 1) or layer indices ('3', '2,5')"
    if isinstance(layers, str):
        text = layers.strip()
        if text == "all":
            return list(range(num_layers))
        if text == "none":
            return []
        if text.startswith("middle:"):
            n = text.split(":", 1)[1]
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"layers must be {forms}, got {layers!r}")
            lo, hi = num_layers // 3, (2 * num_layers) // 3
            return sorted({int(round(x)) for x in np.linspace(lo, hi, int(n))})
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"layers must be {forms}, got {layers!r}")
        layers = [int(p) for p in parts]
    out = sorted({int(i) for i in layers})
    if out and (out[0] < 0 or out[-1] >= num_layers):
        raise ValueError(f"layer indices {out} out of range for {num_layers} layers")
    return out


class CapturedStats(dict):
    """{layer index: AttnStats} for the selected layers, filled during the forward.
    With `AttentionCapture(grad_mass=True)`, `grad_mass[layer]` also holds the key-class
    mass *with* gradient (AVAR's cold-start loss), shaped like AttnStats.mass."""

    def __init__(self):
        super().__init__()
        self.grad_mass: dict[int, Tensor] = {}
        # Seconds spent in statistics passes the backend can time apart from the attention
        # itself (the blockwise CPU path). NaN when statistics came from a backend without a
        # separate pass (the fused Triton kernels: measure those with the benchmark instead).
        self.stats_seconds = float("nan")

    def stack(self, name: str) -> Tensor:
        """One statistic of all captured layers, stacked on a new leading layer axis."""
        layers = sorted(self)
        return torch.stack([getattr(self[i], name) if name != "fai" else self[i].fai for i in layers])

    @property
    def layers(self) -> list[int]:
        return sorted(self)


class AttentionCapture:
    """Chooses layers, the statistics and the implementation; enter it (called with the
    batch's side inputs) around a forward to collect `CapturedStats`."""

    def __init__(self, model=None, *, layers: str | Sequence[int] = "middle:5", spec: StatsSpec | None = None,
                 impl: str = "auto", num_layers: int | None = None, grad_mass: bool = False):
        if num_layers is None:
            if model is None:
                raise ValueError("give the model or num_layers")
            num_layers = model.config.get_text_config().num_hidden_layers
        self.layers = select_layers(layers, num_layers)
        self.spec = spec if spec is not None else StatsSpec()
        resolve_impl(impl, torch.empty(0))
        self.impl = impl
        if grad_mass and not self.spec.n_classes:
            raise ValueError("grad_mass needs spec.n_classes > 0 (and key_classes per batch)")
        self.grad_mass = grad_mass
        self._batch_spec: StatsSpec | None = None
        self._result: CapturedStats | None = None
        if model is not None:
            from .hf_hook import ATTN_NAME, install

            if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
                install(model, impl=impl)

    def selects(self, layer: int | None) -> bool:
        return layer is not None and layer in self.layers

    def spec_for(self, layer: int, packed: bool) -> StatsSpec:
        """The spec with this batch's side inputs, shaped for the layout the hook saw."""
        spec = self._batch_spec
        if packed:  # the model sees [1, T]; the kernel's packed side inputs are [T]
            flat = {n: getattr(spec, n).reshape(-1) for n in ("key_classes", "response_mask") if getattr(spec, n) is not None}
            spec = spec.replace(**flat)
        return spec

    def store(self, layer: int, stats: AttnStats, grad_mass: Tensor | None = None) -> None:
        self._result[layer] = stats
        if grad_mass is not None:
            self._result.grad_mass[layer] = grad_mass

    @contextlib.contextmanager
    def __call__(self, response_mask: Tensor | None = None, key_classes: Tensor | None = None) -> Iterator[CapturedStats]:
        """Collect statistics of the forward(s) run inside the block. `response_mask` and
        `key_classes` are per-token, shaped like `input_ids` ([B, N])."""
        spec = self.spec
        if response_mask is not None:
            spec = spec.replace(response_mask=response_mask)
        if key_classes is not None:
            spec = spec.replace(key_classes=key_classes)
        if spec.n_classes and spec.key_classes is None:
            raise ValueError("the spec asks for key-class masses: pass key_classes")
        self._batch_spec = spec
        self._result = CapturedStats()
        token = _ACTIVE.set(self)
        try:
            yield self._result
        finally:
            _ACTIVE.reset(token)
