"""Soak test: does a long run hold steady? Memory and open files of every process, and the
disk use of output_dir, every --every steps of a real training run, with their slopes after a
warm-up.

    python benchmarks/soak.py                               # 500 steps of the default run
    python benchmarks/soak.py --resume                      # continue a run killed part-way
    python benchmarks/soak.py --steps 6 --every 2 --warmup 2 --out /tmp/soak -- eval_every=3

It runs `python -m launch.train output_dir=<run-dir> steps=<steps> [overrides]` as a
subprocess, unchanged otherwise: the default eval_every / save_every / keep_last and the W&B
logger (offline here) are what a real run does (evals, checkpoints written and rotated, W&B
files growing), which is where a leak would come from. A
sampler thread (benchmarks/actor_memory.py) reads the process tree every --interval seconds for
per-role peaks; each time metrics.jsonl (rl/loop/tracking.py, one row per step) reaches a multiple
of --every, one sample row is recorded: RSS (and with --uss, USS) per role, open fds per role,
bytes under output_dir, checkpoint folders.

Writes <out>/<name>.md (tables, machine, command, slopes) and <out>/<name>.json (raw samples)
after every sample, so a run killed at a session end keeps what it measured; `--resume` then
restarts the trainer with resume=true (from its last checkpoint) and appends to the same json.
A resumed run is new processes: its samples get a new `segment`, slopes are fitted within
segments (one intercept each), and warm-up counts from each segment's first step.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from actor_memory import Sampler, dir_bytes  # noqa: E402

MiB = 2 ** 20
STEP_DIR = re.compile(r"^step_(\d{6})$")  # rl/loop/checkpoint.py
# Roles shown in their own columns (with their index); everything else (Ray's dashboard,
# agents, monitors, idle workers, the multiprocessing tracker) is summed into `other`.
MAIN_KINDS = ("driver", "engine", "learner", "teacher", "reward_worker", "raylet", "gcs_server")


# --- pure helpers (tests/unit/test_actor_memory.py) ------------------------------------------
def slope(xs: list[float], ys: list[float], groups: list | None = None) -> float:
    """Least-squares slope of ys on xs; with `groups`, one intercept per group (x and y centred
    within each group), so a restart's drop in level does not read as a trend. NaN when x does
    not vary."""
    groups = groups if groups is not None else [0] * len(xs)
    mean = {}
    for g in set(groups):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        mean[g] = (sum(xs[i] for i in idx) / len(idx), sum(ys[i] for i in idx) / len(idx))
    dx = [x - mean[g][0] for x, g in zip(xs, groups)]
    dy = [y - mean[g][1] for y, g in zip(ys, groups)]
    sxx = sum(d * d for d in dx)
    return sum(a * b for a, b in zip(dx, dy)) / sxx if sxx > 0 else float("nan")


def growth(ys: list[float], groups: list) -> float:
    """Last minus first value, summed over groups (segments): what each set of processes grew
    by while it lived, not the drop a restart makes."""
    first, last = {}, {}
    for y, g in zip(ys, groups):
        first.setdefault(g, y)
        last[g] = y
    return float(sum(last[g] - first[g] for g in first))


def role_order(role: str) -> tuple:
    """driver, engines, learners, ... in MAIN_KINDS order, then the rest by name; index numeric."""
    m = re.match(r"^(.*?)(\d*)$", role)
    kind, idx = m.group(1), int(m.group(2)) if m.group(2) else -1
    rank = MAIN_KINDS.index(kind) if kind in MAIN_KINDS else len(MAIN_KINDS)
    return rank, kind, idx


def is_main(role: str) -> bool:
    return role_order(role)[0] < len(MAIN_KINDS)


def last_step(metrics: Path, since: float = 0.0) -> int | None:
    """The highest "step" in the last rows of metrics.jsonl (its tail only: the file grows by
    a row a step, and a half-written last line is skipped). None until the file was written
    at or after `since`: a resumed trainer first drops the rows after its checkpoint, and the
    old rows must not count as reached."""
    try:
        if os.stat(metrics).st_mtime < since:
            return None
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    steps = []
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return max(steps) if steps else None


def checkpoint_dirs(run_dir: Path) -> list[str]:
    d = run_dir / "checkpoints"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def latest_checkpoint_step(run_dir: Path) -> int:
    steps = [int(m.group(1)) for n in checkpoint_dirs(run_dir) if (m := STEP_DIR.match(n))
             and (run_dir / "checkpoints" / n / "trainer_state.json").exists()]
    return max(steps, default=0)


# --- measuring --------------------------------------------------------------------------------
def wait_checkpoint_written(run_dir: Path, timeout_s: float = 120.0) -> None:
    """The step's metrics row is logged before its checkpoint is saved (rl/loop/trainer.py): wait
    for the `.tmp-step_*` folder to be renamed, so disk use is read between saves, not mid-save."""
    end = time.time() + timeout_s
    while time.time() < end and any(n.startswith(".tmp-") for n in checkpoint_dirs(run_dir)):
        time.sleep(0.5)


def take_sample(sampler: Sampler, run_dir: Path, step: int, segment: int, t0: float) -> dict:
    """Processes first, the moment the step's row shows (after the last step the trainer
    saves, evaluates and stops its actors within seconds), then the disk once the save is done."""
    records = sampler.sample()
    wait_checkpoint_written(run_dir)
    row = {"step": step, "segment": segment, "time": dt.datetime.now().isoformat(timespec="seconds"),
           "elapsed_s": round(time.time() - t0, 1),
           "rss_mib": {r["role"]: round(r["rss_bytes"] / MiB, 1) for r in records},
           "fds": {r["role"]: r["num_fds"] for r in records},
           "pids": {r["role"]: r["pid"] for r in records},
           "disk_bytes": dir_bytes(run_dir),
           "checkpoints": len(checkpoint_dirs(run_dir))}
    if sampler.uss:
        row["uss_mib"] = {r["role"]: round(r["uss_bytes"] / MiB, 1) for r in records}
    return row


# --- reporting --------------------------------------------------------------------------------
def series(samples: list[dict]) -> dict[str, tuple[str, list]]:
    """name → (unit, one value per sample; None where the role was absent)."""
    roles = sorted({r for s in samples for r in s["rss_mib"] if is_main(r)}, key=role_order)
    out = {}
    for key, label, unit in (("rss_mib", "RSS", "MiB"), ("uss_mib", "USS", "MiB"), ("fds", "fds", "fds")):
        if not any(key in s for s in samples):
            continue
        for r in roles:
            out[f"{label} {r}"] = unit, [s.get(key, {}).get(r) for s in samples]
        out[f"{label} other"] = unit, [sum(v for k, v in s.get(key, {}).items() if not is_main(k))
                                       for s in samples]
        out[f"{label} total"] = unit, [sum(s.get(key, {}).values()) for s in samples]
    out["output_dir"] = "MiB", [s["disk_bytes"] / MiB for s in samples]
    out["checkpoints"] = "folders", [s["checkpoints"] for s in samples]
    return out


def fmt(v, digits: int = 1) -> str:
    if v is None or v != v:
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(samples: list[dict], names: list[str], ser: dict, segmented: bool) -> list[str]:
    head = ["step"] + (["seg"] if segmented else []) + [n.split(" ", 1)[-1] for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, s in enumerate(samples):
        cells = [str(s["step"])] + ([str(s["segment"])] if segmented else [])
        lines.append("| " + " | ".join(cells + [fmt(ser[n][1][i]) for n in names]) + " |")
    return lines


def trend_rows(samples: list[dict], ser: dict, warmup: int, starts: dict[int, int]) -> list[str]:
    keep = [i for i, s in enumerate(samples) if s["step"] - starts.get(s["segment"], 0) >= warmup]
    lines = ["| series | unit | slope per 100 steps | growth after warm-up | samples |",
             "|---|---|---:|---:|---:|"]
    for name, (unit, vals) in ser.items():
        idx = [i for i in keep if vals[i] is not None]
        if len(idx) < 2:
            lines.append(f"| {name} | {unit} | — | — | {len(idx)} |")
            continue
        segs = [samples[i]["segment"] for i in idx]
        b = slope([samples[i]["step"] for i in idx], [vals[i] for i in idx], segs)
        lines.append(f"| {name} | {unit} | {fmt(100 * b, 2)} | {fmt(growth([vals[i] for i in idx], segs))}"
                     f" | {len(idx)} |")
    return lines


def write_report(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    samples, a = data["samples"], data["args"]
    if not samples:
        return
    ser = series(samples)
    segmented = len({s["segment"] for s in samples}) > 1
    starts = {int(k): v for k, v in data["segment_start_step"].items()}
    pick = lambda label: [n for n in ser if n.startswith(label + " ")]  # noqa: E731
    m = data["machine"]
    md = [f"# Soak: {name}", "",
          f"{dt.date.today().isoformat()} — {m['cpus']} CPUs, {m['ram_gib']:.0f} GiB RAM, "
          f"Linux {m['kernel']}, Python {m['python']}", "",
          "```", "python " + " ".join(shlex.quote(x) for x in data["soak_argv"]),
          "# segment commands:", *data["commands"], "```", "",
          f"A sample every {a['every']} steps; slopes are least-squares over the samples from "
          f"{a['warmup']} steps after each segment's start on (per-segment intercepts). RSS "
          "includes shared pages (Ray's object store, libraries): USS is the leak signal. "
          "`other`: Ray's dashboard, agents, monitors, idle workers. "
          + (f"Segments started at steps {starts} (each one a fresh set of processes)."
             if segmented else ""), "",
          "## Trends", "",
          "Growth: last minus first sample after warm-up, within each segment, summed.", "",
          *trend_rows(samples, ser, a["warmup"], starts), "",
          "## RSS (MiB) and output_dir", "",
          *table(samples, pick("RSS") + ["output_dir", "checkpoints"], ser, segmented), ""]
    if "USS" in {n.split(" ")[0] for n in ser}:
        md += ["## USS (MiB)", "", *table(samples, pick("USS"), ser, segmented), ""]
    md += ["## Open files (fds)", "", *table(samples, pick("fds"), ser, segmented), "",
           "## Peak RSS (MiB)", "",
           f"Sampled every {a['interval']} s over the whole run, cold start and start-up "
           "included (a role's peak may be an earlier process of that role).", "",
           "| role | peak |", "|---|---:|",
           *[f"| {r} | {v / MiB:.1f} |" for r, v in sorted(data["peaks"].items(),
                                                           key=lambda kv: role_order(kv[0]))], ""]
    (out / f"{name}.md").write_text("\n".join(md))


# --- driving the run --------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--every", type=int, default=50, help="steps between samples")
    p.add_argument("--warmup", type=int, default=100, help="steps left out of the slopes")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/soak",
                   help="where <name>.md and <name>.json go")
    p.add_argument("--name", default="default")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="the run's output_dir (default: outputs/soak/<name>)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between peak samples")
    p.add_argument("--uss", action="store_true",
                   help="also USS per process (reads /proc/<pid>/smaps: slower on big processes)")
    p.add_argument("--resume", action="store_true",
                   help="restart the trainer with resume=true and append to <name>.json")
    args = p.parse_args(argv)
    if any(x.split("=", 1)[0].lstrip("+") in ("output_dir", "steps", "resume") for x in extra):
        p.error("output_dir, steps and resume are set by --run-dir, --steps, --resume")
    return args, extra


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    run_dir = (args.run_dir or ROOT / "outputs/soak" / args.name).resolve()
    json_path = args.out / f"{args.name}.json"
    if not args.resume and run_dir.exists():
        sys.exit(f"{run_dir} exists: pass --resume to continue it, or remove it")
    if args.resume and json_path.exists():  # (absent if a kill came before the first sample)
        data = json.loads(json_path.read_text())
        segment = max((s["segment"] for s in data["samples"]), default=-1) + 1
    else:
        data = {"samples": [], "peaks": {}, "commands": [], "segment_start_step": {}}
        segment = 0
    start = latest_checkpoint_step(run_dir) if args.resume else 0
    cmd = [sys.executable, "-m", "launch.train", f"output_dir={run_dir}", f"steps={args.steps}",
           *extra] + (["resume=true"] if args.resume else [])
    vm = psutil.virtual_memory()
    data.update(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                soak_argv=[os.path.relpath(__file__, ROOT), *argv],
                machine={"cpus": os.cpu_count(), "ram_gib": vm.total / 2 ** 30,
                         "kernel": platform.release(), "python": platform.python_version()})
    data["commands"].append(" ".join(shlex.quote(str(x)) for x in cmd))
    data["segment_start_step"][str(segment)] = start

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"  # beside output_dir, not counted in it
    print(f"soak: {data['commands'][-1]}\n      log: {log_path}", flush=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    # A SIGTERM to us (a session's end) goes to the trainer, which checkpoints and exits.
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    sampler = Sampler(proc.pid, args.interval, args.uss).start()
    peaks, metrics = data["peaks"], run_dir / "metrics.jsonl"
    target = 0 if start == 0 else (start // args.every + 1) * args.every
    try:
        while True:
            done = proc.poll() is not None
            step = last_step(metrics, since=t0)
            if not done and step is not None and step >= target:
                row = take_sample(sampler, run_dir, step, segment, t0)
                data["samples"].append(row)
                for r, v in sampler.peaks.items():
                    peaks[r] = max(peaks.get(r, 0), v)
                write_report(args.out, args.name, data)
                print(f"soak: step {step}: " + ", ".join(
                    f"{r} {v:.0f}" for r, v in sorted(row["rss_mib"].items(),
                                                      key=lambda kv: role_order(kv[0]))
                    if is_main(r)) + f" MiB; output_dir {row['disk_bytes'] / MiB:.1f} MiB",
                    flush=True)
                target = (step // args.every + 1) * args.every
            if done:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:  # the trainer got the same SIGINT: it checkpoints and stops
        proc.wait()
    finally:
        sampler.stop()
        for r, v in sampler.peaks.items():
            peaks[r] = max(peaks.get(r, 0), v)
        write_report(args.out, args.name, data)
    print(f"soak: trainer exited {proc.returncode}; report {args.out / args.name}.md", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
