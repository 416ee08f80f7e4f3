"""SDPA for `transformers` models over padded *and* padding-free packed batches.

Packed (the batch's tokens in one row: position ids restarting at 0, `cu_seq_lens_q`, or a
`Repad` index in the forward's kwargs), the linear layers compute only real tokens. Attention
must still keep the sequences apart; transformers' SDPA would do it with an N × N block mask
over the whole row (quadratic in the batch). Here the packed q, k, v are re-padded per
sequence to [S, H, W, d] and attend causally (no mask: SDPA's fast path), and each token's
output is gathered back from one row. The slots past a row's end repeat real tokens and are
never read: right padding keeps them out of every real query's causal window, so they change
nothing and get no gradient. A token may belong to several rows (a GRPO group's prompt, packed
once): every row attends over it, and its own output is read from one of them.

`install_sdpa(model)` registers this function as "sdpa_varlen" (with the 2-D padding mask, as
for flash-attention) and switches the model to it. Padded batches run transformers' own SDPA
with a causal ∧ padding mask, as the stock "sdpa" implementation does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NAME = "sdpa_varlen"


def install_sdpa(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, sdpa_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    model.set_attn_implementation(NAME)


def packed_cu_seqlens(query: Tensor, attention_mask: Tensor | None, kwargs: dict) -> Tensor | None:
    """cu_seqlens when the batch is padding-free packed (B = 1), else None. As in
    transformers, position_ids count as packing only when there is no padding mask (a
    left-padded single row has non-increasing position_ids too)."""
    if query.shape[0] != 1:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu
    pos = kwargs.get("position_ids")
    if pos is None or attention_mask is not None:
        return None
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    if not _is_packed_sequence(pos, 1):
        return None
    (cu, _), _ = prepare_fa_kwargs_from_position_ids(pos)
    return cu


@dataclass
class Repad:
    """How packed tokens [N] become padded rows [S, W] and back: `gather` [S·W], the packed
    position of each padded slot s·W + t (slots past a row's end repeat its last token), and
    `keep` [N], the slot each packed token's output is read from. A token may sit in several
    rows (a prompt shared by a group's responses): each row attends over its own copy, and one
    copy is kept."""
    gather: Tensor
    keep: Tensor
    width: int


def repad_index(cu: Tensor) -> Repad:
    """The `Repad` of packed sequences laid end to end, with boundaries `cu` [S + 1]."""
    cu = cu.long()
    lengths = cu[1:] - cu[:-1]
    width = int(lengths.max())
    cols = torch.arange(width, device=cu.device)
    gather = cu[:-1, None] + torch.minimum(cols, lengths[:, None] - 1)
    keep = (cols < lengths[:, None]).flatten().nonzero().squeeze(-1)
    return Repad(gather.flatten(), keep, width)


def sdpa_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                 **kwargs) -> tuple[Tensor, None]:
    """q [B, Hq, N, d], k/v [B, Hkv, N, d] → ([B, N, Hq, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    repad = kwargs.pop("repad", None)  # given by the caller that packed (rl/engine/packing.py)
    if repad is None and causal and query.shape[2] == key.shape[2]:   # not KV-cache decoding
        cu = packed_cu_seqlens(query, attention_mask, kwargs)
        repad = repad_index(cu) if cu is not None else None
    if repad is not None:  # index_select both ways: row copies, and index_add in the backward
        q, k, v = (x[0].transpose(0, 1).index_select(0, repad.gather)    # [S·W, H, d]
                   .unflatten(0, (-1, repad.width)).transpose(1, 2) for x in (query, key, value))
        out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                        is_causal=True)                  # [S, W, Hq, d]
        return out.flatten(0, 1).index_select(0, repad.keep).unsqueeze(0), None
    if attention_mask is not None and attention_mask.dim() == 2:  # padding → causal ∧ padding, 4-D
        q_len, kv_len = query.shape[2], key.shape[2]
        m = attention_mask[:, None, None, -kv_len:].bool()
        if causal:
            i = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
            m = m & (torch.arange(kv_len, device=query.device)[None, :] <= i)
        attention_mask = m
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)
