"""Attention-entropy reweighting (rl/methods/credit/attention_entropy.py): γ on a hand-worked case, and γ
from the kernels' statistics equal to a float64 computation from eager attention maps."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers

from kernels import StatsSpec
from kernels.capture import AttentionCapture
from kernels.hf_hook import install
from rl.batch import RolloutBatch
from rl.methods.credit import build
from rl.methods.base import RunInfo


def batch_of(ids, attention_mask, response_mask) -> RolloutBatch:
    B, T = ids.shape
    return RolloutBatch(input_ids=ids, attention_mask=attention_mask.bool(),
                        response_mask=response_mask, sampler_logprobs=torch.zeros(B, T),
                        token_classes=torch.zeros(B, T, dtype=torch.int8),
                        group_ids=torch.zeros(B, dtype=torch.long), rewards=torch.zeros(B),
                        token_weights=torch.ones(B, T))


def method(steps: int, num_layers: int = 4, **params):
    m = build("attention_entropy", params)
    m.setup(RunInfo(num_layers=num_layers, steps=steps))
    return m


def test_hand_worked_case():
    """2 prompt tokens, 4 response tokens (positions 2..5 see N = 3..6 keys). The heads' mean
    entropy at t is Ĥ_t · log N_t with Ĥ = 0.9, 0.2, 0.5, 0.7, split 3:1 over two heads, so the
    ranks are 4, 1, 2, 3 and u = 0.875, 0.125, 0.375, 0.625. β = 0.5:
        step 0 of 5 (s = 0): γ = 1 − 0.5 (2u − 1) = 0.625, 1.375, 1.125, 0.875
        step 4 of 5 (s = 1): the reverse, 1.375, 0.625, 0.875, 1.125
        step 2 of 5 (s = ½): all 1."""
    h_hat = torch.tensor([0.0, 0.0, 0.9, 0.2, 0.5, 0.7])
    log_n = torch.log(torch.arange(1, 7, dtype=torch.float64)).float()
    mean = h_hat * log_n
    entropy = torch.stack([1.5 * mean, 0.5 * mean])[None]  # [B=1, H=2, T=6]
    resp = torch.tensor([[False, False, True, True, True, True]])
    cases = {0: [0.625, 1.375, 1.125, 0.875], 4: [1.375, 0.625, 0.875, 1.125], 2: [1.0] * 4}
    for step, want in cases.items():
        b = batch_of(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6), resp)
        m = method(steps=5)
        metrics = m.weights(b, {2: {"entropy": entropy}}, step)
        assert b.token_weights[0].tolist() == pytest.approx([1.0, 1.0, *want], abs=1e-6), step
        assert metrics["gamma_mean"] == pytest.approx(1.0, abs=1e-7)
    assert m.layers == [2]  # ⌊4 / 2⌋
    # the lowest 25% of 4 tokens is one anchor (t=3); its weight share at step 0 is 1.375 / 4
    b = batch_of(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6), resp)
    metrics = method(steps=5, share=0.25).weights(b, {2: {"entropy": entropy}}, 0)
    assert metrics["anchor_weight_share"] == pytest.approx(1.375 / 4)
    assert metrics["explorer_weight_share"] == pytest.approx(0.625 / 4)
    g = torch.tensor([0.625, 1.375, 1.125, 0.875])
    assert metrics["gamma_ess"] == pytest.approx(float(g.sum() ** 2 / (4 * (g ** 2).sum())))


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="beta"):
        build("attention_entropy", {"beta": 1.0})
    with pytest.raises(ValueError, match="layer"):
        method(steps=3, layer=4)  # a 4-layer model has layers 0..3


def gamma_reference(model64, layer: int, ids, am, resp, s: float, beta: float):
    """The definition, token by token in float64: each row's real tokens alone through the
    float64 model with eager attention (RoPE is relative: the left padding's offset changes
    nothing), the entropy of each head's map row, averaged over heads, over log of the keys."""
    B, N = ids.shape
    gamma = torch.ones(B, N, dtype=torch.float64)
    gaps = []
    for b in range(B):
        real = am[b].bool().nonzero()[:, 0]
        with torch.no_grad():
            maps = model64(input_ids=ids[b, real][None], output_attentions=True).attentions[layer][0]
        h_hat = {}
        for i, t in enumerate(real.tolist()):
            if resp[b, t]:
                p = maps[:, i, : i + 1]  # [H, keys]
                h_hat[t] = float(-torch.special.xlogy(p, p).sum(-1).mean()) / math.log(i + 1)
        order = sorted(h_hat, key=lambda t: (h_hat[t], t))
        gaps.append(min(h_hat[hi] - h_hat[lo] for lo, hi in zip(order, order[1:])))
        for rank, t in enumerate(order, start=1):
            u = (rank - 0.5) / len(order)
            gamma[b, t] = 1 + beta * (2 * u - 1) * (2 * s - 1)
    return gamma, min(gaps)


def test_gamma_from_kernel_statistics_equals_float64_eager_maps():
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # stronger q/k: attention far from uniform, entropies well apart
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(3.0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 30), generator=gen)
    am = torch.ones(2, 30, dtype=torch.long)
    am[1, :5] = 0  # left padding: N_t counts real keys only
    resp = torch.zeros(2, 30, dtype=torch.bool)
    resp[:, 12:] = True
    m = method(steps=7, num_layers=4, beta=0.5)
    (layer,) = m.layers
    model64 = transformers.Qwen3ForCausalLM(copy.deepcopy(cfg)).double().eval()
    model64.load_state_dict(model.state_dict())
    model64.set_attn_implementation("eager")
    install(model, impl="blockwise")
    cap = AttentionCapture(model, layers=m.layers, spec=StatsSpec(**m.stats_request()), impl="blockwise")
    with torch.no_grad(), cap(response_mask=resp) as captured:
        model(input_ids=ids, attention_mask=am)
    stats = {i: st.fields() for i, st in captured.items()}
    for step in (0, 2, 6):
        b = batch_of(ids, am, resp)
        m.weights(b, stats, step)
        want, gap = gamma_reference(model64, layer, ids, am, resp, step / 6, 0.5)
        assert gap > 1e-5  # ranks well defined at float32 precision
        assert torch.allclose(b.token_weights.double(), want, atol=1e-6), step
    assert not torch.allclose(want, torch.ones_like(want))  # (step 6: a real tilt)
