"""Token-level credit: methods that set `batch.token_weights` (γ_t) before advantages.

A method is one module here (a `CreditMethod` subclass registered by name) plus one
conf/credit/ file. It reads the batch (token ids, token classes, entropy, the attention
statistics of the scoring forward, the per-response advantages) and writes weights; the
advantage of token t becomes A × γ_t. `none` leaves every weight at 1 (plain GRPO).

Each method declares its parameters as a dataclass, so `build` rejects an unknown or
mistyped `credit.params` key by name — `check_config` calls it before any actor starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rl.batch import RolloutBatch


@dataclass
class NoParams:
    pass


class CreditMethod:
    """The contract: what the scoring forward must capture, and γ from a scored batch."""

    Params: type = NoParams

    def __init__(self, name: str, params: Any, seed: int = 0):
        self.name, self.p, self.seed = name, params, seed

    def stats_request(self) -> dict | None:
        """StatsSpec keyword arguments the scoring forward must capture (None: no attention)."""
        return None

    def __call__(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """Edit batch.token_weights in place; return metrics (logged under credit/)."""
        raise NotImplementedError


METHODS: dict[str, type[CreditMethod]] = {}


def register(*names: str):
    def wrap(cls: type[CreditMethod]) -> type[CreditMethod]:
        for n in names:
            METHODS[n] = cls
        return cls
    return wrap


def build(name: str, params: dict | None = None, seed: int = 0) -> CreditMethod:
    """The method `name` with its typed parameters; raises ValueError naming a bad key."""
    if name not in METHODS:
        raise ValueError(f"credit.name={name!r}: unknown; known: {sorted(METHODS)}")
    cls = METHODS[name]
    known = {f.name: f for f in dataclasses.fields(cls.Params)}
    params = dict(params or {})
    for key in params:
        if key not in known:
            raise ValueError(f"credit.params.{key}: unknown for credit={name}; known: {sorted(known)}")
    try:
        typed = cls.Params(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"credit.params for credit={name}: {e}") from e
    return cls(name, typed, seed)


@register("none")
class NoCredit(CreditMethod):
    """Uniform credit: the response's advantage on every one of its tokens."""

    def __call__(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        return {}


from rl.credit import preplan_anchor  # noqa: E402,F401  (registers its strategies)
