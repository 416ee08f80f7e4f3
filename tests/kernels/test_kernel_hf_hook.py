"""The transformers hook on a tiny Qwen3 (built from a config, no download): logits equal
stock attention's, captured statistics equal those computed from output_attentions maps,
gradients flow, packing via position_ids works, and layer selection follows the paper."""

import pytest
import torch
import transformers

from kernels import StatsSpec
from kernels.capture import AttentionCapture, select_layers
from kernels.hf_hook import ATTN_NAME, install
from kernel_testlib import seeded_model

W, BAND = 3, (2, 9)


@pytest.fixture(scope="module")
def model():
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    m = seeded_model(lambda: transformers.Qwen3ForCausalLM(cfg).float().eval(), torch.Generator().manual_seed(0),
                     cfg.initializer_range)
    with torch.no_grad():  # stronger q/k so attention is far from uniform
        for layer in m.model.layers:
            layer.self_attn.q_norm.weight.mul_(3.0)
    return m


def _batch(gen):
    ids = torch.randint(0, 64, (2, 23), generator=gen)
    am = torch.ones(2, 23, dtype=torch.long)
    am[1, :6] = 0  # left padding, as a rollout batch of prompts has
    resp = torch.zeros(2, 23, dtype=torch.bool)
    resp[:, 10:] = True
    cls = torch.randint(-1, 2, (2, 23), generator=gen)
    return ids, am, resp, cls


def _logits(model, impl_name, **kw):
    model.set_attn_implementation(impl_name)
    with torch.no_grad():
        return model(**kw).logits


def stats_from_maps(A, am, resp, cls):
    """The papers' definitions applied to eager attention maps [B, H, N, N]."""
    A = A.double()
    N = A.shape[-1]
    pos = am.cumsum(1) - 1  # position inside the sequence (left padding)
    dist = (pos[:, None, :, None] - pos[:, None, None, :]).clamp(min=0).double()
    keep = am.bool()[:, None, None, :] & torch.ones(N, N, dtype=torch.bool).tril()
    A = A * keep
    out = {"entropy": -torch.special.xlogy(A, A).sum(-1), "distance": (A * dist).sum(-1),
           "waad": (A * dist.clamp(max=W)).sum(-1),
           "mass": torch.stack([(A * (cls == c)[:, None, None, :]).sum(-1) for c in range(2)], -1)}
    band = (dist >= BAND[0]) & (dist <= BAND[1]) & keep & (resp & am.bool())[:, None, :, None]
    cnt = band.sum(-2).double()
    out["fai"] = torch.where(cnt > 0, (A * band).sum(-2) / cnt.clamp(min=1), torch.zeros_like(cnt))
    return out


@pytest.mark.parametrize("impl", ["blockwise", "reference"])
def test_hook_logits_equal_stock_attention(model, impl, monkeypatch, gen):
    import kernels.hf_hook as hook

    calls = []
    real = hook.attention
    monkeypatch.setattr(hook, "attention", lambda *a, **kw: calls.append(kw["impl"]) or real(*a, **kw))
    ids, am, _, _ = _batch(gen)
    ref = _logits(model, "sdpa", input_ids=ids, attention_mask=am)
    install(model, impl=impl)
    ours = _logits(model, ATTN_NAME, input_ids=ids, attention_mask=am)  # no capture: the stats-off path
    assert calls == [impl] * 4
    valid = am.bool()
    assert (ours[valid] - ref[valid]).abs().max() < 1e-5
    with torch.no_grad(), AttentionCapture(model, layers="all", spec=StatsSpec.all(), impl=impl)(
            response_mask=am.bool()) as stats:
        ours_stats = model(input_ids=ids, attention_mask=am).logits  # stats-on path
    assert stats.layers == [0, 1, 2, 3]
    assert (ours_stats[valid] - ref[valid]).abs().max() < 1e-5
    ours_nomask = _logits(model, ATTN_NAME, input_ids=ids)
    assert (ours_nomask - _logits(model, "sdpa", input_ids=ids)).abs().max() < 1e-5


