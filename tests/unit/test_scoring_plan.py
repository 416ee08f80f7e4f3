"""One scoring forward for every reader of attention statistics (rl/methods/__init__.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rl.config import register_configs
from rl.methods import build_methods, merge_requests, scoring_request
from rl.methods.base import RunInfo, own_layers

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


def cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_merge_unions_layers_and_statistics_and_refuses_conflicts():
    a = {"layers": [1, 2], "distance": True, "waad_window": 10}
    b = {"layers": [0, 1, 2, 3], "n_classes": 2}
    assert merge_requests([a, b]) == {"layers": [0, 1, 2, 3], "distance": True,
                                      "waad_window": 10, "n_classes": 2}
    assert merge_requests([]) is None
    with pytest.raises(ValueError, match="waad_window"):
        merge_requests([a, {"layers": [0], "waad_window": 5}])


@pytest.mark.parametrize("overrides, request_, credit_layers, avar_layers", [
    ((), None, [], None),                                           # plain GRPO: no statistics
    (("credit=coupled",), "credit", [4, 6, 8], None),               # middle:3 of 12: 4..8, 3 spaced
    (("avar=vars",), "avar", [], list(range(12))),
    (("avar=vas",), None, [], list(range(12))),                     # VAS at eval only
    (("credit=coupled", "avar=vars", "avar.layers=middle:2"), "both", [4, 6, 8], [4, 8]),
])
def test_plan_per_reader(overrides, request_, credit_layers, avar_layers):
    c = cfg("learner.stats_layers=middle:3", *overrides)
    methods = {m.name: m for m in build_methods(c)}
    for m in methods.values():
        m.setup(RunInfo(num_layers=12, steps=10))
    assert methods["credit"].layers == credit_layers
    assert (methods["vars"].layers if "vars" in methods else None) == avar_layers
    req = scoring_request(list(methods.values()))
    if request_ is None:
        assert req is None
    else:
        assert req["layers"] == sorted(set(credit_layers) | set(avar_layers if request_ != "credit" else []))
        assert ("n_classes" in req) == (request_ in ("avar", "both"))
        assert ("waad_window" in req) == (request_ in ("credit", "both"))
    stats = {i: {"mass": i} for i in range(12)}
    view = own_layers(stats, methods["credit"].layers)
    assert (sorted(view) if view else []) == credit_layers
