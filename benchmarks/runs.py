"""Reading a sweep's runs and summarising them over seeds (shared by the report scripts).

A sweep writes `<root>/<arm>/seed<k>/{summary.json,metrics.jsonl,config.yaml}` (the trainer's
outputs). `load` returns {arm: {seed: {"summary", "metrics", "dir"}}}.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load(root: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for f in sorted(Path(root).glob("*/seed*/summary.json")):
        m = f.parent / "metrics.jsonl"
        run = {"summary": json.loads(f.read_text()), "dir": f.parent,
               "metrics": [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
               if m.exists() else []}
        runs.setdefault(f.parent.parent.name, {})[int(f.parent.name[4:])] = run
    return runs


def pm(xs, digits: int = 1) -> str:
    """mean ± sample std (NaNs dropped; one value: ± 0)."""
    xs = [x for x in xs if x == x]
    if not xs:
        return "—"
    mu, sd = np.mean(xs), (np.std(xs, ddof=1) if len(xs) > 1 else 0.0)
    if abs(mu) >= 1e4:  # ratios that blow up (an attention mass near 0): 3 significant digits
        return f"{mu:.3g} ± {sd if sd > 1e-6 * abs(mu) else 0:.2g}"
    return f"{mu:.{digits}f} ± {sd:.{digits}f}"


def paired(runs, arm, base, key, scale: float = 100.0) -> str:
    """arm − base on summary[key], paired by seed: mean ± std of the differences."""
    seeds = sorted(set(runs[arm]) & set(runs.get(base, {})))
    if arm == base or not seeds:
        return "—"
    d = [scale * (runs[arm][s]["summary"][key] - runs[base][s]["summary"][key]) for s in seeds]
    return f"{np.mean(d):+.1f} ± {np.std(d, ddof=1) if len(d) > 1 else 0.0:.1f}"


def mean_metric(run: dict, key: str) -> float:
    """A per-step metric averaged over the run's steps (NaN if never logged)."""
    xs = [m[key] for m in run["metrics"] if key in m and m.get("step", 0) > 0]
    return float(np.nanmean(xs)) if xs else float("nan")


def curve(run: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(m["step"], m[key]) for m in run["metrics"] if key in m]
    steps, vals = zip(*pts) if pts else ((), ())
    return np.array(steps), np.array(vals, dtype=float)


def plot_curves(runs: dict, arms: list[str], panels: list[tuple[str, str, float]], path: Path,
                title: str) -> None:
    """One panel per (metric key, label, scale): each arm's mean over seeds ± std by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.3), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for arm in arms:
            curves = [curve(r, key) for r in runs[arm].values()]
            n = min(len(c[0]) for c in curves)
            if n == 0:
                continue
            ys = scale * np.stack([c[1][:n] for c in curves])
            mu, sd = ys.mean(0), ys.std(0)
            ax.plot(curves[0][0][:n], mu, marker="o", ms=3, label=f"{arm} (n={len(curves)})")
            ax.fill_between(curves[0][0][:n], mu - sd, mu + sd, alpha=0.12)
        lo, hi = ax.dataLim.y0, ax.dataLim.y1
        if lo > 0 and hi / lo > 1e3:  # values over orders of magnitude: a log axis
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
