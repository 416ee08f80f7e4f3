"""The whole loop at Qwen3-0.6B's shape on this machine: what each stage costs and holds.

A model with Qwen3-0.6B's exact architecture (rl/models/bpe_model.py REAL_SHAPE: 28 layers, head_dim
128, GQA 16/8, a 151,936-row tied embedding, byte-level BPE, ChatML template, two eos ids;
random weights) is given to `python -m launch.train` as `model.path`, the way a user's download
is, on the shipped GSM8K rows, with ≥ 256 new tokens, attention credit from our statistics
kernels (credit=coupled) and bucketed weight sync:

  run A: 3 RL steps uninterrupted, a checkpoint after step 2 (save_every=2) and after step 3;
  run B: a copy of A's folder up to its step-2 checkpoint, `resume=true` → step 3, which must
         equal A's step 3 on the exact-resume keys (tests/e2e/test_pipeline.py's).

Every process of each run is sampled (benchmarks/actor_memory.py) for its peak RSS. The report —
per-step stage times, sync bytes and time, the sampler/learner logprob gap, tokens/s, the
learner's peak and its live tensors per parameter (to set against the README's GPU memory
budget), per-actor peak RSS, checkpoint size — goes to benchmarks/results/real_shape/.

    .venv/bin/python benchmarks/real_shape.py [--max-new-tokens 256] [-- extra overrides]

Not in CI: it takes ~30 min on 2 cores and ~20 GB of RAM. Run it alone: its times are the
point. (`--small` runs the same script on rl/models/bpe_model.py's SMALL_SHAPE in ~3 min, to check
the script itself.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.actor_memory import Sampler, dir_bytes  # noqa: E402

GiB = 2**30
RESUME_KEYS = ("train/loss", "reward/total", "train/grad_norm", "rollout/response_len")
STAGES = [("rollout", "time/rollout_s"), ("reward", "time/reward_s"),
          ("score (logprobs + statistics)", "time/score_s"), ("of which statistics", "time/stats_s"),
          ("credit γ", "time/credit_s"), ("update", "time/update_s"),
          ("weight sync", "time/sync_s"), ("step", "time/step_s"), ("held-out eval", "time/eval_s")]


def overrides(model: Path, run_dir: Path, a) -> list[str]:
    """The run's settings are benchmarks/conf/experiment/real_shape.yaml; these add the paths
    and the command line's choices."""
    return ["--config-dir", str(ROOT / "benchmarks" / "conf"), "experiment=real_shape",
            f"output_dir={run_dir}", f"cache_dir={a.work / 'cache'}", f"model.path={model}",
            f"model.dtype={a.dtype}", f"rollout.max_new_tokens={a.max_new_tokens}",
            f"rollout.max_model_len={a.max_new_tokens + 768}", *a.extra]


