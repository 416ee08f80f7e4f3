"""Route a `transformers` model's attention through `kernels.attention`.

`install(model)` registers one attention function with transformers' `AttentionInterface`
(plus the matching mask function: the 2D padding mask, as for flash-attention) and
switches the model to it. From then on every causal attention layer calls
`kernels.attention` with the post-RoPE, post-QK-norm q, k, v that the layer computed.
When a `kernels.capture.AttentionCapture` is active and selects the layer, the call also
asks for statistics and hands them to the capture; otherwise it runs the plain
(stats-off) path.

What the function understands (transformers 5.x calling convention):
* padded batches: `attention_mask` is the 2D bool mask [B, N] (or None: no padding);
* padding-free packing: `cu_seq_lens_q` in kwargs, or packed `position_ids` with B = 1;
* anything else (non-causal modules such as vision towers, decoding with a KV cache
  where q is shorter than k) falls back to transformers' own SDPA function, without
  statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .api import attention, key_class_mass, resolve_impl
from .varlen import packed_cu_seqlens, sdpa_forward

ATTN_NAME = "kernels_stats"
_default_impl = "auto"


def register() -> str:
    """Register the attention and mask functions under ATTN_NAME (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_NAME, stats_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)
    return ATTN_NAME


PLAIN = ("kernels", "sdpa")


def install(model, impl: str = "auto", plain: str = "kernels") -> None:
    """Switch `model` (a PreTrainedModel, e.g. `engine.module` under DeepSpeed) to this
    attention. `impl` is used when no capture is active: "auto" | "blockwise" | "triton"
    | "reference". `plain` is the attention of calls that record no statistics (training
    forwards, unselected layers): "kernels" (ours, stats off) or "sdpa" (transformers'
    SDPA — on CPU faster than our stats-off path; statistics still come from ours)."""
    global _default_impl
    resolve_impl(impl, torch.empty(0))  # validate the name early
    if plain not in PLAIN:
        raise ValueError(f"plain must be one of {PLAIN}, got {plain!r}")
    _default_impl = impl
    register()
    model.set_attn_implementation(ATTN_NAME)
    for m in model.modules():
        if hasattr(m, "layer_idx"):
            m._kernels_plain = plain


def stats_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The function transformers calls per layer: q [B, Hq, N, d], k/v [B, Hkv, N, d];
    returns ([B, N, Hq, d], None)."""
    from .capture import active_capture

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    if not causal or q_len != kv_len or (attention_mask is not None and attention_mask.dim() != 2):
        return sdpa_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal=is_causal,
                              **kwargs)
    if sliding_window is not None:
        raise NotImplementedError("kernels attention: sliding-window layers are not supported")
    if dropout:
        raise NotImplementedError("kernels attention: attention dropout is not supported (set attention_dropout=0)")

    cap = active_capture()
    layer = getattr(module, "layer_idx", None)
    # a forward re-run inside the backward (gradient checkpointing) records nothing: the
    # original forward's statistics stand (and its deferred FAI is what the backward fills)
    recording = cap is not None and cap.selects(layer) and not _in_backward()
    if not recording and getattr(module, "_kernels_plain", "kernels") == "sdpa":
        return sdpa_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal=is_causal,
                              **kwargs)
    impl = cap.impl if cap is not None else _default_impl

    cu = packed_cu_seqlens(query, attention_mask, kwargs)
    if cu is not None:  # padding-free packing: [1, H, T, d] -> [T, H, d]
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        kw = {"cu_seqlens": cu}
    else:
        q, k, v = query, key, value
        kw = {"attention_mask": attention_mask}
    spec = cap.spec_for(layer, packed=cu is not None) if recording else None
    res = attention(q, k, v, scale=scaling, stats=spec, impl=impl, **kw)
    out = res[0] if recording else res
    out = out.unsqueeze(0) if cu is not None else out.transpose(1, 2)  # [1, T, H, d] / [B, N, H, d]
    if recording:
        mass = None
        if cap.grad_mass:  # differentiable class mass: indicator values, gradient into q and k
            mass = key_class_mass(q, k, spec.key_classes, spec.n_classes, scale=scaling, impl=impl, **kw)
        cap.store(layer, res[1], mass)
    return out.contiguous(), None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1
