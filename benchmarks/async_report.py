"""Synchronous vs asynchronous rollouts: held-out accuracy and wall time over seeds, and the
expected gain on separate hardware from the measured stage times (a model, labelled as such).

    python benchmarks/async_report.py outputs/async_rollouts --out benchmarks/results/async_rollouts

Reads `<root>/<arm>/seed<k>/{summary.json,metrics.jsonl}` (arms: `sync` = rollout.async_steps=0,
`async1` = 1) and writes `table.md` and `curves.png` under --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from runs import load, mean_metric, paired, plot_curves, pm

STAGES = ("rollout", "reward", "score", "update", "sync")


def median_metric(run: dict, key: str) -> float:
    xs = [m[key] for m in run["metrics"] if key in m and m.get("step", 0) > 1]
    return float(np.median(xs)) if xs else float("nan")


def overlap_model(sync_runs: dict) -> str:
    """Step time on paper when engines and learner have their own hardware (a GPU cluster): the
    synchronous step is the sum of its stages; with async_steps ≥ 1 generation runs beside
    scoring + update, so a step costs max(rollout, reward + score + update) + sync. Stage times
    are the synchronous arm's medians; the real gain also needs the stages not to slow each
    other down, which on one shared machine they do."""
    t = {s: np.mean([median_metric(r, f"time/{s}_s") for r in sync_runs.values()]) for s in STAGES}
    learner = t["reward"] + t["score"] + t["update"]
    sync_step = sum(t.values())
    async_step = max(t["rollout"], learner) + t["sync"]
    lines = ["| stage | median s (sync arm, mean over seeds) |", "|---|---|"]
    lines += [f"| {s} | {t[s]:.3f} |" for s in STAGES]
    lines += ["", f"Sum (synchronous step, separate hardware): {sync_step:.3f} s; overlapped: "
              f"max(rollout {t['rollout']:.3f}, reward + score + update {learner:.3f}) + sync "
              f"{t['sync']:.3f} = {async_step:.3f} s → **{sync_step / async_step:.2f}× "
              "faster (model, not measured)**."]
    return "\n".join(lines)


def table(runs: dict) -> str:
    arms = [a for a in ("sync", "async1") if a in runs]
    head = ["arm", "seeds", "final greedy", "Δ vs sync", "final sampled", "Δ vs sync",
            "median step s", "RL wall s (with evals)", "staleness", "IS-corrected tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        rs = runs[arm]
        seeds = sorted(rs)
        lines.append("| " + " | ".join([
            arm, ",".join(map(str, seeds)),
            pm([100 * rs[s]["summary"]["final_accuracy"] for s in seeds]),
            paired(runs, arm, "sync", "final_accuracy"),
            pm([100 * rs[s]["summary"]["final_accuracy_sampled"] for s in seeds]),
            paired(runs, arm, "sync", "final_accuracy_sampled"),
            pm([median_metric(rs[s], "time/step_s") for s in seeds], 3),
            pm([rs[s]["summary"]["rl_wall_s"] for s in seeds], 1),
            pm([mean_metric(rs[s], "rollout/staleness") for s in seeds], 2),
            pm([100 * mean_metric(rs[s], "train/is_corrected_frac") for s in seeds], 2) + " %"
            if any("train/is_corrected_frac" in m for s in seeds for m in rs[s]["metrics"]) else "—",
        ]) + " |")
    cold = runs[arms[0]][sorted(runs[arms[0]])[0]]["summary"]
    lines += ["", f"Cold start (shared): {100 * cold['cold_start_accuracy']:.1f} greedy / "
              f"{100 * cold['cold_start_accuracy_sampled']:.1f} sampled."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs = load(args.root)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    if "sync" in runs:
        text += "\n\n## Expected gain with separate hardware (model on paper)\n\n" + overlap_model(runs["sync"])
    (args.out / "table.md").write_text(text + "\n")
    plot_curves(runs, [a for a in ("sync", "async1") if a in runs],
                [("eval/accuracy", "held-out greedy (%)", 100.0),
                 ("eval/accuracy_sampled", "held-out sampled (%)", 100.0),
                 ("time/step_s", "step time (s)", 1.0)],
                args.out / "curves.png", "rollout.async_steps = 0 vs 1 (3 seeds)")
    print(text)


if __name__ == "__main__":
    main()
