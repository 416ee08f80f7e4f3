"""AVAR in the RL step (a method, rl/methods/base.py): VARS reward shaping after the scoring
forward, VAS at evaluation, and AGTO — the cold start's objective or a stage before RL.

VARS needs the learner's attention on the rollouts, so it cannot be a text verifier in
`rewards/` (which sees strings in worker processes). It edits `batch.rewards` between scoring
and advantages — before group normalisation, as §3.3.3 places it — reading the key-class
masses the scoring forward captured for it. Its metrics are logged under vars/, its cost as
time/vars_share.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from kernels.capture import select_layers
from rl.methods.avar.scores import (EVIDENCE, N_CLASSES, SYSTEM, AgtoConfig, check_classes,
                                    key_classes, normalise_visual, r_visual, user_query_mask,
                                    vas, vas_pooled)
from rl.batch import RolloutBatch
from rl.methods.base import ColdStartObjective, Method, RunInfo, Tools


def from_config(cfg) -> "Avar | None":
    """AVAR's parts the avar group turns on: VAS at evaluations (every choice but none), VARS
    (vars, agto_vars), AGTO (agto, agto_vars) as the cold start's objective or as a stage
    after it (avar.agto_at)."""
    v = cfg.avar
    if v.name == "none":
        return None
    agto = stage = None
    if v.name in ("agto", "agto_vars"):
        agto = AgtoConfig(alpha=v.agto_alpha, beta=v.agto_beta, layers=v.layers, eps=v.eps,
                          evidence=v.evidence, system=v.system)
        if v.agto_at == "stage":
            from rl.methods.avar.agto import run_agto_stage

            agto, stage = None, partial(run_agto_stage, cfg, agto)
    return Avar(v, vars_on=v.name in ("vars", "agto_vars"), agto=agto, stage=stage)


class Avar(Method):
    name = "vars"

    def __init__(self, p, vars_on: bool, agto: AgtoConfig | None,
                 stage: Callable[[str, bool], str] | None = None):
        """VAS is measured at every evaluation whenever AVAR is on; `vars_on`: VARS shapes the
        rewards; `agto`: the cold start's objective; `stage`: AGTO as a stage after it
        (policy, progress → the policy RL starts from)."""
        self.p, self.vars_on, self.agto, self.stage = p, vars_on, agto, stage
        self.reads_statistics = vars_on
        self.layers: list[int] = []

    def cold_start_objective(self) -> ColdStartObjective | None:
        if self.agto is None:
            return None
        from rl.methods.avar.agto import agto_objective

        return agto_objective(self.agto)

    def before_rl(self, policy: str, progress: bool) -> str:
        return self.stage(policy, progress) if self.stage else policy

    def setup(self, run: RunInfo) -> None:
        self.layers = select_layers(self.p.layers, run.num_layers)

    def request(self) -> dict:
        """Evidence/system masses on its layers."""
        return {"layers": self.layers, "n_classes": N_CLASSES}

    def scoring_request(self) -> dict | None:
        return self.request() if self.vars_on else None

    def key_classes(self, batch: RolloutBatch) -> torch.Tensor | None:
        if not self.vars_on:
            return None
        return self._key_classes(batch)

    def _key_classes(self, batch: RolloutBatch) -> torch.Tensor:
        kc = key_classes(batch.token_classes, self.p.evidence, self.p.system, batch.attention_mask)
        check_classes(kc, f"AVAR (avar.evidence={self.p.evidence})")
        return kc

    def masses(self, attn_stats: dict) -> dict[int, torch.Tensor]:
        return {layer: attn_stats[layer]["mass"] for layer in self.layers}

    def shape_rewards(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """VARS: reward += λ_v · r_visual (0 for a wrong response), r_visual normalised per
        avar.vars_norm. Logs the raw range (§3.3.3's scale warning) and the rollouts' VAS."""
        if not self.vars_on:
            return {}
        mass = self.masses(batch.attn_stats)
        correct = batch.correct.float()
        raw = r_visual(mass, batch.response_mask, correct, self.p.eps)
        shaped = normalise_visual(raw, correct, batch.group_ids, self.p.vars_norm, self.p.vars_clip)
        batch.rewards = batch.rewards + self.p.vars_coef * shaped
        ok = raw[correct.bool()]  # the raw range over the responses that earn the bonus
        out = {f"r_visual_{name}": float(getattr(ok, name)()) if len(ok) else 0.0
               for name in ("mean", "min", "max")}
        out["bonus_mean"] = float((self.p.vars_coef * shaped).mean())
        vas_out = self.vas_metrics(batch, mass, "vars", self._key_classes(batch))
        out.update({k[len("vars/"):]: v for k, v in vas_out.items()})
        return out

    def evaluate(self, batch: RolloutBatch, tools: Tools) -> dict[str, float]:
        """VAS (§3.1) of the greedy held-out responses: one scoring forward with the
        evidence/system key-class masses on its layers."""
        kc = self._key_classes(batch)
        t = {**batch.model_inputs(), "response_mask": batch.response_mask, "key_classes": kc}
        out = tools.learner.score(t, tools.temperature, self.request())
        return self.vas_metrics(batch, self.masses(out["attn_stats"]), "eval", kc)

    def vas_metrics(self, batch: RolloutBatch, mass: dict, prefix: str,
                    kc: torch.Tensor) -> dict[str, float]:
        """VAS over the response tokens and over the user-query tokens (§3.1 leaves U open:
        both are logged; the README reports the response one), overall and per layer: §3.1's
        mean of ratios (`vas_*`), and the headline pooled ratio (`vas_pooled_*`) and evidence
        share (`evidence_share_*`, rl/methods/avar/scores.py vas_pooled), means over rows."""
        out = {}
        queries = {"response": batch.response_mask.bool(),
                   "query": user_query_mask(batch.token_classes, batch.attention_mask,
                                            batch.response_mask, kc)}
        for name, q in queries.items():
            keep = q.any(1)
            if not keep.any():
                continue
            kept = {k: v[keep] for k, v in mass.items()}
            per_row, per_layer = vas(kept, q[keep])
            pooled = vas_pooled(kept, q[keep])
            for key, row, by_layer in ((f"vas_{name}", per_row, per_layer),
                                       (f"vas_pooled_{name}", pooled.ratio, pooled.ratio_by_layer),
                                       (f"evidence_share_{name}", pooled.share, pooled.share_by_layer)):
                out[f"{prefix}/{key}"] = float(row.mean())
                for layer, v in zip(self.layers, by_layer.mean(1).tolist()):
                    out[f"{prefix}/{key}_L{layer}"] = v
            for side, k in (("evidence", EVIDENCE), ("system", SYSTEM)):  # mean attention mass
                for layer, v in zip(self.layers, pooled.mass_by_layer[..., k].mean(1).tolist()):
                    out[f"{prefix}/{side}_mass_{name}_L{layer}"] = v
        return out

    def draw_eval(self, tracker, evals: dict, step: int) -> None:
        """VAS per layer at this evaluation, as one chart (response and user-query tokens as
        two lines)."""
        layers = self.layers
        for key in ("vas", "evidence_share"):
            series = {u: [evals[f"eval/{key}_{u}_L{layer}"] for layer in layers]
                      for u in ("response", "query") if f"eval/{key}_{u}_L{layers[0]}" in evals}
            tracker.line_plot(f"eval/{key}_by_layer", "layer", layers, series, step)

    def summary(self, before: dict, after: dict) -> dict:
        return {f"{when}_{key}": evals.get(f"eval/{key}_response", float("nan"))
                for when, evals in (("cold_start", before), ("final", after))
                for key in ("vas", "vas_pooled", "evidence_share")}
