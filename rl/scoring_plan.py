"""Which attention statistics the scoring forward captures, and for whom.

Credit (WAAD / FAI / distance on learner.stats_layers) and AVAR (key-class masses on
avar.layers) read different statistics on different layers. One forward serves both: the union
of the layers with the union of the statistics; each reader then gets back only its own layers.
(Where the layer sets differ, a few statistics are computed on layers nobody reads — cheap next
to a second forward.)
"""
from __future__ import annotations

import json
from pathlib import Path

from kernels.capture import select_layers
from rl.avar.visual_attention import VisualAttention
from rl.config_checks import vas_at_eval


def num_layers(model_path: str) -> int:
    """Decoder layers of an HF folder (the text model's, for a vision-language model)."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return int(cfg["num_hidden_layers"] if "num_hidden_layers" in cfg
               else cfg["text_config"]["num_hidden_layers"])


def merge_requests(requests: list[dict]) -> dict | None:
    """StatsSpec keyword arguments + "layers", merged; two readers asking the same statistic
    with different settings (e.g. two WAAD windows) is a configuration error."""
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


class StatsPlan:
    def __init__(self, cfg, credit, n_layers: int):
        credit_request = credit.stats_request()
        self.credit_layers = (select_layers(cfg.learner.stats_layers, n_layers)
                              if credit_request else [])
        self.vars_on = cfg.avar.vars_coef > 0
        self.vas_on = vas_at_eval(cfg)
        self.avar = (VisualAttention(cfg, select_layers(cfg.avar.layers, n_layers))
                     if self.vars_on or self.vas_on else None)
        requests = [dict(credit_request, layers=self.credit_layers)] if credit_request else []
        if self.vars_on:
            requests.append(self.avar.request())
        self.train_request = merge_requests(requests)

    def credit_view(self, stats: dict | None) -> dict | None:
        """The credit method's layers only (it pools every layer it is given)."""
        if not stats or not self.credit_layers:
            return None
        return {layer: stats[layer] for layer in self.credit_layers}
