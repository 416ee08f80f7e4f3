"""Table and curves for the AVAR ablations: held-out accuracy, VAS before → after, VARS's raw
r_visual range and its cost, per arm (mean ± std over seeds; Δ against the first arm, paired by
seed).

    python benchmarks/avar_report.py outputs/avar_text --out benchmarks/results/avar_text
    python benchmarks/avar_report.py outputs/agto_stage --out … --stages   # steps=0 runs

Reads `<root>/<arm>/seed<k>/{summary.json,metrics.jsonl}` (the trainer's outputs); arms are
ordered as ORDER (others after). Writes `table.md` and `curves.png`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from runs import load, mean_metric, paired, plot_curves, pm

ORDER = ["grpo", "lm_grpo", "vars", "agto", "agto_grpo", "agto_vars"]  # lm_grpo, agto_grpo: from a stage


def table(runs: dict, arms: list[str]) -> str:
    base = arms[0]
    lines = [f"| arm | seeds | final greedy | Δ vs {base} | final sampled | Δ vs {base} | "
             "VAS response: start → final | VAS query: start → final | evidence share (pooled), "
             "response: start → final | r_visual (correct) min / mean / max | "
             "step s | VARS share of step |", "|" + "---|" * 12]
    for a in arms:
        rs = runs[a]

        def first_last(key):
            vals = [[m[key] for m in r["metrics"] if key in m] for r in rs.values()]
            return (pm([v[0] for v in vals if v], 2), pm([v[-1] for v in vals if v], 2))

        v_r, v_q = first_last("eval/vas_response"), first_last("eval/vas_query")
        share = first_last("eval/evidence_share_response")
        rv = [tuple(mean_metric(r, f"vars/r_visual_{k}") for k in ("min", "mean", "max"))
              for r in rs.values()]
        rv_txt = ("—" if all(x != x for t in rv for x in t) else
                  " / ".join(f"{np.nanmean([t[i] for t in rv]):.2f}" for i in range(3)))
        vars_share = [100 * mean_metric(r, "time/vars_share") for r in rs.values()]
        share_txt = pm(vars_share) + "%" if "vars" in a else "—"
        lines.append(
            f"| {a} | {','.join(map(str, sorted(rs)))} | "
            f"{pm([100 * r['summary']['final_accuracy'] for r in rs.values()])} | "
            f"{paired(runs, a, base, 'final_accuracy')} | "
            f"{pm([100 * r['summary']['final_accuracy_sampled'] for r in rs.values()])} | "
            f"{paired(runs, a, base, 'final_accuracy_sampled')} | {v_r[0]} → {v_r[1]} | "
            f"{v_q[0]} → {v_q[1]} | {share[0]} → {share[1]} | {rv_txt} | "
            f"{np.mean([mean_metric(r, 'time/step_s') for r in rs.values()]):.2f} | {share_txt} |")
    return "\n".join(lines) + "\n"


def layer_table(runs: dict, arms: list[str], metric: str = "eval/vas_response") -> str:
    """`metric` of the response tokens per layer, cold start → final (mean ± std over seeds):
    the model-level VAS is a mean of ratios, so one layer whose system mass is ~0 can own it;
    the evidence share (a pooled fraction) cannot be owned so."""
    some = next(iter(runs[arms[0]].values()))["metrics"][0]
    layers = sorted(int(k.rsplit("_L", 1)[1]) for k in some if k.startswith(f"{metric}_L"))
    if not layers:
        return ""
    lines = ["| arm | " + " | ".join(f"L{i}: start → final" for i in layers) + " |",
             "|" + "---|" * (len(layers) + 1)]
    for a in arms:
        cells = []
        for i in layers:
            key = f"{metric}_L{i}"
            vals = [[m[key] for m in r["metrics"] if key in m] for r in runs[a].values()]
            cells.append(f"{pm([v[0] for v in vals if v], 2)} → {pm([v[-1] for v in vals if v], 2)}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stage_table(runs: dict, arms: list[str], unit: str) -> str:
    """Evaluations with no RL step (`steps=0`: a cold start, or an AGTO stage after it): held-out
    accuracy and, per layer, the evidence share with the mean attention on each side
    (evidence / system) of the `unit` tokens (query: the user turn AGTO trains; response)."""
    some = next(iter(runs[arms[0]].values()))["metrics"][0]
    layers = sorted(int(k.rsplit("_L", 1)[1]) for k in some
                    if k.startswith(f"eval/evidence_share_{unit}_L"))
    lines = ["| arm | greedy | sampled | " + " | ".join(
        f"L{i} share (evidence / system mass)" for i in layers) + " |", "|" + "---|" * (len(layers) + 3)]
    for a in arms:
        rows = [r["metrics"][0] for r in runs[a].values()]

        def avg(key):
            return float(np.mean([m[key] for m in rows]))

        cells = [f"{avg(f'eval/evidence_share_{unit}_L{i}'):.3f} "
                 f"({avg(f'eval/evidence_mass_{unit}_L{i}'):.3f} / {avg(f'eval/system_mass_{unit}_L{i}'):.3f})"
                 for i in layers]
        def acc(key):  # one seed (a stage is deterministic given its start): the value alone
            xs = [100 * m[key] for m in rows]
            return f"{xs[0]:.1f}" if len(xs) == 1 else pm(xs)

        lines.append(f"| {a} | {acc('eval/accuracy')} | {acc('eval/accuracy_sampled')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", action="store_true",
                    help="runs of no RL step (steps=0): accuracy and per-layer attention")
    args = ap.parse_args()
    runs = load(args.root)
    if not runs:
        raise SystemExit(f"no finished runs under {args.root} (<arm>/seed<k>/summary.json)")
    arms = [a for a in ORDER if a in runs] + sorted(set(runs) - set(ORDER))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stages:
        text = "".join(f"\n{unit} tokens:\n\n" + stage_table(runs, arms, unit)
                       for unit in ("query", "response"))
        (args.out / "stages.md").write_text(text)
        print(text)
        return
    text = table(runs, arms)
    if layers := layer_table(runs, arms):
        text += "\nVAS (response tokens) per layer:\n\n" + layers
    if layers := layer_table(runs, arms, "eval/evidence_share_response"):
        text += "\nEvidence share (response tokens, pooled) per layer:\n\n" + layers
    (args.out / "table.md").write_text(text)
    plot_curves(runs, arms, [("eval/accuracy", "held-out accuracy, greedy (%)", 100),
                             ("eval/accuracy_sampled", "held-out accuracy, sampled (%)", 100),
                             ("eval/vas_response", "VAS, response tokens", 1)],
                args.out / "curves.png", f"AVAR ablation: {args.out.name} (mean ± std over seeds)")
    print(text)


if __name__ == "__main__":
    main()
