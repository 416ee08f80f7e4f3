"""The ablation report's paired columns on a hand-built pair of runs: the README's tables are
read from it, so its Δs are checked against figures worked out by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import credit_ablation_report as report  # noqa: E402


def _write_run(root: Path, arm: str, seed: int, evals: list[float], rollout: list[float]) -> None:
    run = root / arm / f"seed{seed}"
    run.mkdir(parents=True)
    rows = []
    for step, acc in zip((0, 15, 30), evals):
        rows.append({"step": step, "eval/accuracy": acc, "eval/accuracy_sampled": acc / 2})
    for step, acc in enumerate(rollout, start=1):
        rows.append({"step": step, "rollout/accuracy": acc, "time/step_s": 2.0,
                     "time/credit_share": 0.25})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "summary.json").write_text(json.dumps({"stopped_by": None}))


def _row(text: str, arm: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(f"| {arm} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_paired_deltas_and_late_rollout_accuracy_by_hand(tmp_path):
    # 12 training steps so that "last 10" drops the first two
    _write_run(tmp_path, "none", 0, [0.70, 0.72, 0.74], [0.0, 0.0] + [0.50] * 10)
    _write_run(tmp_path, "none", 1, [0.70, 0.70, 0.76], [1.0, 1.0] + [0.40] * 10)
    _write_run(tmp_path, "mc", 0, [0.70, 0.75, 0.77], [0.9, 0.9] + [0.55] * 10)
    _write_run(tmp_path, "mc", 1, [0.70, 0.71, 0.76], [0.0, 0.0] + [0.50] * 10)
    (tmp_path / "coupled" / "seed0").mkdir(parents=True)  # unfinished: no summary, skipped
    text = report.table(report.load_runs(tmp_path))
    assert "| coupled |" not in text
    none, mc = _row(text, "none"), _row(text, "mc")
    # final greedy: none 74, 76 → 75.0 ± 1.4; mc 77, 76 → 76.5 ± 0.7
    assert none[2] == "75.0 ± 1.4" and mc[2] == "76.5 ± 0.7"
    # paired final Δ: +3, 0 → 1.5 ± 2.1; last-2 Δ: (76 − 73), (73.5 − 73) → 1.75 ± 1.77
    assert mc[3] == "1.5 ± 2.1" and mc[4] == "1.8 ± 1.8"
    # sampled is half of greedy here, so its paired final Δ is 1.5, 0 → 0.8 ± 1.1
    assert mc[7] == "0.8 ± 1.1"
    # rollout accuracy over the last 10 steps: none 50, 40 → 45.0 ± 7.1; mc 55, 50; Δ 5, 10
    assert none[10] == "45.0 ± 7.1" and mc[10] == "52.5 ± 3.5" and mc[11] == "7.5 ± 3.5"
    assert mc[12] == "2.00" and mc[13] == "25.0%"
    assert "Cold-start model (step 0): 70.0 greedy, 35.0 sampled." in text


def test_moving_mean_uses_the_points_it_has_at_the_start():
    np.testing.assert_allclose(report.moving_mean(np.array([2.0, 4.0, 6.0, 8.0]), n=2),
                               [2.0, 3.0, 5.0, 7.0])
