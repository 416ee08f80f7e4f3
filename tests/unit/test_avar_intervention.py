"""AVAR's training-free intervention (rl/methods/avar/intervention.py, specs §3.2).

`reweight` against numbers worked by hand; the installed attention against the model's own
eager forward (α = 0) and against an independent float64 re-computation of the whole tiny
Qwen3 written out here (α ≠ 0, in every layer or some, with and without renormalisation, in a
full forward and through `generate`'s KV cache); and the context manager's clean-up.
"""
from __future__ import annotations

import pytest
import torch

from rl.methods.avar.intervention import (attn_implementations, intervene, prompt_key_masks,
                                          reweight)

ALPHA_E, ALPHA_S = 0.15, 0.6   # the paper's α_img and its largest α_sys


# ---------------------------------------------------------------------------- reweight by hand
def test_reweight_hand_worked_row():
    """One row of 4 keys, A = [0.4, 0.1, 0.3, 0.2]; system = key 0, evidence = key 1.
    × (1 − 0.6) on key 0 and × (1 + 0.15) on key 1: [0.16, 0.115, 0.3, 0.2], sum 0.775;
    renormalised: [0.16, 0.115, 0.3, 0.2] / 0.775 = [0.206452, 0.148387, 0.387097, 0.258065]."""
    w = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64).view(1, 1, 1, 4)
    ev = torch.tensor([[False, True, False, False]])
    sy = torch.tensor([[True, False, False, False]])
    raw = reweight(w, ev, sy, ALPHA_E, ALPHA_S, renormalise=False)
    torch.testing.assert_close(raw.flatten(), torch.tensor([0.16, 0.115, 0.3, 0.2], dtype=torch.float64))
    norm = reweight(w, ev, sy, ALPHA_E, ALPHA_S)
    torch.testing.assert_close(norm.flatten(), torch.tensor([0.16 / 0.775, 0.115 / 0.775, 0.3 / 0.775,
                                                             0.2 / 0.775], dtype=torch.float64))
    torch.testing.assert_close(norm.flatten(), torch.tensor([0.206452, 0.148387, 0.387097, 0.258065],
                                                            dtype=torch.float64), atol=1e-6, rtol=0)
    # α = 0 leaves a distribution as it is, either way
    torch.testing.assert_close(reweight(w, ev, sy, 0.0, 0.0), w)
    torch.testing.assert_close(reweight(w, ev, sy, 0.0, 0.0, renormalise=False), w)


def test_reweight_masks_are_per_row_and_shared_by_heads_and_queries():
    """Row 0's masks never touch row 1: B = 2, H = 2, Q = 2, uniform weights over 4 keys.
    Row 0: evidence key 3, system key 2 → [1, 1, 0.4, 1.15] / 3.55 in every head and query;
    row 1: evidence key 0, no system key → [1.15, 1, 1, 1] / 4.15."""
    w = torch.full((2, 2, 2, 4), 0.25, dtype=torch.float64)
    ev = torch.tensor([[False, False, False, True], [True, False, False, False]])
    sy = torch.tensor([[False, False, True, False], [False, False, False, False]])
    out = reweight(w, ev, sy, ALPHA_E, ALPHA_S)
    row0 = torch.tensor([1, 1, 0.4, 1.15], dtype=torch.float64) / 3.55
    row1 = torch.tensor([1.15, 1, 1, 1], dtype=torch.float64) / 4.15
    torch.testing.assert_close(out[0], row0.expand(2, 2, 4))
    torch.testing.assert_close(out[1], row1.expand(2, 2, 4))


def test_prompt_key_masks_follow_token_classes():
    from rl.batch import TOKEN_CLASS as C

    tc = torch.tensor([[C["other"], C["system"], C["system"], C["evidence"], C["image"], C["distractor"]]],
                      dtype=torch.int8)
    ev, sy = prompt_key_masks(tc, "evidence")
    assert ev.tolist() == [[False, False, False, True, False, False]]
    assert sy.tolist() == [[False, True, True, False, False, False]]
    ev, _ = prompt_key_masks(tc, "image")
    assert ev.tolist() == [[False, False, False, False, True, False]]


