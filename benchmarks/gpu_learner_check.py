"""The learner on a GPU, without Ray or vLLM (the lent GPU machine has neither), judged.

Two parts (benchmarks/gpu_check.sh runs them as two stages):

  --part attention   our bf16 attention (Triton on CUDA) against torch's own bf16 SDPA, both
                     measured against a float64 reference from the same bf16 inputs: forward
                     output and the q, k, v gradients. No DeepSpeed needed.
  --part learner     a Qwen3-0.6B-shaped model built from its config (random weights) in one
                     DeepSpeed process (ZeRO-2, bf16, checkpointing), our kernels inside:
                     training speed and peak memory; the scoring forward's bf16 logprobs against
                     the same weights through transformers' sdpa attention (and both against a
                     float32 forward); the statistics pass's cost; the learner side of the
                     bucketed weight transport (an exact round trip); the colocated mode's
                     offload/reload of the optimizer state (bytes freed, state intact, a finite
                     loss after the reload).

Every judged figure is printed against its threshold (THRESHOLDS below, the one place they
are set; benchmarks/gpu_two_ranks.py reads them too) with PASS/FAIL, and the exit status is 1
when any fails (a crash: its traceback, and the figures that could still be taken).

    python benchmarks/gpu_learner_check.py                      # CUDA, Qwen3-0.6B shape, both parts
    python benchmarks/gpu_learner_check.py --device cpu --shape tiny --steps 2   # dry run here
DeepSpeed travels to the lent machine as wheels (benchmarks/gpu_wheels.sh).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ---------------------------------------------------------------------------------------------
# THRESHOLDS: every figure the GPU check judges (gpu_learner_check.py, gpu_two_ranks.py), and
# why. bench_attention.py keeps the kernel spec's own speed budgets (printed there, judged by
# gpu_check.sh from its PASS/FAIL lines).
BF16_U = 2.0 ** -8  # bf16's unit roundoff (8 significant bits): one rounding's worst relative error
THRESHOLDS = {
    # Attention, bf16 in and out, each error against a float64 attention of the same (bf16)
    # inputs, relative to the reference's size (max|Δ| / max|ref|, mean|Δ| / mean|ref|), for
    # the output and dq, dk, dv. Ours must be within ATTN_FACTOR x torch's own bf16 SDPA error
    # + eps. Both accumulate in fp32 and round P and the output to bf16, so a correct kernel
    # lands near torch (factor 2 leaves room for another tiling / rounding order); the eps
    # allow one extra bf16 rounding at the worst element (u) and a quarter of one on average.
    # A real defect (mask off by one, a missing rescale between tiles, a wrong scale, bf16
    # accumulation) costs 1e-2..1 relative: far outside.
    "attn_factor": 2.0,
    "attn_eps_max": BF16_U,
    "attn_eps_mean": BF16_U / 4,
    # Logprobs of the learner's scoring forward (ours, bf16) against transformers' sdpa on the
    # same bf16 weights, Qwen3-0.6B shape, 28 layers, 8 x 1024 tokens. Two correct bf16
    # attentions differ by their roundings only: measured on CPU for this shape (random
    # weights; sdpa vs an fp32-math attention rounded to bf16, 256 and 2048 tokens) max |Δ|
    # 0.027..0.031, mean |Δ| 0.007..0.008 nats, the same size as each one's distance to an fp32
    # forward (0.025..0.033 / 0.0066..0.0073). Ceilings: mean ~4x, max ~8x that (8k tokens here,
    # the GPU's bf16 matmuls and tilings differ); a wrong mask or scale moves logprobs by nats.
    "logprob_max_abs": 0.25,
    "logprob_mean_abs": 0.03,
    # ... and against a float32 forward of the same weights: ours no further from it than
    # LOGPROB_FACTOR x sdpa-in-bf16's distance + eps (the noise floor measured in the same run).
    "logprob_factor": 2.0,
    "logprob_eps_max": 0.02,
    "logprob_eps_mean": 0.002,
    # Offload between updates, ZeRO-2 bf16 AdamW, one rank: the fp32 master weights (4 B per
    # parameter) and Adam's m and v (4 + 4 B) must leave the GPU: 12 B x parameters. (The
    # gradient buffers, lp grads and ZeRO-2's contiguous bucket, are freed too when allocated,
    # which after the step they mostly are not: counted as extra, not required.) At least 90%
    # of 12 B/param: the flat groups' alignment padding and allocator rounding are << 1%, a
    # state kept on the GPU (e.g. m, v: 8 of 12) is far below.
    "offload_bytes_per_param": 12,
    "offload_min_fraction": 0.90,
    # Two ranks, one GPU (gpu_two_ranks.py), bf16, gloo, ZeRO-0. Between the ranks: the same
    # all-reduced gradient and the same update, so the global grad norm and the probe logprobs
    # are the same computation on both (bit-equal in practice; 1e-5 for a different kernel
    # choice). Against one process over both micro-batches (bf16 forward and backward, rows
    # packed differently): a loss summed from the ranks within 1%, the grad norm within 3%
    # (bf16 gradients: ~0.4% per element; a gradient summed instead of averaged, or not
    # reduced at all, is off by ~2x or ~30%).
    "ranks_grad_norm_rtol": 1e-5,
    "ranks_logprob_atol": 1e-5,
    "dp_loss_rtol": 1e-2,
    "dp_grad_norm_rtol": 3e-2,
}
# ---------------------------------------------------------------------------------------------

SHAPES = {  # Qwen3-0.6B's published config; "tiny" for a CPU dry run
    "qwen3_0_6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=512,
                 tie_word_embeddings=True, rope_theta=1e6),
}

Row = tuple  # (name, text, verdict: True PASS / False FAIL / None not judged)


def build(shape: str, dtype: torch.dtype, out: Path) -> str:
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(max_position_embeddings=4096, **SHAPES[shape])
    AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(out)
    return str(out)


def batch(vocab: int, rows: int, length: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
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


def print_table(rows: list[Row], title: str) -> int:
    """The rows with their verdicts; returns the exit status (1 if any FAIL)."""
    width = max((len(r[0]) for r in rows), default=10)
    for name, text, ok in rows:
        verdict = "PASS" if ok is True else "FAIL" if ok is False else "    "
        print(f"{verdict}  {name:<{width}}  {text}")
    n_pass = sum(r[2] is True for r in rows)
    n_fail = sum(r[2] is False for r in rows)
    print(f"{title}: {n_pass} PASS, {n_fail} FAIL")
    return 1 if n_fail or not n_pass else 0


def crashed(rows: list[Row], what: str) -> None:
    traceback.print_exc()
    e = sys.exc_info()[1]
    rows.append((what, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                 False))


def within(ours: float, theirs: float, factor: float, eps: float) -> tuple[str, bool]:
    lim = factor * theirs + eps
    return f"{ours:.3e} vs sdpa {theirs:.3e} (want <= {lim:.3e})", ours <= lim  # NaN fails


# --- part 1: attention numerics ------------------------------------------------------------------
def attention_rows(device: str) -> list[Row]:
    import torch.nn.functional as F

    from kernels import attention

    T = THRESHOLDS
    impl = "triton" if device == "cuda" else "blockwise"
    # (B, Hq, Hkv, N, d): the benchmark's d128 32/8 heads at 4k, and Qwen3-0.6B's 16/8 heads
    shapes = ([(1, 32, 8, 4096, 128), (2, 16, 8, 1024, 128)] if device == "cuda"
              else [(1, 4, 2, 96, 32)])
    rows: list[Row] = []
    for B, hq, hkv, n, d in shapes:
        tag = f"B{B} {hq}/{hkv} heads N{n} d{d}"
        try:
            g = torch.Generator().manual_seed(n * d + hq)
            q, k, v, do = (torch.randn(B, h, n, d, generator=g).to(device, torch.bfloat16)
                           for h in (hq, hkv, hkv, hq))
            ref = reference_grads(q, k, v, do)
            got = {}
            for who in ("ours", "sdpa"):
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
                if who == "ours":
                    out = attention(qg, kg, vg, impl=impl)
                else:
                    out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True,
                                                         enable_gqa=hq != hkv)
                out.backward(do)
                got[who] = {"out": out.detach(), "dq": qg.grad, "dk": kg.grad, "dv": vg.grad}
            for name in ("out", "dq", "dk", "dv"):
                r = ref[name]
                errs = {}
                for who in ("ours", "sdpa"):
                    diff = (got[who][name].double() - r).abs()
                    errs[who] = (float(diff.max() / r.abs().max()), float(diff.mean() / r.abs().mean()))
                tm, okm = within(errs["ours"][0], errs["sdpa"][0], T["attn_factor"], T["attn_eps_max"])
                ta, oka = within(errs["ours"][1], errs["sdpa"][1], T["attn_factor"], T["attn_eps_mean"])
                rows.append((f"{impl} bf16 {name} error, {tag}", f"rel max {tm}; rel mean {ta}",
                             okm and oka))
        except Exception:  # noqa: BLE001 — reported as a FAIL; the other shapes still run
            crashed(rows, f"{impl} bf16 attention, {tag}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def reference_grads(q, k, v, do) -> dict[str, torch.Tensor]:
    """float64 causal GQA attention of the bf16 inputs and its gradients, one kv head at a time
    (bounded memory: the math path materialises [B, group, N, N])."""
    import torch.nn.functional as F

    hq, hkv = q.shape[1], k.shape[1]
    rep = hq // hkv
    out, dq = torch.empty_like(q, dtype=torch.float64), torch.empty_like(q, dtype=torch.float64)
    dk, dv = torch.empty_like(k, dtype=torch.float64), torch.empty_like(v, dtype=torch.float64)
    for h in range(hkv):
        qs = q[:, h * rep:(h + 1) * rep].double().requires_grad_()
        ks = k[:, h:h + 1].double().expand(-1, rep, -1, -1).detach().requires_grad_()
        vs = v[:, h:h + 1].double().expand(-1, rep, -1, -1).detach().requires_grad_()
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        o.backward(do[:, h * rep:(h + 1) * rep].double())
        out[:, h * rep:(h + 1) * rep] = o.detach()
        dq[:, h * rep:(h + 1) * rep] = qs.grad
        dk[:, h] = ks.grad.sum(1)
        dv[:, h] = vs.grad.sum(1)
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}


# --- part 2: the learner ---------------------------------------------------------------------------
def learner_rows(a) -> list[Row]:
    from rl.engine.deepspeed_engine import DeepSpeedEngine, DSEngineConfig, token_logprobs
    from rl.algorithms.losses import SftLoss
    from rl.engine.frozen import load_model
    from rollout.weight_sync import get_transport

    T = THRESHOLDS
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build(a.shape, getattr(torch, dtype), Path(tmp) / "model")
        cfg = DSEngineConfig(path, lr=1e-5, zero_stage=2, micro_batch_size=a.rows,
                             dtype=dtype, gradient_checkpointing=True, attention="kernels",
                             attn_impl="triton" if a.device == "cuda" else "blockwise",
                             plain_attention="kernels", offload_between_updates=True)
        try:
            eng = DeepSpeedEngine(cfg)
        except Exception:  # noqa: BLE001
            crashed(rows, "DeepSpeedEngine (ZeRO-2) started")
            return rows
        vocab = SHAPES[a.shape]["vocab_size"]
        b = batch(vocab, a.rows, a.length)
        tokens = int(b["attention_mask"].sum())
        n_params = sum(t.numel() for _, t in eng.named_weights())
        rows.append(("model", f"{a.shape}: {n_params / 1e6:.1f}M parameters, {dtype}, "
                              f"batch {a.rows} x {a.length} tokens, device {a.device}", None))

        # 1. training speed and peak memory
        norm = float(b["response_mask"].sum())
        try:
            first = eng.train_minibatch([b], SftLoss(norm))["loss"]  # warm-up (Triton compiles)
            if a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(a.device)
            t0 = time.perf_counter()
            losses = [eng.train_minibatch([b], SftLoss(norm))["loss"] for _ in range(a.steps)]
            sync(a.device)
            step_s = (time.perf_counter() - t0) / a.steps
            rows.append(("train step (ZeRO-2, checkpointing)",
                         f"{step_s:.3f} s/step, {tokens / step_s:,.0f} tokens/s", None))
            rows.append(("training losses finite", f"{first:.4f} → {losses[-1]:.4f} over "
                         f"{a.steps + 1} steps", all(math.isfinite(x) for x in [first, *losses])))
            if a.device == "cuda":
                rows.append(("peak GPU memory (training)",
                             f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB of "
                             f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}", None))
        except Exception:  # noqa: BLE001
            crashed(rows, "training steps")

        # 2. bf16 numerics: our kernels in the learner vs transformers' sdpa on the same weights
        score_in = {k: v for k, v in b.items() if k != "response_mask"}
        plain_s = float("nan")
        try:
            sync(a.device)
            t0 = time.perf_counter()
            ours = eng.score(score_in, 1.0)["logprobs"]
            sync(a.device)
            plain_s = time.perf_counter() - t0
            state = {k: v.detach().clone() for k, v in eng.named_weights()}
            lps = {}
            for ref_dtype in (dtype, "float32"):
                ref = load_model(path, getattr(torch, ref_dtype))
                res = ref.load_state_dict(state, strict=False)
                tied = {"lm_head.weight"} if SHAPES[a.shape]["tie_word_embeddings"] else set()
                if res.unexpected_keys or set(res.missing_keys) - tied:
                    raise RuntimeError(f"weights do not fit the sdpa model: missing "
                                       f"{res.missing_keys}, unexpected {res.unexpected_keys}")
                ref.to(a.device).eval()
                with torch.no_grad():
                    logits = ref(input_ids=b["input_ids"].to(a.device),
                                 attention_mask=b["attention_mask"].to(a.device)).logits
                    lps[ref_dtype] = token_logprobs(logits, b["input_ids"].to(a.device), 1.0,
                                                    with_entropy=False)[0].float().cpu()
                del ref, logits
                if a.device == "cuda":
                    torch.cuda.empty_cache()
            del state
            diff = (ours - lps[dtype])[:, 1:].abs()
            mx, mean = float(diff.max()), float(diff.mean())
            rows.append(("logprobs, kernels vs sdpa: max |Δ|",
                         f"{mx:.3e} nats (want <= {T['logprob_max_abs']:g})",
                         mx <= T["logprob_max_abs"]))
            rows.append(("logprobs, kernels vs sdpa: mean |Δ|",
                         f"{mean:.3e} nats (want <= {T['logprob_mean_abs']:g})",
                         mean <= T["logprob_mean_abs"]))
            e_ours = (ours - lps["float32"])[:, 1:].abs()
            e_sdpa = (lps[dtype] - lps["float32"])[:, 1:].abs()
            tm, okm = within(float(e_ours.max()), float(e_sdpa.max()), T["logprob_factor"],
                             T["logprob_eps_max"])
            ta, oka = within(float(e_ours.mean()), float(e_sdpa.mean()), T["logprob_factor"],
                             T["logprob_eps_mean"])
            rows.append(("logprobs vs a float32 forward: max |Δ|", tm, okm))
            rows.append(("logprobs vs a float32 forward: mean |Δ|", ta, oka))
        except Exception:  # noqa: BLE001
            crashed(rows, "logprobs, kernels vs sdpa")

        # 3. the statistics pass inside the scoring forward
        try:
            request = {"waad_window": 10, "fai_band": [10, 100], "layers": "middle:5"}
            sync(a.device)
            t0 = time.perf_counter()
            out = eng.score({**score_in, "response_mask": b["response_mask"]}, 1.0, request)
            sync(a.device)
            stats_s = time.perf_counter() - t0
            n_layers = len(out["attn_stats"])
            rows.append(("scoring forward, plain / with statistics",
                         f"{plain_s:.3f} s / {stats_s:.3f} s; statistics of {n_layers} layers "
                         f"(want >= 1)", n_layers >= 1))
        except Exception:  # noqa: BLE001
            crashed(rows, "scoring forward with statistics")

        # 4. learner side of the bucketed transport
        try:
            transport = get_transport("buckets", bucket_bytes=a.bucket_mb << 20)
            t0 = time.perf_counter()
            named = list(eng.named_weights())
            payload = transport.pack(named)
            pack_s = time.perf_counter() - t0
            back = dict(transport.unpack(payload))
            exact = back.keys() == dict(named).keys() and all(torch.equal(back[n], t) for n, t in named)
            rows.append(("weights → bucket payload → weights",
                         f"{pack_s:.2f} s, {transport.payload_bytes(payload) / 2**20:,.0f} MiB in "
                         f"{len(payload['buckets'])} buckets; round trip exact: {exact} (want True)",
                         exact))
            del payload, back, named
        except Exception:  # noqa: BLE001
            crashed(rows, "bucketed weight transport")

        # 5. colocated mode: the optimizer state out of the way between updates
        try:
            digest = eng.optimizer_state_digest()
            before = gpu_bytes(a.device)
            moved = eng.offload()
            if not moved:
                raise RuntimeError("offload() moved nothing (offload_between_updates is on)")
            t0 = time.perf_counter()
            eng.reload()
            reload_s = time.perf_counter() - t0
            back_bytes = gpu_bytes(a.device)
            digest_after = eng.optimizer_state_digest()
            freed = moved.get("offload_freed_bytes", 0)
            want = T["offload_min_fraction"] * T["offload_bytes_per_param"] * n_params
            text = (f"{freed / 2**30:.3f} GiB of {before / 2**30:.2f} GiB allocated = "
                    f"{freed / max(n_params, 1):.2f} B/param (want >= {want / 2**30:.3f} GiB: "
                    f"{T['offload_min_fraction']:.0%} of {T['offload_bytes_per_param']} B x "
                    f"{n_params / 1e6:.1f}M); offload {moved['offload_s']:.2f} s, "
                    f"reload {reload_s:.2f} s, {back_bytes / 2**30:.2f} GiB after")
            rows.append(("offload between updates: freed",
                         text if a.device == "cuda" else "n/a on CPU (no device memory); " + text,
                         freed >= want if a.device == "cuda" else None))
            rows.append(("optimizer state after offload + reload",
                         f"Σ|exp_avg| {digest_after:.6g} vs {digest:.6g} before (want equal)",
                         digest_after == digest and digest > 0))
            after_loss = eng.train_minibatch([b], SftLoss(norm))["loss"]
            rows.append(("loss of the step after the reload", f"{after_loss:.4f} (want finite)",
                         math.isfinite(after_loss)))
        except Exception:  # noqa: BLE001
            crashed(rows, "offload / reload")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--part", default="all", choices=["attention", "learner", "all"])
    ap.add_argument("--shape", default="qwen3_0_6b", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=256)
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("CUDA not available (use --device cpu for a dry run)")
        return 2
    rc = 0
    if a.part in ("attention", "all"):
        t0 = time.perf_counter()
        rows = attention_rows(a.device)
        print(f"\n== attention numerics, bf16, against float64 ({time.perf_counter() - t0:.0f} s)")
        rc |= print_table(rows, "attention numerics")
    if a.part in ("learner", "all"):
        t0 = time.perf_counter()
        rows = learner_rows(a)
        print(f"\n== learner check ({time.perf_counter() - t0:.0f} s)")
        rc |= print_table(rows, "learner check")
    return rc


if __name__ == "__main__":
    sys.exit(main())