def test_captured_statistics_equal_output_attentions_maps(model, gen):
    ids, am, resp, cls = _batch(gen)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    spec = StatsSpec(entropy=True, distance=True, waad_window=W, fai_band=BAND, n_classes=2)
    cap = AttentionCapture(model, layers="all", spec=spec, impl="blockwise")
    assert model.config._attn_implementation == ATTN_NAME
    with torch.no_grad(), cap(response_mask=resp, key_classes=cls) as stats:
        model(input_ids=ids, attention_mask=am)
    assert stats.layers == [0, 1, 2, 3]
    valid = am.bool()
    for layer in stats.layers:
        want = stats_from_maps(maps[layer], am, resp, cls)
        got = stats[layer].fields()
        for name, w in want.items():
            g = got[name].double()
            sel = lambda t: t.transpose(1, 2)[valid]  # [tok, H, ...]
            err = (sel(g) - sel(w)).abs()
            assert (err <= 1e-5 * (1 + sel(w).abs())).all(), (layer, name, err.max().item())
    assert stats.stack("waad").shape == (4, 2, 2, 23)


def test_capture_middle_layers_only_and_nothing_outside(model, gen):
    ids, am, resp, _ = _batch(gen)
    cap = AttentionCapture(model, layers="middle:5", spec=StatsSpec(distance=True), impl="blockwise")
    with torch.no_grad(), cap() as stats:
        model(input_ids=ids, attention_mask=am)
    assert stats.layers == select_layers("middle:5", 4) == [1, 2]
    with torch.no_grad():  # outside the block: no capture, plain path
        model(input_ids=ids, attention_mask=am)
    assert stats.layers == [1, 2]


def test_select_layers():
    assert select_layers("middle:5", 36) == [12, 15, 18, 21, 24]
    assert select_layers("all", 3) == [0, 1, 2]
    assert select_layers([3, 1, 1], 4) == [1, 3]
    with pytest.raises(ValueError):
        select_layers([4], 4)
    with pytest.raises(ValueError):
        select_layers("top", 4)


def test_hook_training_forward_gradients_and_deferred_fai(model, gen):
    ids, am, resp, _ = _batch(gen)
    model.set_attn_implementation("sdpa")
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=am).logits
    (out[am.bool()] ** 2).mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    cap = AttentionCapture(model, layers=[2], spec=StatsSpec(fai_band=BAND, fai_in_backward=True), impl="blockwise")
    with cap(response_mask=resp) as stats:
        out = model(input_ids=ids, attention_mask=am).logits
        assert torch.isnan(stats[2].fai_sum[0]).all()
        (out[am.bool()] ** 2).mean().backward()
    for n, p in model.named_parameters():
        if n in ref:
            assert torch.allclose(p.grad, ref[n], atol=1e-5, rtol=1e-4), n
    with torch.no_grad(), AttentionCapture(model, layers=[2], spec=StatsSpec(fai_band=BAND), impl="blockwise")(
            response_mask=resp) as st2:
        model(input_ids=ids, attention_mask=am)
    assert torch.allclose(stats[2].fai_sum, st2[2].fai_sum, atol=1e-6)
    model.zero_grad()


def test_hook_packed_position_ids(model, gen):
    """Padding-free packing (two sequences in one row, position_ids restart)."""
    a, b = torch.randint(0, 64, (1, 9), generator=gen), torch.randint(0, 64, (1, 14), generator=gen)
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    cap = AttentionCapture(model, layers=[1], spec=StatsSpec(entropy=True), impl="blockwise")
    with torch.no_grad(), cap() as stats:
        packed = model(input_ids=ids, position_ids=pos).logits
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        la, lb = model(input_ids=a).logits, model(input_ids=b).logits
    assert (packed - torch.cat([la, lb], 1)).abs().max() < 1e-5
    assert stats[1].entropy.shape == (23, 2)  # packed layout [T, Hq]
    assert stats[1].entropy[0].abs().max() < 1e-6 and stats[1].entropy[9].abs().max() < 1e-6  # first tokens


