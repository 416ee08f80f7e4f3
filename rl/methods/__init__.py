"""The methods of a run, built from its config (each decides from its own keys whether it is
on), and the few things the loop asks of all of them together.

A method is a `Method` (rl/methods/base.py); its module exposes `from_config(cfg) -> Method |
None`. The list below is the only place that names them; their order is the order of their
hooks (offline distillation before LeaF in RL, whose teacher reads the distilled student).
"""
from __future__ import annotations

import importlib

from rl.methods.base import ColdStartObjective, Method

BUILDERS = ("rl.methods.leaf.warm_start", "rl.methods.leaf.online", "rl.methods.avar.visual_attention", "rl.methods.credit")


def build_methods(cfg) -> list[Method]:
    out = []
    for module in BUILDERS:
        method = importlib.import_module(module).from_config(cfg)
        if method is not None:
            out.append(method)
    return out


def cold_start_objective(cfg) -> ColdStartObjective | None:
    """The one method's cold-start objective, if any (two would be a configuration error)."""
    objectives = [o for m in build_methods(cfg) if (o := m.cold_start_objective())]
    if len(objectives) > 1:
        raise ValueError("two methods set the cold start's objective")
    return objectives[0] if objectives else None


def merge_requests(requests: list[dict]) -> dict | None:
    """StatsSpec keyword arguments + "layers", merged into one scoring forward (the union of
    the layers and of the statistics; each reader then takes its own layers). Two readers
    asking the same statistic with different settings (e.g. two WAAD windows) is a
    configuration error."""
    if not requests:
        return None
    out: dict = {}
    layers: set[int] = set()
    for r in requests:
        for k, v in r.items():
            if k == "layers":
                layers |= set(v)
            elif k in out and out[k] != v:
                raise ValueError(f"two readers of the scoring forward ask for {k}={out[k]!r} and {v!r}")
            else:
                out[k] = v
    out["layers"] = sorted(layers)
    return out


def scoring_request(methods: list[Method]) -> dict | None:
    return merge_requests([r for m in methods if (r := m.scoring_request())])
