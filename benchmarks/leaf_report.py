"""Tables for the LeaF experiments: the offline warm start (no distillation / KD / LeaF /
LeaF + response level) and LeaF inside RL (GRPO / + KD term (b) / + counterfactual groups (c)).

    python benchmarks/leaf_report.py warm-start outputs/leaf_warm --out benchmarks/results/leaf_warm_start
    python benchmarks/leaf_report.py rl outputs/leaf_rl --out benchmarks/results/leaf_rl

Reads `<root>/<arm>/seed<k>/{summary.json,metrics.jsonl}` (written by the trainer) and, for
the warm start, the `leaf_report.json` beside each run's distilled checkpoint. Writes
`table.md` (mean ± std over seeds; Δ against the first arm paired by seed) under --out, and for
RL `curves.png`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from runs import load as load_runs, mean_metric, paired, plot_curves, pm

WARM_ARMS = ["none", "kd", "leaf", "leaf_word", "leaf_response", "leaf_no_validation"]
RL_ARMS = ["grpo", "leaf_kl", "leaf_groups"]


def load(root: Path) -> dict[str, dict[int, dict]]:
    runs = load_runs(root)
    for arm in runs.values():
        for run in arm.values():
            # the distillation report: copied beside the run (committed results), else the
            # one beside its distilled checkpoint
            rep = run["dir"] / "leaf_report.json"
            if not rep.is_file():
                rep = Path(run["summary"].get("policy_init", "")) / "leaf_report.json"
            run["report"] = json.loads(rep.read_text()) if rep.is_file() else None
    return runs


def warm_table(runs) -> str:
    arms = [a for a in WARM_ARMS if a in runs]
    lines = ["| distillation | seeds | held-out greedy | Δ vs none | Δ vs kd | held-out sampled | "
             "Δ vs none | Δ vs kd | student wrong / detected | counterfactuals kept | "
             "detection P / R | KL first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        rs = runs[a]
        acc = [100 * r["summary"]["cold_start_accuracy"] for r in rs.values()]
        accs = [100 * r["summary"]["cold_start_accuracy_sampled"] for r in rs.values()]
        reps = [r["report"] for r in rs.values() if r["report"]]
        wrong = pm([x.get("student_wrong", float("nan")) for x in reps]) if reps else "—"
        kept = pm([x.get("counterfactuals_kept", float("nan")) for x in reps]) if reps else "—"
        pr = (f"{pm([100 * x['instruction_precision'] for x in reps if 'instruction_precision' in x])} / "
              f"{pm([100 * x['instruction_recall'] for x in reps if 'instruction_recall' in x])}") if reps else "—"
        kl = (f"{np.mean([x['kd_kl_first'] for x in reps]):.3f} → {np.mean([x['kd_kl_last'] for x in reps]):.3f}"
              if reps else "—")
        lines.append(f"| {a} | {','.join(map(str, sorted(rs)))} | {pm(acc)} | "
                     f"{paired(runs, a, 'none', 'cold_start_accuracy')} | "
                     f"{paired(runs, a, 'kd', 'cold_start_accuracy')} | {pm(accs)} | "
                     f"{paired(runs, a, 'none', 'cold_start_accuracy_sampled')} | "
                     f"{paired(runs, a, 'kd', 'cold_start_accuracy_sampled')} | {wrong} | {kept} | {pr} | {kl} |")
    return "\n".join(lines) + "\n"


def rl_table(runs) -> str:
    arms = [a for a in RL_ARMS if a in runs] + sorted(set(runs) - set(RL_ARMS))
    lines = ["| arm | seeds | final greedy | Δ vs grpo | final sampled | Δ vs grpo | step s | "
             "LeaF share of step | confounder share | LeaF P / R |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        rs = runs[a]

        def per_seed(key):
            return [mean_metric(r, key) for r in rs.values()]

        fin = [100 * r["summary"]["final_accuracy"] for r in rs.values()]
        fins = [100 * r["summary"]["final_accuracy_sampled"] for r in rs.values()]
        step_s = np.mean(per_seed("time/step_s"))
        share = per_seed("time/leaf_share")
        conf = per_seed("leaf/confounder_share")
        p, r_ = per_seed("leaf/precision"), per_seed("leaf/recall")
        lines.append(f"| {a} | {','.join(map(str, sorted(rs)))} | {pm(fin)} | "
                     f"{paired(runs, a, RL_ARMS[0], 'final_accuracy')} | {pm(fins)} | "
                     f"{paired(runs, a, RL_ARMS[0], 'final_accuracy_sampled')} | {step_s:.2f} | "
                     f"{pm([100 * x for x in share]) + '%' if max(share) > 1e-3 else '—'} | "
                     f"{pm([100 * x for x in conf]) + '%' if any(x == x for x in conf) else '—'} | "
                     f"{pm([100 * x for x in p])} / {pm([100 * x for x in r_])} |")
    cold = next(iter(next(iter(runs.values())).values()))["summary"]
    lines += ["", f"Start (the shared cold start): {100 * cold['cold_start_accuracy']:.1f} greedy, "
              f"{100 * cold['cold_start_accuracy_sampled']:.1f} sampled."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=("warm-start", "rl"))
    ap.add_argument("root")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = load(Path(args.root))
    text = warm_table(runs) if args.kind == "warm-start" else rl_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    if args.kind == "rl":
        arms = [a for a in RL_ARMS if a in runs] + sorted(set(runs) - set(RL_ARMS))
        plot_curves(runs, arms, [("eval/accuracy", "held-out accuracy, greedy (%)", 100),
                                 ("eval/accuracy_sampled", "held-out accuracy, sampled (%)", 100)],
                    out / "curves.png", "LeaF in RL (mean ± std over seeds)")
    print(text)


if __name__ == "__main__":
    main()
