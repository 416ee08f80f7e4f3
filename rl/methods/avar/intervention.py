"""AVAR's training-free attention intervention (arXiv 2603.03825, shared specs/papers.md §3.2).

The paper writes Ẑ = Z + α_img·(M^enh ⊙ Z) − α_sys·(M^sup ⊙ Z) with M^enh the evidence (image)
keys and M^sup the system keys, and leaves open whether Z is the logits or the post-softmax
weights, whether rows are renormalised and which layers are touched. Our reading:

* Z = the post-softmax weights A. On logits, "+0.15·Z" would scale a score whose sign is
  arbitrary (a negative logit would be pushed *down*), so the mask would not say which way a
  key's share moves; on weights, α_img = 0.15 means "15% more attention to each evidence key",
  the reading that matches the paper's story (more attention to the image, less to the prompt).
* Rows renormalised by default: Â = A ⊙ (1 + α_e·M_e − α_s·M_s) / Σ_k(…). Each output stays a
  convex mix of the values, at the scale the next layer was trained on. Without it, on a
  sink-heavy row (most mass on the first, system, token) α_s = 0.6 removes most of the
  output's magnitude — a different intervention (`renormalise=False` runs it).
* All heads, all decoder layers unless `layers` names some (the vision tower never: it has no
  system keys).

`intervene(model, …)` is what an evaluation wraps around one `model.generate` call: it routes
the decoder's attention through `intervened_attention` (transformers' AttentionInterface) with
the batch's per-row key masks, and puts the model's previous attention back afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor

from rl.methods.avar.scores import EVIDENCE, SYSTEM, key_classes

NAME = "avar_intervention"


def reweight(weights: Tensor, evidence: Tensor, system: Tensor, alpha_evidence: float,
             alpha_system: float, renormalise: bool = True) -> Tensor:
    """weights [B, H, Q, K] (rows of a softmax), evidence/system [B, K] bool: each evidence
    key's weight × (1 + α_e), each system key's × (1 − α_s); then, by default, each row
    divided by its new sum so it is a distribution again."""
    scale = 1 + alpha_evidence * evidence.to(weights.dtype) - alpha_system * system.to(weights.dtype)
    out = weights * scale[:, None, None, :]
    if renormalise:
        out = out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out


@dataclass
class Intervention:
    """One generate call's settings. The masks cover the prompt (left-padded, [B, P]); keys
    beyond P are generated tokens, which are neither evidence nor system."""
    evidence: Tensor
    system: Tensor
    alpha_evidence: float
    alpha_system: float
    renormalise: bool = True

    def masks(self, n_keys: int, device) -> tuple[Tensor, Tensor]:
        pad = max(0, n_keys - self.evidence.shape[1])
        grow = lambda m: torch.nn.functional.pad(m, (0, pad))[:, :n_keys].to(device)  # noqa: E731
        return grow(self.evidence), grow(self.system)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def intervened_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, scaling: float, dropout: float = 0.0,
                         **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' eager attention (the same ops, so at α = 0 it is the model's own eager
    forward), with the weights re-weighted in the layers `intervene` marked. Unmarked modules
    (other layers, a vision tower) run plain eager attention."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    iv: Intervention | None = getattr(module, "_avar_intervention", None)
    if iv is not None:
        if query.shape[0] != iv.evidence.shape[0]:
            raise ValueError(f"AVAR intervention: the batch has {query.shape[0]} rows, the key "
                             f"masks {iv.evidence.shape[0]} (one row per sequence; no beams)")
        evidence, system = iv.masks(k.shape[-2], weights.device)
        weights = reweight(weights, evidence, system, iv.alpha_evidence, iv.alpha_system,
                           iv.renormalise)
    weights = weights.to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, v).transpose(1, 2).contiguous()
    return out, weights


def register() -> str:
    """The attention function under NAME, with eager's additive float mask (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, intervened_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME


def attn_implementations(model) -> dict[str, str]:
    """The model's attention implementation and each sub-config's (a VLM's vision and text
    parts), in the form `set_attn_implementation` takes back."""
    out = {"": model.config._attn_implementation}
    for name in getattr(model.config, "sub_configs", {}) or {}:
        sub = getattr(model.config, name, None)
        if sub is not None:
            out[name] = sub._attn_implementation
    return out


def decoder_attentions(model) -> dict[int, torch.nn.Module]:
    """{layer index: attention module} of the causal decoder (modules that carry a layer
    index and are causal; a vision tower's blocks are neither)."""
    return {m.layer_idx: m for m in model.modules()
            if getattr(m, "layer_idx", None) is not None and getattr(m, "is_causal", False)
            and hasattr(m, "num_key_value_groups")}


def prompt_key_masks(token_classes: Tensor, evidence: str = "evidence", system: str = "instruction",
                     attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """[B, P] token classes (rl.batch.TOKEN_CLASS; padding is class "other") → the evidence
    and system key masks, with AVAR's own class map (scores.key_classes; a template_prefix
    system set counts from each row's first real token, so it needs the attention mask)."""
    kc = key_classes(token_classes, evidence, system, attention_mask)
    return kc == EVIDENCE, kc == SYSTEM


@contextmanager
def intervene(model, evidence: Tensor, system: Tensor, alpha_evidence: float,
              alpha_system: float, renormalise: bool = True,
              layers: Iterable[int] | None = None) -> Iterator[Intervention]:
    """Within the block, `model`'s decoder attention is re-weighted (`reweight`) with these
    per-row key masks ([B, P] bool over a left-padded prompt batch) in `layers` (None = all).
    On exit — an exception included — the model's previous attention implementation is back
    and no module keeps the masks."""
    if not 0 <= alpha_system <= 1 or alpha_evidence < 0:
        raise ValueError(f"AVAR intervention: need α_e ≥ 0 and 0 ≤ α_s ≤ 1 (weights stay ≥ 0), "
                         f"got α_e={alpha_evidence}, α_s={alpha_system}")
    if evidence.shape != system.shape or evidence.dim() != 2:
        raise ValueError(f"key masks must both be [B, P], got {tuple(evidence.shape)} and "
                         f"{tuple(system.shape)}")
    modules = decoder_attentions(model)
    chosen = sorted(modules) if layers is None else sorted(set(layers))
    if missing := [i for i in chosen if i not in modules]:
        raise ValueError(f"AVAR intervention: no decoder layer {missing} (the model has "
                         f"{len(modules)})")
    iv = Intervention(evidence.bool(), system.bool(), float(alpha_evidence), float(alpha_system),
                      renormalise)
    before = attn_implementations(model)
    register()
    model.set_attn_implementation(NAME)
    try:
        for i in chosen:
            modules[i]._avar_intervention = iv
        yield iv
    finally:
        for m in modules.values():
            if hasattr(m, "_avar_intervention"):
                del m._avar_intervention
        model.set_attn_implementation(before)