def test_prompt_key_masks_template_prefix_counts_from_the_first_real_token():
    """A left-padded batch: row 0 has 2 pads and 5 prompt tokens → ⌊0.4·5⌋ = 2 system keys,
    its first two real tokens (an evidence token among them stays evidence); row 1, 7 prompt
    tokens → 2 as well; the instruction set ignores the share."""
    from rl.batch import TOKEN_CLASS as C

    o, s, e = C["other"], C["system"], C["evidence"]
    tc = torch.tensor([[o, o, s, e, o, e, o], [s, s, s, o, e, e, o]], dtype=torch.int8)
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    ev, sy = prompt_key_masks(tc, "evidence", "template_prefix:0.4", am)
    assert sy.int().tolist() == [[0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]]
    assert ev.int().tolist() == [[0, 0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 1, 0]]
    _, sy = prompt_key_masks(tc, "evidence", "instruction", am)
    assert sy.int().tolist() == [[0, 0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="attention mask"):
        prompt_key_masks(tc, "evidence", "template_prefix:0.4")


# --------------------------------------------------------------- a tiny Qwen3, and a reference
@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The random tiny Qwen3 with sharper attention (q/k projections × 4): at initialisation
    its attention is near-uniform, where re-weighting moves the logits too little to tell a
    right intervention from a wrong one."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in m.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.25)
    return m.requires_grad_(False)


@pytest.fixture(scope="module")
def batch(model):
    """3 rows of 14 tokens, left-padded (row 1 by 4, row 2 by 2), with disjoint random
    evidence and system keys among the real tokens; position ids as generate gives them."""
    g = torch.Generator().manual_seed(0)
    b, t = 3, 14
    ids = torch.randint(2, model.config.vocab_size, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :2] = 0
    ids[mask == 0] = model.config.pad_token_id
    draw = torch.randint(0, 3, (b, t), generator=g)
    ev = (draw == 1) & mask.bool()
    sy = (draw == 2) & mask.bool()
    ev[:, -2], sy[:, -2] = True, False   # every row has keys of both classes
    sy[:, -3], ev[:, -3] = True, False
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "evidence": ev, "system": sy}