def launch(cmd: list[str], log: Path, interval_s: float) -> tuple[int, float, dict, list]:
    """Run one trainer process; (exit code, wall seconds, {role: (peak RSS, peak USS) bytes},
    the sampled series {t, role: RSS bytes, "role uss": USS bytes})."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    with Sampler(proc.pid, interval_s, uss=True) as sampler:
        proc.wait()
    peaks = {r: (v, sampler.uss_peaks.get(r, 0)) for r, v in sampler.peaks.items()}
    return proc.returncode, time.perf_counter() - t0, peaks, sampler.series


def read_metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r for r in rows}


def resume_copy(src: Path, dst: Path, step: int) -> None:
    """`dst` as `src` stood when its step-`step` checkpoint was the latest."""
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(src / name, dst / name)
    name = f"step_{step:06d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


def fmt(v, digits=2) -> str:
    if v is None or v != v:
        return "—"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def report(a, spec, params: int, runs: dict, mA: dict, mB: dict, sA: dict, sB: dict,
           resume_ok: dict, ckpt_bytes: int) -> str:
    steps = [s for s in sorted(mA) if s > 0]
    L = [f"# The loop at Qwen3-0.6B's shape on CPU ({'SMALL_SHAPE check' if a.small else 'REAL_SHAPE'})",
         "", f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB, Linux "
         f"{platform.release()}, Python {platform.python_version()}. Date: "
         f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
         + (f"Ran alongside: {a.alongside}." if a.alongside else "Nothing else ran alongside."),
         "", f"Model: {params:,} parameters ({spec.num_hidden_layers} layers, hidden "
         f"{spec.hidden_size}, {spec.num_attention_heads}/{spec.num_key_value_heads} heads × "
         f"{spec.head_dim}, vocabulary {spec.vocab_size:,} rows for {spec.bpe_vocab:,} BPE tokens, "
         f"tied), {a.dtype}; the rest as benchmarks/conf/experiment/real_shape.yaml sets it (2 "
         f"prompts × 4 samples a step, credit=coupled, learner micro-batch 2 with gradient "
         f"checkpointing, weight_transport=buckets), max_new_tokens {a.max_new_tokens}.", "",
         "Command (run A): `" + " ".join(runs["A"]["cmd"][2:]) + "`", "",
         "## Per step (run A)", "",
         "| stage (s) | " + " | ".join(f"step {s}" for s in steps) + " |",
         "| --- | " + " | ".join("---:" for _ in steps) + " |"]
    for label, key in STAGES:
        L.append(f"| {label} | " + " | ".join(fmt(mA[s].get(key), 1) for s in steps) + " |")
    rows = [("response tokens (8 responses)", lambda m: m.get("rollout/response_len", 0) * 8, 0),
            ("truncated share", lambda m: m.get("rollout/truncated"), 2),
            ("rollout tokens/s", lambda m: m.get("rollout/tokens_per_s"), 1),
            ("step tokens/s", lambda m: m.get("perf/tokens_per_s"), 2),
            ("weight sync GiB", lambda m: m.get("sync/bytes", float("nan")) / GiB, 3),
            ("weight sync: gather / push / engine load s",
             lambda m: " / ".join(fmt(m.get(k), 1) for k in ("sync/gather_s", "sync/push_s",
                                                             "sync/engine_load_s")), None),
            ("logprob gap, sampler vs learner: mean", lambda m: m.get("rollout/logprob_gap"), 4),
            ("logprob gap: max", lambda m: m.get("rollout/logprob_gap_max"), 3),
            ("learner peak RSS so far, GiB (high-water mark, after the update)", lambda m: m.get("perf/learner_peak_gb"), 2),
            ("learner live tensors GiB", lambda m: m.get("perf/learner_tensor_gb"), 2),
            ("learner live tensors, bytes per parameter",
             lambda m: m.get("perf/learner_tensor_bytes_per_param"), 2)]
    for label, get, digits in rows:
        vals = [get(mA[s]) for s in steps]
        L.append(f"| {label} | " + " | ".join(v if isinstance(v, str) else fmt(v, digits)
                                               for v in vals) + " |")
    sumA, sumB = runs["A"]["summary"], runs["B"]["summary"]
    L += ["", "## Start-up, checkpoint, resume", "",
          "| | run A | run B (resume) |", "| --- | ---: | ---: |",
          f"| process wall s | {runs['A']['wall_s']:.0f} | {runs['B']['wall_s']:.0f} |",
          f"| actors start s (engines ∥ learner) | {fmt(sumA.get('actors_start_s'), 1)} | "
          f"{fmt(sumB.get('actors_start_s'), 1)} |",
          f"| cold start s (none: the checkpoint is where RL starts) | {fmt(sumA.get('cold_start_s'), 2)} | "
          f"{fmt(sumB.get('cold_start_s'), 2)} |",
          f"| held-out eval before RL s | {fmt(mA[0].get('time/eval_s'), 1)} | (restored) |",
          f"| last checkpoint save s | {fmt(sumA.get('last_save_s'), 1)} | {fmt(sumB.get('last_save_s'), 1)} |",
          f"| checkpoint on disk GiB (DeepSpeed state + HF export) | {ckpt_bytes / GiB:.2f} | |",
          "", "Step 3 after resume against run A's uninterrupted step 3 (rel 1e-5, abs 1e-7):", "",
          "| key | run A | run B | equal |", "| --- | ---: | ---: | :---: |"]
    for k, (x, y, ok) in resume_ok.items():
        L.append(f"| {k} | {x:.7g} | {y:.7g} | {'yes' if ok else 'NO'} |")
    peak = {r: max(sA.get(r, (0, 0))[0], sB.get(r, (0, 0))[0]) for r in set(sA) | set(sB)}
    roles = sorted(peak, key=lambda r: (-peak[r], r))
    L += ["", "## Peak memory per process (GiB). RSS counts shared pages (Ray's object store, "
          "libraries), so a sum overstates; USS counts the pages only that process maps", "",
          "| process | run A RSS | run A USS | run B RSS | run B USS |",
          "| --- | ---: | ---: | ---: | ---: |"]
    small = [r for r in roles if peak[r] < 0.2 * GiB]
    for r in roles:
        if r not in small:
            (ra, ua), (rb, ub) = sA.get(r, (0, 0)), sB.get(r, (0, 0))
            L.append(f"| {r} | {ra / GiB:.2f} | {ua / GiB:.2f} | {rb / GiB:.2f} | {ub / GiB:.2f} |")
    if small:
        L.append(f"| {len(small)} more (Ray's daemons, idle workers), each RSS under 0.2 | | | | |")
    return "\n".join(L) + "\n"


def plot_memory(runs: dict, path: Path) -> None:
    """RSS (solid) and USS (dashed) of the learner, the engine and the driver over each run,
    so where memory goes — the update's peak, a sync, a checkpoint — can be seen, not read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.6), sharey=True)
    for ax, (name, run) in zip(axes, runs.items()):
        series = run["rss_series"]
        t0 = series[0]["t"] if series else 0.0
        for role, colour in (("learner0", "C0"), ("engine0", "C1"), ("driver", "C2")):
            t = [(r["t"] - t0) / 60 for r in series if role in r]
            ax.plot(t, [r[role] / GiB for r in series if role in r], colour, label=f"{role} RSS")
            ax.plot([(r["t"] - t0) / 60 for r in series if f"{role} uss" in r],
                    [r[f"{role} uss"] / GiB for r in series if f"{role} uss" in r], colour + "--",
                    label=f"{role} USS")
        ax.set_title(f"run {name}" + (" (resumed at step 2)" if name == "B" else ""))
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GiB")
    axes[-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "real_shape")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_shape")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--small", action="store_true", help="SMALL_SHAPE (checks the script)")
    ap.add_argument("--alongside", default="", help="what shared the machine, for the report")
    ap.add_argument("--interval", type=float, default=2.0, help="RSS sampling period, s")
    ap.add_argument("extra", nargs="*", help="Hydra overrides for both runs (after --)")
    a = ap.parse_args(argv)
    from rl.models.bpe_model import REAL_SHAPE, SMALL_SHAPE, build_bpe_model

    spec = SMALL_SHAPE if a.small else REAL_SHAPE
    a.work = a.work.resolve()
    model = a.work / ("model_small" if a.small else "model")
    if not (model / "config.json").exists():
        t0 = time.perf_counter()
        build_bpe_model(model, spec)
        print(f"real_shape: built {model} in {time.perf_counter() - t0:.0f} s", flush=True)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the parameter count, without the weights
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model)).parameters())

    runs = {}
    for name in ("A", "B"):
        run_dir = a.work / f"run_{name}"
        if name == "A":
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            resume_copy(a.work / "run_A", run_dir, 2)
        cmd = [sys.executable, "-m", "launch.train", *overrides(model, run_dir, a),
               *(["resume=true"] if name == "B" else [])]
        print(f"real_shape: run {name}: {' '.join(cmd[2:])}", flush=True)
        rc, wall, peaks, series = launch(cmd, a.work / f"run_{name}.log", a.interval)
        if rc != 0:
            print(f"real_shape: run {name} exited {rc}; see {a.work / f'run_{name}.log'}")
            return rc
        runs[name] = {"cmd": cmd, "wall_s": wall, "peaks": peaks, "rss_series": series,
                      "summary": json.loads((run_dir / "summary.json").read_text())}
        print(f"real_shape: run {name} done in {wall:.0f} s", flush=True)

    mA, mB = read_metrics(a.work / "run_A"), read_metrics(a.work / "run_B")
    resume_ok = {}
    for k in RESUME_KEYS:
        x, y = mA[3][k], mB[3][k]
        resume_ok[k] = (x, y, abs(x - y) <= 1e-7 + 1e-5 * abs(x))
    ckpt = dir_bytes(a.work / "run_A" / "checkpoints" / "step_000003")
    text = report(a, spec, params, runs, mA, mB, runs["A"]["peaks"], runs["B"]["peaks"],
                  resume_ok, ckpt)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "small" if a.small else "real_shape"
    (a.out / f"{stem}.md").write_text(text)
    (a.out / f"{stem}.json").write_text(json.dumps(
        {"params": params, "runs": {k: {**v, "cmd": v["cmd"][2:]} for k, v in runs.items()},
         "metrics_A": mA, "metrics_B": mB, "resume": resume_ok, "checkpoint_bytes": ckpt},
        indent=1, default=str))
    plot_memory(runs, a.out / f"{stem}_memory.png")
    print(text)
    return 0 if all(ok for *_, ok in resume_ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
