"""A model that is scored and differentiated with respect to its inputs, never trained.

The LeaF teacher is one (frozen, possibly large, in its own Ray actors so that on a cluster it
sits on its own GPUs); so is a student snapshot during offline confounder detection. It
answers the scoring half of the engine boundary (rl/engine/base.py `ScoringEngine`): per-token
log-probs, top-k next-token log-probs for distillation, and input-embedding gradient norms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rl.engine.base import ScoringEngine


# A logit low enough that the token has probability 0 in float32 and bfloat16, yet finite, so
# that entropy (p · log p) stays 0 · finite = 0 rather than NaN.
NEVER = -1.0e4


def load_model(model_path: str, dtype):
    """The HF model of a folder: a causal LM, or a vision-language model (its config has a
    vision part) whose forward also takes `pixel_values` / `image_grid_thw`.

    The tokens the rollout engines never sample (a VLM's placeholders, a padded vocabulary's
    rows beyond the tokenizer: rollout/vllm_engine.py `unsampled_ids`) get logit NEVER in every
    forward, so the learner's distribution is the engines' — the same renormalised softmax —
    and the ratio is exact. (In place: at a 151,936-row vocabulary a copy of the logits is
    ~0.3 GB per 512 tokens in float32; the linear's backward does not read its output.)"""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from rollout.vllm_engine import image_placeholder_ids, unsampled_ids

    auto = AutoModelForImageTextToText if image_placeholder_ids(model_path) else AutoModelForCausalLM
    model = auto.from_pretrained(model_path, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    banned = unsampled_ids(model_path)
    if banned:
        ids = torch.tensor(banned)
        model.get_output_embeddings().register_forward_hook(
            lambda _m, _i, logits: logits.index_fill_(-1, ids.to(logits.device), NEVER))
    return model


def image_kwargs(model, b: dict[str, torch.Tensor]) -> dict:
    """A batch's images as the VLM forward takes them: every row's patches in row order, and
    which tokens are image slots. Without `mm_token_type_ids` transformers (5.x) silently
    gives every token 1-D positions instead of the image's 2-D M-RoPE ones — which vLLM does
    use: the learner then scores a different model (seen: logprob gaps up to 10 nats)."""
    if "pixel_values" not in b:
        return {}
    image_id = getattr(model, "module", model).config.image_token_id   # (DeepSpeed wraps)
    return {"pixel_values": b["pixel_values"].flatten(0, 1),
            "image_grid_thw": b["image_grid_thw"].flatten(0, 1),
            "mm_token_type_ids": (b["input_ids"] == image_id).int()}


def logits_of(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T, V] logits of a right-padded batch (no KV cache: one full forward)."""
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                 use_cache=False, **image_kwargs(model, b)).logits


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float,
                   with_entropy: bool = True):
    """logprob[:, t] of token t under the distribution predicted at t-1; column 0 is 0."""
    logits = logits[:, :-1].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    lp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    lp = F.pad(lp, (1, 0))
    if not with_entropy:
        return lp, None
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, F.pad(ent, (1, 0))


def next_token_logprobs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T, V] log-probs aligned like `token_logprobs`: column t is the distribution that
    predicts token t (from positions < t); column 0 predicts nothing and is all zeros."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return F.pad(logp, (0, 0, 1, 0))


def input_grad_norms(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """g[i, t] = ‖∂L_i/∂e_t‖₂ (LeaF §2.1): L_i is row i's mean cross-entropy over its
    `response_mask` tokens, e_t the input embedding of position t. [B, T] float32.

    Rows are summed into one scalar: each row's loss depends only on its own embeddings, so
    one backward gives every row's gradient exactly as if it were alone (padding only adds
    masked keys). Only the embeddings require grad: no parameter gradient is formed or kept.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"].long()
    mask = batch["response_mask"].float()
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    emb = emb.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs_embeds=emb, attention_mask=attn, use_cache=False).logits
        logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        per_row = (nll * mask[:, 1:]).sum(-1) / mask[:, 1:].sum(-1).clamp(min=1)
        (grad,) = torch.autograd.grad(per_row.sum(), emb)
    return grad.float().norm(dim=-1) * attn.float()


def topk_logprobs(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens per position: ids [B, T, k] long, log-probs [B, T, k]."""
    k = min(k, logp.shape[-1])
    values, ids = logp.topk(k, dim=-1)
    return ids, values


class FrozenModel(ScoringEngine):
    """`vocab_size`: keep only the first ids of the output distribution — a teacher whose
    embedding matrix has padded rows beyond the student's vocabulary (same tokenizer) is cut
    to the student's size before the softmax, as LeaF's code does."""

    def __init__(self, model_path: str, dtype: str = "float32", device: str | None = None,
                 vocab_size: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model_path, dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.vocab_size = vocab_size

    def _to(self, batch):
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    @torch.no_grad()
    def full_logprobs(self, batch, temperature: float = 1.0) -> torch.Tensor:
        b = self._to(batch)
        return next_token_logprobs(logits_of(self.model, b)[..., : self.vocab_size], temperature)

    def score(self, batch, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        logp = self.full_logprobs(batch, temperature)
        ids = batch["input_ids"].to(logp.device)
        lp = logp.gather(-1, ids[..., None]).squeeze(-1)
        lp[:, 0] = 0.0
        ent = -(logp.exp() * logp).sum(-1)
        return {"logprobs": lp.cpu(), "entropy": ent.cpu()}

    def topk_logprobs(self, batch, k: int, temperature: float = 1.0):
        ids, values = topk_logprobs(self.full_logprobs(batch, temperature), k)
        return ids.cpu(), values.cpu()

    def input_grad_norms(self, batch) -> torch.Tensor:
        return input_grad_norms(self.model, self._to(batch)).cpu()
