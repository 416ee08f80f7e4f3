"""The hook and capture under a real DeepSpeed ZeRO-3 engine (CPU, gloo, one rank): the
engine's forward goes through kernels.attention, logits equal stock SDPA's, statistics
are captured in the training forward and the deferred FAI is filled by engine.backward.
Runs in a subprocess so the process group does not leak into other tests."""

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
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters())
    ids = torch.randint(0, 64, (2, 20), generator=gen)
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :4] = 0
    engine.module.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = engine(input_ids=ids, attention_mask=am).logits
    spec = StatsSpec.all(waad_window=3, fai_band=(2, 8), fai_in_backward=True)
    cap = AttentionCapture(engine.module, layers="middle:2", spec=spec, impl="blockwise")
    with cap(response_mask=am.bool()) as stats:
        out = engine(input_ids=ids, attention_mask=am).logits
        assert (out - ref)[am.bool()].abs().max() < 1e-5
        assert torch.isnan(stats[1].fai_sum[0]).all()
        engine.backward(out[am.bool()].logsumexp(-1).mean())
        engine.step()
    assert stats.layers == [1, 2], stats.layers
    assert all(torch.isfinite(stats[i].fai_sum).all() for i in stats.layers)
    assert stats.stack("waad").shape == (2, 2, 2, 20)
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
