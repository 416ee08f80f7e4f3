"""The reward pool's inputs and outputs, and the per-batch summary the trainer logs.

Kept apart from the pool so the trainer (and tests) can build items and read results
without importing anything that starts processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence


@dataclass
class RewardItem:
    """One response to score.

    `verifier` is the task's verifier (usually `Sample.task`) and is always scored, with
    weight 1.0 unless `components` gives it another (0.0 = log only). `components` adds
    more terms by name or `"package.module:function"`, e.g. `{"format": 0.1}`; because the
    task verifier is implicit, one components dict fits a batch that mixes tasks.
    """
    response: str
    answer: str
    meta: dict = field(default_factory=dict)
    verifier: str = "exact"
    components: Dict[str, float] = field(default_factory=dict)

    def weights(self) -> Dict[str, float]:
        weights = {self.verifier: 1.0}
        weights.update({k: float(v) for k, v in self.components.items()})
        return weights


@dataclass
class RewardResult:
    """`components` holds each function's raw (unweighted) value; `total` the weighted sum.

    A component that raised or timed out is 0.0 and is counted in `errors` / `timeouts`,
    with a one-line reason in `error_messages`.
    """
    total: float
    components: Dict[str, float]
    errors: int = 0
    timeouts: int = 0
    error_messages: List[str] = field(default_factory=list)


def summarize(results: Sequence[RewardResult], prefix: str = "reward/") -> Dict[str, float]:
    """Batch metrics: mean total, mean of each component (over items that have it), and the
    error/timeout counts, ready for the logger as `reward/total`, `reward/<name>`, ..."""
    out: Dict[str, float] = {}
    if not results:
        return out
    out[f"{prefix}total"] = sum(r.total for r in results) / len(results)
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for r in results:
        for name, value in r.components.items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    for name in sorted(sums):
        out[f"{prefix}{name}"] = sums[name] / counts[name]
    out[f"{prefix}errors"] = float(sum(r.errors for r in results))
    out[f"{prefix}timeouts"] = float(sum(r.timeouts for r in results))
    return out
