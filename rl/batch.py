"""The one structure that flows between stages of an RL step.

Tensors are right-padded [B, T] over prompt ⊕ response. Per-token quantities are aligned to the
token they score: `x[:, t]` belongs to token t given tokens < t, so position 0 never carries a
logprob. Stages fill fields in order (rollout → rewards → scoring → credit → advantages) and a
credit method edits `token_weights` in place; nothing else needs to know it exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

# Token classes per position, for credit methods that care which prompt part a token is in.
TOKEN_CLASS = {"other": 0, "system": 1, "evidence": 2, "distractor": 3, "response": 4, "image": 5}


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor           # [B, T] long
    attention_mask: torch.Tensor      # [B, T] bool
    response_mask: torch.Tensor       # [B, T] bool: response tokens that are trained
    sampler_logprobs: torch.Tensor    # [B, T] float32, from vLLM
    token_classes: torch.Tensor       # [B, T] int8, see TOKEN_CLASS
    group_ids: torch.Tensor           # [B] long: responses of one prompt share an id
    rewards: torch.Tensor             # [B] float32
    token_weights: torch.Tensor       # [B, T] float32: credit γ, ones by default
    correct: torch.Tensor | None = None        # [B] float32: the task verifier's score (rewards stage)
    old_logprobs: torch.Tensor | None = None   # [B, T] learner-recomputed at the start of the step
    ref_logprobs: torch.Tensor | None = None   # [B, T] frozen reference (KL)
    entropy: torch.Tensor | None = None        # [B, T] learner entropy of the next-token dist.
    seq_advantages: torch.Tensor | None = None  # [B] per-response advantage (before credit)
    advantages: torch.Tensor | None = None     # [B, T] = seq_advantages × token_weights
    attn_stats: dict[str, Any] | None = None   # {layer: {statistic: [B, H, T]}}: every reader's layers
    # A vision-language model's images (per row, so rows split over ranks with their pixels):
    pixel_values: torch.Tensor | None = None    # [B, patches, D] float32
    image_grid_thw: torch.Tensor | None = None  # [B, images, 3] long
    meta: list[dict] = field(default_factory=list)  # per response: uid, prompt/response text, …

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensor_fields(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def select(self, idx: torch.Tensor | list[int]) -> "RolloutBatch":
        """Rows `idx` of every tensor (and meta), for splitting into minibatches and ranks."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        kwargs = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                kwargs[f.name] = v.index_select(0, idx_t)
            elif f.name == "meta":
                kwargs[f.name] = [v[i] for i in idx_t.tolist()] if v else []
            else:
                kwargs[f.name] = None  # per-layer attention statistics belong to the full batch
        return RolloutBatch(**kwargs)

    def trimmed(self) -> "RolloutBatch":
        """Drop trailing all-padding columns so forwards do not pay for them."""
        t = int(self.attention_mask.any(0).nonzero().max()) + 1
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, v in self.tensor_fields().items():
            if v.dim() == 2:
                kwargs[name] = v[:, :t]
        return RolloutBatch(**kwargs)

    @staticmethod
    def concat(a: "RolloutBatch", b: "RolloutBatch") -> "RolloutBatch":
        """Rows of `a` then rows of `b`, right-padded to the wider of the two (attention
        statistics, which belong to one scoring forward, are dropped)."""
        width = max(a.input_ids.shape[1], b.input_ids.shape[1])
        kwargs = {}
        for f in fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if f.name == "meta":
                kwargs[f.name] = list(x) + list(y)
            elif isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                if x.dim() == 2:
                    fill = 1.0 if f.name == "token_weights" else 0
                    x, y = (torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)
                            for t in (x, y))
                kwargs[f.name] = torch.cat([x, y])
            else:
                kwargs[f.name] = None
        return RolloutBatch(**kwargs)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """What a forward of the policy reads: tokens, padding, and the images if any."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            out.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        return out

    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)
