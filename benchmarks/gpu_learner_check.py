"""The learner on a GPU, without Ray or vLLM (the lent GPU machine has neither): a Qwen3-0.6B-
shaped model built from its config (random weights) in one DeepSpeed process, with our fused
attention kernels. Prints one table:

  - training speed (tokens/s, s/step) and peak GPU memory, ZeRO-2, bf16, checkpointing on;
  - bf16 numerics of our kernels inside the learner: the scoring forward's logprobs against
    the same weights through transformers' sdpa attention (no DeepSpeed, no kernels);
  - the statistics pass's cost inside the scoring forward (credit's WAAD/FAI layers);
  - the learner side of the bucketed weight transport: packing time, bytes, buckets, and an
    exact round trip;
  - single-GPU colocated mode: GPU memory freed by offloading the optimizer state between
    updates, offload / reload times, and a finite loss after the reload.

    python benchmarks/gpu_learner_check.py                      # CUDA, Qwen3-0.6B shape
    python benchmarks/gpu_learner_check.py --device cpu --shape tiny --steps 2   # dry run here
Run by benchmarks/gpu_check.sh (stage 4); DeepSpeed travels there as a wheel.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # Qwen3-0.6B's published config; "tiny" for a CPU dry run
    "qwen3_0_6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=512,
                 tie_word_embeddings=True, rope_theta=1e6),
}


def build(shape: str, dtype: torch.dtype, out: Path) -> str:
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(max_position_embeddings=4096, **SHAPES[shape])
    AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(out)
    return str(out)


def batch(vocab: int, rows: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    resp = torch.zeros(rows, length, dtype=torch.bool)
    resp[:, length // 2:] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(resp), "response_mask": resp}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_bytes(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="qwen3_0_6b", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=256)
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("CUDA not available")
        return 2
    from rl.engine.deepspeed_engine import DeepSpeedEngine, DSEngineConfig, token_logprobs
    from rl.engine.frozen import load_model
    from rollout.weight_sync import get_transport

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build(a.shape, getattr(torch, dtype), Path(tmp) / "model")
        cfg = DSEngineConfig(path, lr=1e-5, zero_stage=2, micro_batch_size=a.rows,
                             dtype=dtype, gradient_checkpointing=True, attention="kernels",
                             attn_impl="triton" if a.device == "cuda" else "blockwise",
                             plain_attention="kernels", offload_between_updates=True)
        eng = DeepSpeedEngine(cfg)
        vocab = SHAPES[a.shape]["vocab_size"]
        b = batch(vocab, a.rows, a.length)
        tokens = int(b["attention_mask"].sum())
        n_params = sum(p.numel() for p in eng._module().parameters())
        rows.append(("model", f"{a.shape}: {n_params / 1e6:.0f}M parameters, {dtype}, "
                              f"batch {a.rows} x {a.length} tokens, device {a.device}"))

        # 1. training speed and peak memory
        norm = float(b["response_mask"].sum())
        eng.train_minibatch([b], "sft", None, norm)  # warm-up (Triton compiles)
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(a.device)
        t0 = time.perf_counter()
        losses = [eng.train_minibatch([b], "sft", None, norm)["loss"] for _ in range(a.steps)]
        sync(a.device)
        step_s = (time.perf_counter() - t0) / a.steps
        rows.append(("train step (ZeRO-2, checkpointing)",
                     f"{step_s:.3f} s/step, {tokens / step_s:,.0f} tokens/s, losses "
                     f"{losses[0]:.4f} → {losses[-1]:.4f}"))
        if a.device == "cuda":
            rows.append(("peak GPU memory (training)",
                         f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))

        # 2. bf16 numerics: our kernels in the learner vs transformers' sdpa on the same weights
        score_in = {k: v for k, v in b.items() if k != "response_mask"}
        sync(a.device)
        t0 = time.perf_counter()
        ours = eng.score(score_in, 1.0)["logprobs"]
        sync(a.device)
        plain_s = time.perf_counter() - t0
        state = {k: v.detach().clone() for k, v in eng.named_weights()}
        ref = load_model(path, getattr(torch, dtype))
        ref.load_state_dict(state, strict=False)
        ref.to(a.device).eval()
        with torch.no_grad():
            logits = ref(input_ids=b["input_ids"].to(a.device),
                         attention_mask=b["attention_mask"].to(a.device)).logits
            theirs, _ = token_logprobs(logits, b["input_ids"].to(a.device), 1.0, with_entropy=False)
        del ref, logits
        diff = (ours - theirs.float().cpu())[:, 1:].abs()
        rows.append(("logprobs, kernels vs sdpa (same weights)",
                     f"max |Δ| {diff.max():.3e}, mean |Δ| {diff.mean():.3e}"))

        # 3. the statistics pass inside the scoring forward
        request = {"waad_window": 10, "fai_band": [10, 100], "layers": "middle:5"}
        sync(a.device)
        t0 = time.perf_counter()
        out = eng.score({**score_in, "response_mask": b["response_mask"]}, 1.0, request)
        sync(a.device)
        stats_s = time.perf_counter() - t0
        rows.append(("scoring forward, plain / with statistics",
                     f"{plain_s:.3f} s / {stats_s:.3f} s ({len(out['attn_stats'])} layers)"))

        # 4. learner side of the bucketed transport
        transport = get_transport("buckets", bucket_bytes=a.bucket_mb << 20)
        t0 = time.perf_counter()
        named = list(eng.named_weights())
        payload = transport.pack(named)
        pack_s = time.perf_counter() - t0
        back = dict(transport.unpack(payload))
        exact = back.keys() == dict(named).keys() and all(torch.equal(back[n], t) for n, t in named)
        rows.append(("weights → bucket payload (rank 0)",
                     f"{pack_s:.2f} s, {transport.payload_bytes(payload) / 2**20:,.0f} MiB in "
                     f"{len(payload['buckets'])} buckets, round trip exact: {exact}"))
        del payload, back, named

        # 5. colocated mode: the optimizer state out of the way between updates
        before = gpu_bytes(a.device)
        moved = eng.offload()
        t0 = time.perf_counter()
        eng.reload()
        reload_s = time.perf_counter() - t0
        after_loss = eng.train_minibatch([b], "sft", None, norm)["loss"]
        rows.append(("offload between updates",
                     f"freed {moved.get('offload_freed_bytes', 0) / 2**30:.2f} GiB of "
                     f"{before / 2**30:.2f} GiB allocated, offload {moved['offload_s']:.2f} s, "
                     f"reload {reload_s:.2f} s, next loss {after_loss:.4f} "
                     f"({'finite' if after_loss == after_loss else 'NaN'})"))
    width = max(len(k) for k, _ in rows)
    print("\n== learner check")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0 if exact and after_loss == after_loss else 1


if __name__ == "__main__":
    sys.exit(main())
