"""Token-level credit: methods that set `batch.token_weights` (γ_t) before advantages.

A method is one module here registered by name plus one conf/credit/ file. It reads the batch
(token ids, token classes, attention statistics from the scoring forward) and writes weights;
the advantage of token t becomes A × γ_t. `none` leaves every weight at 1 (plain GRPO).
"""
from __future__ import annotations

from typing import Callable

from rl.batch import RolloutBatch

CreditFn = Callable[[RolloutBatch, dict], dict]
METHODS: dict[str, CreditFn] = {}
# What each method needs from the scoring forward: StatsSpec keyword arguments, or None.
STATS: dict[str, Callable[[dict], dict | None]] = {}


def register(name: str, stats: Callable[[dict], dict | None] = lambda params: None):
    def wrap(fn: CreditFn) -> CreditFn:
        METHODS[name] = fn
        STATS[name] = stats
        return fn
    return wrap


def stats_request(name: str, params: dict) -> dict | None:
    """The attention statistics method `name` reads (None: the scoring forward needs none)."""
    if name not in STATS:
        raise ValueError(f"unknown credit method {name!r}; known: {sorted(METHODS)}")
    return STATS[name](params)


@register("none")
def no_credit(batch: RolloutBatch, params: dict) -> dict:
    """Uniform credit: the response's advantage on every one of its tokens."""
    return {}


def apply_credit(name: str, batch: RolloutBatch, params: dict) -> dict:
    """Edit batch.token_weights in place; returns the method's metrics."""
    if name not in METHODS:
        raise ValueError(f"unknown credit method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](batch, params)
