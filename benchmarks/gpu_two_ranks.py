"""Two learner ranks on ONE GPU, as a node with two ranks gives them: each process sees only
that GPU (CUDA_VISIBLE_DEVICES=0 for both) and the second has LOCAL_RANK=1, its position on the
node, as torchrun sets it (and as a Ray rank could carry it). DeepSpeed 0.19.8's
`init_distributed` passes `device_id=cuda:$LOCAL_RANK` to `init_process_group` when the world
has more than one rank, so without rl/engine/deepspeed_engine.py binding each rank to the first
GPU it sees, rank 1 asks for a device it does not have and never starts.

Each rank builds `rl.engine.deepspeed_engine.DeepSpeedEngine` on a tiny random Qwen3, takes one
data-parallel training step on its own micro-batch, then scores one probe batch. Judged
(thresholds: THRESHOLDS in benchmarks/gpu_learner_check.py):
  - both ranks finish the step, each on the device it sees (cuda:0 on a GPU);
  - as data parallelism must: the two ranks report the same global gradient norm and hold the
    same weights after the step (the same probe logprobs); the ranks' losses (each over the
    global token count) add up to the loss of one process over both micro-batches, and the
    global gradient norm is that one process's.

Backend: gloo, ZeRO-0. NCCL refuses two ranks on one GPU ("Duplicate GPU detected"); gloo runs
all_reduce and broadcast on CUDA tensors (through host memory), not all_gather or
reduce_scatter, and ZeRO-0 needs no more: the weights are broadcast at start and the gradients
all-reduced (ZeRO-1/2 would partition and all-gather). bf16, as the learner trains: with ZeRO-0
DeepSpeed then wraps AdamW in its DDP-style FP16_UnfusedOptimizer (fp32 master weights, whole on
each rank), which reports the global gradient norm (the fp32 ZeRO-0 path reports none).

    python benchmarks/gpu_two_ranks.py                 # one GPU (gpu_check.sh runs it)
    python benchmarks/gpu_two_ranks.py --device cpu    # the same on CPU, gloo (dry run)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ROWS, LENGTH = 2, 48  # per rank


def micro_batch(vocab: int, seed: int):
    from gpu_learner_check import batch

    return batch(vocab, ROWS, LENGTH, seed=seed)


def worker(args) -> int:
    """One rank: its environment (RANK, LOCAL_RANK, ...) was set by the parent."""
    import torch

    from gpu_learner_check import SHAPES
    from rl.engine.deepspeed_engine import DeepSpeedEngine, DSEngineConfig
    from rl.algorithms.losses import SftLoss

    rank = int(os.environ["RANK"])
    seen = {"local_rank_given": os.environ["LOCAL_RANK"],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "devices_seen": torch.cuda.device_count() if args.device == "cuda" else 0}
    cfg = DSEngineConfig(args.model, lr=1e-3, zero_stage=0, backend="gloo", micro_batch_size=ROWS,
                         dtype="bfloat16", seed=0, collective_timeout_s=120.0)
    eng = DeepSpeedEngine(cfg)
    vocab = SHAPES["tiny"]["vocab_size"]
    mine = micro_batch(vocab, seed=1 + rank)  # data parallelism: each rank its own rows
    normaliser = float(sum(micro_batch(vocab, seed=1 + r)["response_mask"].sum() for r in (0, 1)))
    out = eng.train_minibatch([mine], SftLoss(normaliser))
    probe = {k: v for k, v in micro_batch(vocab, seed=99).items() if k != "response_mask"}
    lp = eng.score(probe, 1.0)["logprobs"]
    result = {"rank": rank, **seen, "device": str(eng.device),
              "local_rank_after": os.environ.get("LOCAL_RANK"),
              "node_local_rank": os.environ.get("NODE_LOCAL_RANK"),
              "loss": out["loss"], "grad_norm": out["grad_norm"], "skipped": out["skipped"],
              "probe_logprobs": lp.tolist()}
    if rank == 0:
        result["single_process"] = single_process(args.model, str(eng.device), vocab, normaliser)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


def single_process(model_path: str, device: str, vocab: int, normaliser: float) -> dict:
    """One process over both ranks' micro-batches, the same weights (the saved folder, as every
    rank loaded them) and loss: the loss and gradient norm data parallelism must reproduce."""
    import torch

    from rl.algorithms.losses import sft_loss
    from rl.engine.deepspeed_engine import token_logprobs
    from rl.engine.frozen import load_model

    model = load_model(model_path, torch.bfloat16).to(device).train()
    both = [micro_batch(vocab, seed=1 + r) for r in (0, 1)]
    b = {k: torch.cat([x[k] for x in both]).to(device) for k in both[0]}
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   use_cache=False).logits
    lp, _ = token_logprobs(logits, b["input_ids"], 1.0, with_entropy=False)
    loss = sft_loss(lp, b["response_mask"], normaliser)
    loss.backward()
    sq = sum(float(p.grad.float().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return {"loss": float(loss), "grad_norm": math.sqrt(sq)}


def judge(results: list[dict], device: str) -> list[tuple[str, str, bool]]:
    from gpu_learner_check import THRESHOLDS as T

    r0, r1 = results
    rows = []
    for r in results:
        ok = r["device"] == "cuda:0" if device == "cuda" else r["device"] == "cpu"
        rows.append((f"rank {r['rank']} (LOCAL_RANK={r['local_rank_given']}) stepped on",
                     f"{r['device']} (sees {r['devices_seen']} GPU(s), CUDA_VISIBLE_DEVICES="
                     f"{r['cuda_visible_devices']}; NODE_LOCAL_RANK {r['node_local_rank']}); "
                     f"want {'cuda:0' if device == 'cuda' else 'cpu'}", ok))
        rows.append((f"rank {r['rank']} step not skipped, loss finite",
                     f"loss {r['loss']:.5f}, skipped {r['skipped']}",
                     r["skipped"] == 0.0 and math.isfinite(r["loss"])))
    g0, g1 = r0["grad_norm"], r1["grad_norm"]
    rel = abs(g0 - g1) / max(abs(g0), 1e-30)
    rows.append(("global grad norm, rank 0 vs rank 1",
                 f"{g0:.6g} vs {g1:.6g}: rel Δ {rel:.2e} (want <= {T['ranks_grad_norm_rtol']:g})",
                 rel <= T["ranks_grad_norm_rtol"]))
    d = max(abs(a - b) for ra, rb in zip(r0["probe_logprobs"], r1["probe_logprobs"])
            for a, b in zip(ra, rb))
    rows.append(("weights after the step, rank 0 vs rank 1",
                 f"probe logprobs max |Δ| {d:.2e} (want <= {T['ranks_logprob_atol']:g})",
                 d <= T["ranks_logprob_atol"]))
    one = r0["single_process"]
    ls = r0["loss"] + r1["loss"]
    rel = abs(ls - one["loss"]) / abs(one["loss"])
    rows.append(("Σ rank losses vs one process on both batches",
                 f"{ls:.5f} vs {one['loss']:.5f}: rel Δ {rel:.2e} "
                 f"(want <= {T['dp_loss_rtol']:g})", rel <= T["dp_loss_rtol"]))
    rel = abs(g0 - one["grad_norm"]) / one["grad_norm"]
    rows.append(("global grad norm vs one process",
                 f"{g0:.5g} vs {one['grad_norm']:.5g}: rel Δ {rel:.2e} "
                 f"(want <= {T['dp_grad_norm_rtol']:g})", rel <= T["dp_grad_norm_rtol"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--timeout", type=float, default=150.0,
                    help="seconds this script may take in all (the ranks are stopped then)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    deadline = time.monotonic() + args.timeout - 3  # time left to read and judge what came back

    import torch

    from gpu_learner_check import build, free_port, print_table

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA not available (use --device cpu for the dry run)")
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build("tiny", torch.bfloat16, Path(tmp) / "model")
        port = str(free_port())
        procs, logs = [], []
        for rank in (0, 1):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            env.pop("NODE_LOCAL_RANK", None)
            if args.device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = "0"  # both ranks see the one GPU, as device 0
            else:
                env["CUDA_VISIBLE_DEVICES"] = ""
            log = open(Path(tmp) / f"rank{rank}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", "--device", args.device, "--model", model,
                 "--out", tmp], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):  # a rank died: its peer waits in
                deadline = min(deadline, time.monotonic() + 5)  # a collective; not for long
            time.sleep(0.2)
        rcs = [p.poll() for p in procs]  # None: still running at the deadline
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        results = []
        for rank, rc in enumerate(rcs):
            path = Path(tmp) / f"rank{rank}.json"
            if rc == 0 and path.exists():
                results.append(json.loads(path.read_text()))
            else:
                text = (Path(tmp) / f"rank{rank}.log").read_text(errors="replace")
                why = "timed out" if rc is None else f"exit status {rc}"
                print(f"--- rank {rank} ({why}), last lines of its output:")
                print("\n".join(text.splitlines()[-25:]))
        rows = [(f"rank {r} finished a training step", "yes" if rc == 0 else
                 ("no: timed out" if rc is None else f"no: exit status {rc}"), rc == 0)
                for r, rc in enumerate(rcs)]
        if len(results) == 2:
            rows += judge(results, args.device)
    print(f"\n== two ranks on one {'GPU' if args.device == 'cuda' else 'CPU'} "
          f"(gloo, ZeRO-0, bf16; {time.perf_counter() - t0:.0f} s)")
    return print_table(rows, "two ranks")


if __name__ == "__main__":
    sys.exit(main())