def test_hook_with_triton_kernels(model, gen):
    """The GPU path through the hook (interpreted on CPU): logits and statistics equal the
    blockwise path's; on a CUDA machine the model runs on the GPU."""
    import copy

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = copy.deepcopy(model).to(dev)
    ids, am, resp, cls = (x.to(dev) for x in _batch(gen))
    spec = StatsSpec(entropy=True, distance=True, waad_window=W, fai_band=BAND, n_classes=2)
    got = {}
    for impl in ("triton", "blockwise"):
        cap = AttentionCapture(m, layers=[1, 3], spec=spec, impl=impl)
        with torch.no_grad(), cap(response_mask=resp, key_classes=cls) as stats:
            logits = m(input_ids=ids, attention_mask=am).logits
        got[impl] = (logits, stats)
    valid = am.bool()
    assert (got["triton"][0] - got["blockwise"][0])[valid].abs().max() < 1e-5
    for layer in (1, 3):
        for name, t in got["blockwise"][1][layer].fields().items():
            assert torch.allclose(got["triton"][1][layer].fields()[name], t, atol=1e-5, rtol=1e-5), (layer, name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_capture_with_gradient_checkpointing(model, reentrant, gen):
    """Recomputed forwards inside the backward must not overwrite the captured statistics,
    and the deferred FAI must end up filled either way."""
    import copy

    m = copy.deepcopy(model).train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids, am, resp, _ = _batch(gen)
    spec = StatsSpec(entropy=True, fai_band=BAND, fai_in_backward=True)
    with torch.no_grad(), AttentionCapture(m, layers=[2], spec=spec.replace(fai_in_backward=False),
                                           impl="blockwise")(response_mask=resp) as want:
        m(input_ids=ids, attention_mask=am)
    cap = AttentionCapture(m, layers=[2], spec=spec, impl="blockwise")
    with cap(response_mask=resp) as stats:
        out = m(input_ids=ids, attention_mask=am).logits
        first = stats[2]
        (out[am.bool()] ** 2).mean().backward()
    assert stats[2] is first
    assert torch.allclose(stats[2].entropy, want[2].entropy, atol=1e-6)
    assert torch.allclose(stats[2].fai_sum, want[2].fai_sum, atol=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_capture_grad_mass_for_cold_start_loss(model, gen):
    """The differentiable key-class mass collected in the forward equals the detached one
    and backpropagates into the q/k projections (AVAR's cold-start objective)."""
    import copy

    m = copy.deepcopy(model)
    ids, am, _, cls = _batch(gen)
    cap = AttentionCapture(m, layers=[1, 2], spec=StatsSpec(n_classes=2), impl="blockwise", grad_mass=True)
    with cap(key_classes=cls) as stats:
        m(input_ids=ids, attention_mask=am)
    assert sorted(stats.grad_mass) == [1, 2]
    for layer in (1, 2):
        gm = stats.grad_mass[layer]
        assert gm.requires_grad and gm.shape == stats[layer].mass.shape
        assert torch.allclose(gm.detach(), stats[layer].mass, atol=1e-5)
    loss = -torch.log(stats.grad_mass[2][..., 0].clamp(min=1e-6))[am.bool()[:, None].expand(-1, 2, -1)].mean()
    loss.backward()
    assert m.model.layers[2].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert m.model.layers[2].self_attn.v_proj.weight.grad is None  # mass does not depend on v
    with pytest.raises(ValueError):
        AttentionCapture(m, layers=[1], spec=StatsSpec(), grad_mass=True)


def test_plain_sdpa_routes_only_unrecorded_calls_to_sdpa(monkeypatch):
    """install(plain="sdpa"): calls that record no statistics go to transformers' SDPA, the
    recorded layers to our kernels — and the logits are the same either way."""
    import kernels.hf_hook as hook
    from kernels import AttentionCapture, StatsSpec
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    gen = torch.Generator().manual_seed(0)
    model = seeded_model(lambda: AutoModelForCausalLM.from_config(cfg).eval(), gen, cfg.initializer_range)
    ids = torch.randint(0, 50, (2, 12), generator=gen)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 9:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am).logits
    hook.install(model, impl="blockwise", plain="sdpa")
    calls = []
    real = hook.attention
    monkeypatch.setattr(hook, "attention", lambda *a, **kw: calls.append(kw.get("stats")) or real(*a, **kw))
    cap = AttentionCapture(model, layers=[1], spec=StatsSpec(distance=True), impl="blockwise")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am).logits
        assert calls == []  # no capture: every layer ran SDPA
        with cap() as st:
            got = model(input_ids=ids, attention_mask=am).logits
    assert len(calls) == 1 and calls[0] is not None and list(st) == [1]
    real_rows = am.bool()
    assert torch.allclose(plain[real_rows], want[real_rows], atol=1e-5)
    assert torch.allclose(got[real_rows], want[real_rows], atol=1e-5)