def reference_logits(model, ids, mask, pos, evidence, system, a_e, a_s, renormalise=True,
                     layers=None) -> torch.Tensor:
    """The tiny Qwen3's forward written out in float64: RMSNorm, q/k norms, RoPE, causal +
    padding mask, softmax — then each weight × (1 + a_e·[key is evidence] − a_s·[key is
    system]) over the keys of row b (rows re-summed to 1 if `renormalise`) in `layers` —,
    o_proj, SiLU MLP, final norm, lm_head."""
    cfg, d = model.config, lambda x: x.detach().double()
    eps, hd = cfg.rms_norm_eps, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos.double()[..., None] * inv_freq                              # [B, T, hd/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * d(w)

    def rope(x):
        half = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos + half * sin

    b, t = ids.shape
    allowed = torch.ones(t, t).tril().bool()[None] & mask.bool()[:, None, :]   # [B, Tq, Tk]
    factor = 1 + a_e * evidence.double() - a_s * system.double()             # [B, Tk]
    h = d(model.model.embed_tokens.weight)[ids]
    for i, layer in enumerate(model.model.layers):
        at = layer.self_attn
        x = rms(h, layer.input_layernorm.weight)
        q = rms((x @ d(at.q_proj.weight).T).view(b, t, nh, hd), at.q_norm.weight).transpose(1, 2)
        k = rms((x @ d(at.k_proj.weight).T).view(b, t, nkv, hd), at.k_norm.weight).transpose(1, 2)
        v = (x @ d(at.v_proj.weight).T).view(b, t, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        s = (q @ k.transpose(-1, -2)) / hd ** 0.5
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        w = torch.softmax(s, -1).nan_to_num(0.0)   # (padding queries: no key at all)
        if layers is None or i in layers:
            w = w * factor[:, None, None, :]
            if renormalise:
                w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
        o = (w @ v).transpose(1, 2).reshape(b, t, nh * hd)
        h = h + o @ d(at.o_proj.weight).T
        x = rms(h, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        gate = torch.nn.functional.silu(x @ d(mlp.gate_proj.weight).T)
        h = h + (gate * (x @ d(mlp.up_proj.weight).T)) @ d(mlp.down_proj.weight).T
    return rms(h, model.model.norm.weight) @ d(model.lm_head.weight).T


def forward(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     position_ids=b["position_ids"]).logits


def real(b):
    """Positions of real (non-padding) tokens: padding queries' outputs are never read."""
    return b["attention_mask"].bool()


def test_alpha_zero_is_the_models_own_eager_attention(model, batch):
    before = attn_implementations(model)
    model.set_attn_implementation("eager")
    try:
        eager = forward(model, batch)
    finally:
        model.set_attn_implementation(before)
    with intervene(model, batch["evidence"], batch["system"], 0.0, 0.0):
        zero = forward(model, batch)
    torch.testing.assert_close(zero[real(batch)], eager[real(batch)], atol=1e-5, rtol=0)
    # and the float64 reference without intervention is the model
    ref = reference_logits(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                           batch["evidence"], batch["system"], 0.0, 0.0)
    torch.testing.assert_close(ref[real(batch)].float(), eager[real(batch)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("renormalise,layers", [(True, None), (False, None), (True, [1, 3])])
def test_intervened_logits_equal_a_float64_recomputation(model, batch, renormalise, layers):
    """With α_e = 0.15, α_s = 0.6 the intervened forward is the float64 reference with the
    same masks — and far from it with the masks swapped, so the test tells them apart."""
    args = (model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    with intervene(model, batch["evidence"], batch["system"], ALPHA_E, ALPHA_S, renormalise, layers):
        got = forward(model, batch)[real(batch)]
    want = reference_logits(*args, batch["evidence"], batch["system"], ALPHA_E, ALPHA_S,
                            renormalise, layers)[real(batch)].float()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    plain = forward(model, batch)[real(batch)]
    swapped = reference_logits(*args, batch["system"], batch["evidence"], ALPHA_E, ALPHA_S,
                               renormalise, layers)[real(batch)].float()
    assert (got - plain).abs().max() > 100 * 1e-4, "the intervention barely moves the logits"
    assert (swapped - want).abs().max() > 100 * 1e-4, "swapped masks would pass unnoticed"


def test_generate_intervenes_on_the_prompt_keys_only(model, batch):
    """Through generate (prefill, then one query at a time against the KV cache): each
    step's logits are the float64 reference's on the final sequence, with the generated
    keys neither evidence nor system. At α = 0 the tokens are plain generate's."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=model.config.pad_token_id,
              eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **kw)
        with intervene(model, batch["evidence"], batch["system"], 0.0, 0.0):
            zero = model.generate(input_ids=ids, attention_mask=mask, **kw)
        with intervene(model, batch["evidence"], batch["system"], ALPHA_E, ALPHA_S):
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(zero.sequences, plain.sequences)
    seq = out.sequences
    n_new = seq.shape[1] - ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], n_new, dtype=mask.dtype)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp_min(0)
    grow = lambda m: torch.nn.functional.pad(m, (0, n_new))  # noqa: E731
    ref = reference_logits(model, seq, full_mask, pos, grow(batch["evidence"]), grow(batch["system"]),
                           ALPHA_E, ALPHA_S)
    steps = torch.stack(out.logits, 1)                                   # [B, n_new, V]
    torch.testing.assert_close(steps, ref[:, ids.shape[1] - 1: -1].float(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- clean-up
@pytest.mark.parametrize("start", ["sdpa", "eager"])
def test_context_restores_the_attention_implementation(model, batch, start):
    """Whatever the model ran before (set here, so no other test's state is what is checked)
    it runs after — an exception inside included —, and no module keeps the masks."""
    model.set_attn_implementation(start)
    plain = forward(model, batch)
    with pytest.raises(RuntimeError, match="inside"):
        with intervene(model, batch["evidence"], batch["system"], ALPHA_E, ALPHA_S):
            assert attn_implementations(model) == {"": "avar_intervention"}
            raise RuntimeError("inside")
    assert attn_implementations(model) == {"": start}
    assert not any(hasattr(m, "_avar_intervention") for m in model.modules())
    torch.testing.assert_close(forward(model, batch), plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no decoder layer"):
        with intervene(model, batch["evidence"], batch["system"], ALPHA_E, ALPHA_S, layers=[7]):
            pass
    assert attn_implementations(model) == {"": start}


def test_vision_language_model(tiny_vl_dir):
    """On the tiny Qwen2.5-VL with an image_arith prompt (image pads = evidence): α = 0 is the
    model's eager forward (the vision tower runs through the same function, untouched); an
    intervention on the image keys moves the logits; the text and vision parts both get their
    previous attention back."""
    from rl.engine.frozen import image_kwargs, load_model
    from rl.loop.cold_start import load_tokenizer
    from rl.models.vision import image_processor_for
    from rl.tasks import get_task
    from rl.tasks.data import collate_sft, encode_prompt

    model = load_model(tiny_vl_dir, "float32").eval().requires_grad_(False)
    tok = load_tokenizer(tiny_vl_dir)
    task = get_task("image_arith", seed=0, distractor_prob=0.0)  # one prompt length
    prompts = [encode_prompt(tok, task.sample("test", i), images=image_processor_for(tiny_vl_dir))
               for i in range(2)]
    b = collate_sft(prompts, [[], []], tok.pad_token_id)   # same-length prompts: no padding
    assert bool(b["attention_mask"].all())
    ev, sy = prompt_key_masks(b["token_classes"], "image")
    assert bool(ev.any(1).all()) and bool(sy.any(1).all())

    def logits():
        with torch.no_grad():
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                         **image_kwargs(model, b)).logits

    before = attn_implementations(model)
    assert set(before) >= {"", "vision_config", "text_config"}
    assert "avar_intervention" not in before.values()
    model.set_attn_implementation("eager")
    eager = logits()
    model.set_attn_implementation(before)
    with intervene(model, ev, sy, 0.0, 0.0):
        zero = logits()
    with intervene(model, ev, sy, ALPHA_E, ALPHA_S):
        moved = logits()
    assert attn_implementations(model) == before
    torch.testing.assert_close(zero, eager, atol=1e-5, rtol=0)
    assert (moved - eager).abs().max() > 1e-3
