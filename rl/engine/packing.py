"""Padding-free forwards: a right-padded batch's tokens packed into one row, each group's
shared prefix once.

Why: a batch is as wide as its longest sequence, and every linear layer (and its backward)
computes the padding of the shorter rows too — on the default task about 30% of the tokens.
And the n samples of a GRPO group repeat their prompt: a group's rows share it (and often the
first response tokens), so it is packed once and every row reads it — on the default task
another ~25% of the tokens, more for long prompts. Position ids keep each token's place in its
sequence, and the attention (`kernels.varlen`, installed by the engine) gets each sequence as
a row again through a `Repad` index: every token's logits are those of the padded forward, up
to float summation order. The engine checks that once at start on a small batch
(`packing_error`) and keeps padded rows for a model where it does not hold.

Only per-token log-probs leave the packed layout ([B, T] again): the [N, vocab] logits are
never unpacked to [B, T, vocab], which matters for 150k-token vocabularies.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.varlen import Repad
from rl.engine.frozen import logits_of, next_token_logprobs

log = logging.getLogger(__name__)

# What a forward that does not take the packed arguments (`position_ids`, `repad`) raises:
# transformers' argument checks. Anything else — a CUDA error, an out-of-memory — is a real
# failure of the learner and must not be mistaken for "this model cannot pack".
REFUSES_PACKING = (TypeError, ValueError, NotImplementedError)


@dataclass
class Packed:
    input_ids: torch.Tensor     # [1, N]
    position_ids: torch.Tensor  # [1, N]: each token's place in its sequence
    slot: torch.Tensor          # [B, T]: packed index of token (b, t); 0 on padding
    repad: Repad                # the rows again, for the attention


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is tokens then padding (no holes): what packing by lengths assumes."""
    lengths = attention_mask.sum(-1, keepdim=True)
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(((cols < lengths) == attention_mask.bool()).all())


def shared_prefix(input_ids: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor | None):
    """Each row's leader (the group's first row) and how many leading tokens it takes from it
    (their common prefix; 0 for a leader, or without groups)."""
    rows = torch.arange(len(input_ids), device=input_ids.device)
    if group_ids is None:
        return rows, torch.zeros_like(rows)
    leader = (group_ids[:, None] == group_ids[None, :]).int().argmax(1)  # first row of the group
    same = (input_ids == input_ids[leader]) & mask & mask[leader]
    shared = same.int().cumprod(1).sum(1)
    return leader, torch.where(leader == rows, 0, shared)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor,
         group_ids: torch.Tensor | None = None) -> Packed:
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    width = int(lengths.max())
    input_ids, mask = input_ids[:, :width], mask[:, :width]
    cols = torch.arange(width, device=mask.device).expand_as(mask)
    leader, shared = shared_prefix(input_ids, mask, group_ids)
    own = mask & (cols >= shared[:, None])                   # the tokens a row stores itself
    slot = torch.where(own, own.flatten().cumsum(0).view_as(own) - 1, 0)
    slot = torch.where(mask & ~own, slot[leader], slot)     # a leader owns its whole row
    padded = slot.gather(1, torch.minimum(cols, (lengths[:, None] - 1).clamp(min=0)))
    repad = Repad(gather=padded.flatten(), keep=own.flatten().nonzero().squeeze(-1), width=width)
    slot = F.pad(slot, (0, attention_mask.shape[1] - width))
    return Packed(input_ids[own][None], cols[own][None], slot, repad)


def packed_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          temperature: float, with_entropy: bool = True,
                          group_ids: torch.Tensor | None = None):
    """Like `token_logprobs(logits_of(model, b), ...)` — logprob[:, t] of token t given the
    tokens before it, column 0 zero — from one packed forward. Padding positions are 0 (the
    padded forward leaves the model's guess for a pad token there; every consumer masks them)."""
    p = pack(input_ids, attention_mask, group_ids)
    logits = model(input_ids=p.input_ids, position_ids=p.position_ids, repad=p.repad,
                   use_cache=False).logits[0]
    logp = F.log_softmax(logits.float() / temperature, dim=-1)   # [N, V]
    predicted_at = p.slot[:, :-1]               # the token whose logits predict token t ≥ 1
    present = attention_mask[:, 1:].bool()
    lp = F.pad(logp[predicted_at, input_ids[:, 1:]] * present, (1, 0))
    if not with_entropy:
        return lp, None
    ent = -(logp.exp() * logp).sum(-1)
    return lp, F.pad(ent[predicted_at] * present, (1, 0))


@torch.no_grad()
def packing_error(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  temperature: float = 1.0, group_ids: torch.Tensor | None = None) -> float:
    """max |Δ| between packed and padded logprobs of a batch: float order for a model whose
    attention reads the `Repad` index, large for one that does not (sequences would see each
    other)."""
    packed, _ = packed_token_logprobs(model, input_ids, attention_mask, temperature, False,
                                      group_ids)
    logits = logits_of(model, {"input_ids": input_ids, "attention_mask": attention_mask})
    padded = next_token_logprobs(logits, temperature).gather(-1, input_ids[..., None]).squeeze(-1)
    return float(((packed - padded).abs() * attention_mask).max())


def packing_matches(model, device, vocab_size: int, dtype: str) -> bool:
    """Once, at learner start, on a small fixed batch (the same on every rank: under ZeRO-3 the
    forwards are collective): packed and padded rows give the same logprobs. A model whose
    attention ignores the packing would let sequences see each other, and one whose forward
    refuses the packed arguments cannot pack: both keep padded rows (slower, never wrong).
    Any other error propagates, with a note naming this check."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 4, 9, 6])
    ids = torch.randint(0, vocab_size, (4, 9), generator=g)
    ids[1, :3] = ids[0, :3]  # rows 0 and 1: one group sharing three tokens
    mask = torch.arange(9) < lengths[:, None]
    try:
        diff = packing_error(model, ids.to(device), mask.to(device),
                             group_ids=torch.tensor([0, 0, 1, 1], device=device))
    except REFUSES_PACKING as e:
        log.warning("padding_free: this model refuses packed rows (%s: %s); forwards keep "
                    "padded rows", type(e).__name__, e)
        return False
    except Exception as e:
        e.add_note("(raised by the padding_free check at learner start: a 4-row forward of the "
                   "policy, packed and padded; learner.padding_free=false skips it)")
        raise
    tol = 1e-3 if dtype == "float32" else 0.1
    if diff > tol:
        log.warning("padding_free: packed rows change this model's logprobs (max |Δ| = %.3g > "
                    "%g); forwards keep padded rows", diff, tol)
        return False
    log.info("padding_free: packed rows checked against padded ones (max |Δ| logprob %.2g)", diff)
    return True
