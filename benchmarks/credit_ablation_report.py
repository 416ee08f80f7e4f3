"""Turn the credit-ablation runs into a table (held-out accuracy, mean ± std over seeds) and a
learning-curve plot.

Δ columns: the final evaluation, and the mean of the last two evaluations (a single held-out
evaluation of a few hundred problems moves by ±2 points between neighbouring checkpoints).

    python benchmarks/credit_ablation_report.py outputs/credit_ablation/arith \
        --out benchmarks/results/credit_ablation_arith

Reads `<root>/<credit>/seed<k>/metrics.jsonl` (written by the trainer) and writes
`table.md` and `curves.png` under --out. Final = the last eval of the run; peak = the best eval
(the paper reports smoothed peaks, so both are shown). The training rollouts' accuracy over the
last 10 steps (a column, and a third panel as a 10-step moving mean) is a denser signal than a
few held-out evaluations: every step samples fresh responses to prompts that are the same for
every arm. Δ columns are against `none`, paired by seed (same cold start, same prompts, same
sampling seeds up to the credit method).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ORDER = ["none", "random", "entropy", "local_chunk", "global_anchor", "coupled", "coupled_bottom",
         "attention_entropy", "mc"]
METRICS = (("eval/accuracy", "greedy"), ("eval/accuracy_sampled", "sampled"))
ROLLOUT = "rollout/accuracy"


def load_runs(root: Path) -> dict[str, dict[int, list[dict]]]:
    runs: dict[str, dict[int, list[dict]]] = {}
    for f in sorted(root.glob("*/seed*/metrics.jsonl")):
        if not (f.parent / "summary.json").exists():
            print(f"skipping {f.parent}: not finished (no summary.json)")
            continue
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        runs.setdefault(f.parent.parent.name, {})[int(f.parent.name[4:])] = rows
    return runs


def evals(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    steps, vals = zip(*pts) if pts else ((), ())
    return np.array(steps), 100 * np.array(vals)


def mean_of(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r and r.get("step", 0) > 0]
    return float(np.mean(vals)) if vals else float("nan")


def last_steps(rows: list[dict], key: str, n: int = 10) -> float:
    """Mean of `key` over the last n training steps, in percent."""
    vals = [r[key] for r in rows if key in r]
    return 100 * float(np.mean(vals[-n:])) if vals else float("nan")


def moving_mean(x: np.ndarray, n: int = 10) -> np.ndarray:
    return np.array([x[max(0, i - n + 1): i + 1].mean() for i in range(len(x))])


def seed_curves(seed_rows: dict[int, list[dict]], key: str, transform=None):
    """One arm's curves of `key`, cut to the shortest seed: (steps, [seeds, points])."""
    curves = [evals(rows, key) for rows in seed_rows.values()]
    n = min(len(c[0]) for c in curves)
    ys = np.stack([(transform or (lambda y: y))(c[1][:n]) for c in curves])
    return curves[0][0][:n], ys


def pm(x: list[float]) -> str:
    return f"{np.mean(x):.1f} ± {np.std(x, ddof=1) if len(x) > 1 else 0.0:.1f}"


def table(runs: dict) -> str:
    methods = [m for m in ORDER if m in runs] + sorted(set(runs) - set(ORDER))
    base = runs.get("none", {})
    head = ["credit", "seeds"]
    for _, short in METRICS:
        head += [f"final {short}", f"Δ vs none ({short})", f"last-2 Δ ({short})", f"peak {short}"]
    head += ["rollout acc, last 10", "Δ vs none", "step s", "stats+credit share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        seeds = sorted(runs[m])
        cells = [m, ",".join(map(str, seeds))]
        for key, _ in METRICS:
            final = {s: evals(runs[m][s], key)[1][-1] for s in seeds}
            peak = [evals(runs[m][s], key)[1].max() for s in seeds]
            paired = [final[s] - evals(base[s], key)[1][-1] for s in seeds if s in base]
            # the mean of the last two evaluations: less at the mercy of one noisy evaluation
            last2 = [evals(runs[m][s], key)[1][-2:].mean() - evals(base[s], key)[1][-2:].mean()
                     for s in seeds if s in base]
            cells += [pm(list(final.values())), pm(paired) if paired and m != "none" else "—",
                      pm(last2) if last2 and m != "none" else "—", pm(peak)]
        late = {s: last_steps(runs[m][s], ROLLOUT) for s in seeds}
        late_paired = [late[s] - last_steps(base[s], ROLLOUT) for s in seeds if s in base]
        cells += [pm(list(late.values())), pm(late_paired) if late_paired and m != "none" else "—"]
        cells += [f"{np.mean([mean_of(runs[m][s], 'time/step_s') for s in seeds]):.2f}",
                  f"{100 * np.mean([mean_of(runs[m][s], 'time/credit_share') for s in seeds]):.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    cold = [evals(r, k)[1][0] for r in base.values() for k, _ in METRICS[:1]]
    if cold:
        lines.append("")
        lines.append(f"Cold-start model (step 0): {cold[0]:.1f} greedy, "
                     f"{evals(next(iter(base.values())), METRICS[1][0])[1][0]:.1f} sampled.")
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), sharex=True)
    panels = [(key, f"held-out accuracy, {short}", False) for key, short in METRICS]
    panels.append((ROLLOUT, "training rollouts' accuracy (10-step moving mean)", True))
    for ax, (key, name, smooth) in zip(axes, panels):
        for m in [m for m in ORDER if m in runs]:
            steps, ys = seed_curves(runs[m], key, moving_mean if smooth else None)
            if not len(steps):
                continue
            lw = 2.2 if m in ("none", "coupled") else 1.2
            if smooth:  # 30 points a seed: the band would hide the lines
                ax.plot(steps, ys.mean(0), label=m, lw=lw)
                continue
            mu, sd = ys.mean(0), ys.std(0)
            ax.plot(steps, mu, marker="o", ms=3, label=f"{m} (n={len(ys)})", lw=lw)
            ax.fill_between(steps, mu - sd, mu + sd, alpha=0.12)
        ax.set_title(name)
        ax.set_xlabel("RL step")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="outputs/credit_ablation/<task>")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = load_runs(args.root)
    if not runs:
        raise SystemExit(f"no runs under {args.root} (expected <credit>/seed<k>/metrics.jsonl)")
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (args.out / "table.md").write_text(text)
    plot(runs, args.out / "curves.png", f"credit ablation: {args.root.name} (mean ± std over seeds)")
    print(text)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
