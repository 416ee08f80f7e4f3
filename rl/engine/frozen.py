"""A model that is scored and differentiated with respect to its inputs, never trained.

A model read by a method is one (possibly large, in its own Ray actors so that on a cluster it
sits on its own GPUs, or beside the policy in each learner rank); so is a student snapshot read
offline, and the checkpoint `launch.inspect` draws. It answers the scoring half of the engine
boundary (rl/engine/base.py `ScoringEngine`): per-token log-probs and entropy (with attention
statistics), and whatever Probe it is given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rl.engine.base import Probe, Readable, ScoringEngine


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


def scored(module, forward, b: dict, stats: dict | None, impl: str = "auto") -> dict:
    """The scoring forward's answer: per-token logprobs and entropy of `forward()` (which
    runs `module` on the batch `b`); with `stats` (StatsSpec keyword arguments plus "layers")
    also the attention statistics of those layers from the same forward — {layer: {name:
    [B, H, T]}} and the seconds their pass took. Key-class masses read b["key_classes"]
    ([B, T] ints, -1 = no class). The policy's engine and a frozen model both answer this way,
    so `launch.inspect` sees what the trainer sees."""
    if not stats:
        lp, ent = forward()
        return {"logprobs": lp.float().cpu(), "entropy": ent.float().cpu()}
    from kernels import AttentionCapture, StatsSpec

    stats = dict(stats)
    layers = stats.pop("layers")
    spec = StatsSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in stats.items()})
    cap = AttentionCapture(module, layers=layers, spec=spec, impl=impl)
    with cap(response_mask=b.get("response_mask"), key_classes=b.get("key_classes")) as captured:
        lp, ent = forward()
    attn = {layer: {k: v.cpu() for k, v in st.fields().items()} for layer, st in captured.items()}
    return {"logprobs": lp.float().cpu(), "entropy": ent.float().cpu(), "attn_stats": attn,
            "stats_s": captured.stats_seconds}


def topk_logprobs(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens per position: ids [B, T, k] long, log-probs [B, T, k]."""
    k = min(k, logp.shape[-1])
    values, ids = logp.topk(k, dim=-1)
    return ids, values


class FrozenModel(ScoringEngine):
    """`vocab_size`: keep only the first ids of the output distribution — a model whose
    embedding matrix has padded rows beyond the policy's vocabulary (same tokenizer) is cut
    to the policy's size before the softmax."""

    def __init__(self, model_path: str, dtype: str = "float32", device: str | None = None,
                 vocab_size: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model_path, dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.vocab_size = vocab_size
        self.kernels = False  # our attention installed (for statistics), once asked for

    def _to(self, batch):
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    @torch.no_grad()
    def full_logprobs(self, batch, temperature: float = 1.0) -> torch.Tensor:
        b = self._to(batch)
        return next_token_logprobs(logits_of(self.model, b)[..., : self.vocab_size], temperature)

    def score(self, batch, temperature: float = 1.0, stats: dict | None = None) -> dict[str, torch.Tensor]:
        """Logprobs and entropy — with `stats`, also attention statistics (`scored`)."""
        b = self._to(batch)

        def forward():
            logp = self.full_logprobs(b, temperature)
            lp = logp.gather(-1, b["input_ids"][..., None]).squeeze(-1)
            lp[:, 0] = 0.0
            return lp, -(logp.exp() * logp).sum(-1)

        if stats and not self.kernels:
            from kernels import install

            install(self.model, impl="auto", plain="sdpa")
            self.kernels = True
        return scored(self.model, forward, b, stats)

    def probe(self, batch, probe: Probe):
        return to_cpu(probe(FrozenView(self), self._to(batch)))


class FrozenView(Readable):
    def __init__(self, frozen: FrozenModel):
        self.f = frozen

    def module(self):
        return self.f.model

    def next_token_logprobs(self, b, temperature):
        return self.f.full_logprobs(b, temperature)


def to_cpu(out):
    """A probe's result (a tensor or a tuple of them) on the CPU."""
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()
