"""Token-level credit: methods that set `batch.token_weights` (γ_t) before advantages.

A strategy is one module here (a `CreditMethod` subclass registered by name; every module of
the package is imported, so nothing else lists it) plus one conf/credit/ file. It reads the batch (token ids, token classes, entropy, the attention
statistics of the scoring forward, the per-response advantages) and writes weights; the
advantage of token t becomes A × γ_t. `none` leaves every weight at 1 (plain GRPO). A
CreditMethod is a method of the RL step (rl/methods/base.py) named "credit": its
`token_weights` hook runs the strategy on its own layers of the statistics.

Each method declares its parameters as a dataclass, so `build` rejects an unknown or
mistyped `credit.params` key by name — `check_config` calls it before any actor starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kernels.capture import select_layers
from rl.batch import RolloutBatch
from rl.methods.base import Method, RunInfo, own_layers


@dataclass
class NoParams:
    pass


class CreditMethod(Method):
    """The contract: what the scoring forward must capture, and γ from a scored batch."""

    Params: type = NoParams
    name = "credit"
    trace = None  # the last batch's trace (rl/methods/credit/preplan_anchor.py CreditTrace), if kept

    def __init__(self, strategy: str, params: Any, seed: int = 0, stats_layers: str = "middle:5"):
        self.strategy, self.p, self.seed = strategy, params, seed
        self.stats_layers, self.layers = stats_layers, []
        self.reads_statistics = self.stats_request() is not None

    @classmethod
    def keys(cls, strategy: str) -> set[str]:
        """The parameters `strategy` reads (a class serving several strategies reads subsets of
        its Params): credit.params may set only these."""
        return {f.name for f in dataclasses.fields(cls.Params)}

    def stats_request(self) -> dict | None:
        """StatsSpec keyword arguments the scoring forward must capture (None: no attention)."""
        return None

    def weights(self, batch: RolloutBatch, stats: dict | None, step: int) -> dict[str, float]:
        """Edit batch.token_weights in place from `stats` (the layers it reads); return
        metrics (logged under credit/)."""
        raise NotImplementedError

    def __call__(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """The strategy on a batch whose attn_stats hold exactly its layers (tests)."""
        return self.weights(batch, batch.attn_stats, step)

    # --- as a method of the RL step --------------------------------------------------------
    def setup(self, run: RunInfo) -> None:
        self.layers = select_layers(self.stats_layers, run.num_layers) if self.reads_statistics else []

    def scoring_request(self) -> dict | None:
        request = self.stats_request()
        return dict(request, layers=self.layers) if request else None

    def token_weights(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        return self.weights(batch, own_layers(batch.attn_stats, self.layers), step)

    def draw(self, tracker, tok, batch: RolloutBatch, rows: int, step: int) -> None:
        from rl.methods.credit.render import log_credit_table

        log_credit_table(tracker, tok, batch, self.trace, rows, step)

    def summary(self, before: dict, after: dict) -> dict:
        return {"credit": self.strategy}


METHODS: dict[str, type[CreditMethod]] = {}


def register(*names: str):
    def wrap(cls: type[CreditMethod]) -> type[CreditMethod]:
        for n in names:
            METHODS[n] = cls
        return cls
    return wrap


def build(name: str, params: dict | None = None, seed: int = 0,
          stats_layers: str = "middle:5") -> CreditMethod:
    """The method `name` with its typed parameters; raises ValueError naming a bad key."""
    if name not in METHODS:
        raise ValueError(f"credit.name={name!r}: unknown; known: {sorted(METHODS)}")
    cls = METHODS[name]
    known = cls.keys(name)
    params = dict(params or {})
    for key in params:
        if key not in known:
            raise ValueError(f"credit.params.{key}: unknown for credit={name}; known: {sorted(known)}")
    try:
        typed = cls.Params(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"credit.params for credit={name}: {e}") from e
    return cls(name, typed, seed, stats_layers)


def from_config(cfg) -> CreditMethod:
    """The configured strategy (typed parameters; raises naming a bad key). Always on:
    credit=none is uniform credit."""
    from omegaconf import OmegaConf

    params = cfg.credit.params
    params = dict(params) if isinstance(params, dict) else OmegaConf.to_container(params, resolve=True)
    return build(cfg.credit.name, params, seed=cfg.seed, stats_layers=cfg.learner.stats_layers)


@register("none")
class NoCredit(CreditMethod):
    """Uniform credit: the response's advantage on every one of its tokens."""

    def weights(self, batch: RolloutBatch, stats: dict | None, step: int) -> dict[str, float]:
        return {}


def _register_all() -> None:
    """Import every strategy module of this package (each registers itself): a new strategy
    is its file, with nothing to add here."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "render":
            importlib.import_module(f"{__name__}.{info.name}")


_register_all()
