"""The hook and capture under a real DeepSpeed ZeRO-3 engine (CPU, gloo, one rank): the
engine's forward goes through kernels.attention, logits equal stock SDPA's, statistics
are captured in the training forward and the deferred FAI is filled by engine.backward.
Runs in a subprocess so the process group does not leak into other tests.

The captured values are compared with two references computed on the same weights (before
the optimizer step): the papers' definitions applied to eager `output_attentions` maps of the
engine's module (as `stats_from_maps` in test_kernel_hf_hook.py), and the FAI column pass of a
non-deferred capture of the same forward. `AttnStats.fai_sum` holds *column sums*
Σ_{i in band(j), i a response row} p_ij (kernels/spec.py; `fai` = fai_sum / fai_count), so the
deferred sums must equal the direct ones and the maps' band column sums."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

SCRIPT = textwrap.dedent("""
    import torch, transformers, deepspeed
    from kernels import StatsSpec
    from kernels.capture import AttentionCapture
    deepspeed.init_distributed(dist_backend="gloo")
    gen = torch.Generator().manual_seed(0)  # every random number below comes from here
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # redraw the init (N(0, initializer_range); norms stay ones) from gen
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, 0.0, cfg.initializer_range, generator=gen)
        for layer in model.model.layers:  # stronger q/k so attention is far from uniform
            layer.self_attn.q_norm.weight.mul_(3.0)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters())
    ids = torch.randint(0, 64, (2, 20), generator=gen)
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :4] = 0
    valid = am.bool()
    W, BAND = 3, (2, 8)

    def maps_reference(A):
        # waad [B, H, N] and FAI column sums [B, H, N] from eager maps [B, H, N, N] (the
        # definitions of kernels/spec.py; response rows = every real token, as passed below)
        A = A.double()
        N = A.shape[-1]
        pos = am.cumsum(1) - 1  # position inside the sequence (left padding)
        dist = (pos[:, None, :, None] - pos[:, None, None, :]).clamp(min=0).double()
        keep = valid[:, None, None, :] & torch.ones(N, N, dtype=torch.bool).tril()
        A = A * keep
        band = (dist >= BAND[0]) & (dist <= BAND[1]) & keep & valid[:, None, :, None]
        return (A * dist.clamp(max=W)).sum(-1), (A * band).sum(-2), band[:, 0].sum(-2).double()

    def close(got, want, what):  # on real tokens only; padding slots hold 0 by contract
        g, w = got.double().transpose(1, 2)[valid], want.double().transpose(1, 2)[valid]
        err = (g - w).abs()
        assert (err <= 1e-5 * (1 + w.abs())).all(), (what, err.max().item())

    engine.module.set_attn_implementation("eager")
    with torch.no_grad():
        maps = engine(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    engine.module.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = engine(input_ids=ids, attention_mask=am).logits
    direct_spec = StatsSpec.all(waad_window=W, fai_band=BAND)  # FAI by the forward's column pass
    direct_cap = AttentionCapture(engine.module, layers="middle:2", spec=direct_spec, impl="blockwise")
    with torch.no_grad(), direct_cap(response_mask=valid) as direct:
        engine(input_ids=ids, attention_mask=am)
    spec = direct_spec.replace(fai_in_backward=True)
    cap = AttentionCapture(engine.module, layers="middle:2", spec=spec, impl="blockwise")
    with cap(response_mask=valid) as stats:
        out = engine(input_ids=ids, attention_mask=am).logits
        assert (out - ref)[valid].abs().max() < 1e-5
        assert torch.isnan(stats[1].fai_sum[0]).all()
        engine.backward(out[valid].logsumexp(-1).mean())
        engine.step()
    assert stats.layers == direct.layers == [1, 2], stats.layers
    assert stats.stack("waad").shape == (2, 2, 2, 20)
    for layer in stats.layers:
        waad, fai_colsum, count = maps_reference(maps[layer])
        close(stats[layer].waad, waad, ("waad", layer))
        close(stats[layer].fai_count[:, None], count[:, None], ("fai_count", layer))
        close(stats[layer].fai_sum, fai_colsum, ("deferred fai_sum vs maps", layer))
        close(stats[layer].fai_sum, direct[layer].fai_sum, ("deferred vs direct fai_sum", layer))
        close(stats[layer].fai, direct[layer].fai, ("deferred vs direct fai", layer))
    print("DEEPSPEED_OK")
""")


@pytest.mark.slow
def test_capture_under_deepspeed_zero3():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "DEEPSPEED_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
