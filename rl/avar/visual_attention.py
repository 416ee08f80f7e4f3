"""AVAR in the RL loop: VARS reward shaping after the scoring forward, VAS at evaluation.

VARS needs the learner's attention on the rollouts, so it cannot be a text verifier in
`rewards/` (which sees strings in worker processes). It is a stage between scoring and
advantages that edits `batch.rewards` — before group normalisation, as §3.3.3 places it —
reading the key-class masses the scoring forward already captured for it.
"""
from __future__ import annotations

import torch

from rl.avar.scores import (N_CLASSES, check_classes, key_classes, normalise_visual, r_visual,
                            user_query_mask, vas)
from rl.batch import RolloutBatch


class VisualAttention:
    def __init__(self, cfg, layers: list[int]):
        self.p = cfg.avar
        self.layers = layers

    def request(self) -> dict:
        """What the scoring forward captures for AVAR: evidence/system masses on its layers."""
        return {"layers": self.layers, "n_classes": N_CLASSES}

    def key_classes(self, batch: RolloutBatch) -> torch.Tensor:
        kc = key_classes(batch.token_classes, self.p.evidence)
        check_classes(kc, f"AVAR (avar.evidence={self.p.evidence})")
        return kc

    def masses(self, attn_stats: dict) -> dict[int, torch.Tensor]:
        return {layer: attn_stats[layer]["mass"] for layer in self.layers}

    def shape_rewards(self, batch: RolloutBatch, mass: dict) -> dict[str, float]:
        """VARS: reward += λ_v · r_visual (0 for a wrong response), r_visual normalised per
        avar.vars_norm. Logs the raw range (§3.3.3's scale warning) and the rollouts' VAS."""
        correct = torch.tensor([float(m["correct"]) for m in batch.meta])
        raw = r_visual(mass, batch.response_mask, correct, self.p.eps)
        shaped = normalise_visual(raw, correct, batch.group_ids, self.p.vars_norm, self.p.vars_clip)
        batch.rewards = batch.rewards + self.p.vars_coef * shaped
        ok = raw[correct.bool()]  # the raw range over the responses that earn the bonus
        out = {f"vars/r_visual_{name}": float(getattr(ok, name)()) if len(ok) else 0.0
               for name in ("mean", "min", "max")}
        out["vars/bonus_mean"] = float((self.p.vars_coef * shaped).mean())
        out.update(self.vas_metrics(batch, mass, "vars"))
        return out

    def vas_metrics(self, batch: RolloutBatch, mass: dict, prefix: str) -> dict[str, float]:
        """VAS over the response tokens and over the user-query tokens (§3.1 leaves U open:
        both are logged; the README reports the response one), overall and per layer."""
        out = {}
        queries = {"response": batch.response_mask.bool(),
                   "query": user_query_mask(batch.token_classes, batch.attention_mask,
                                            batch.response_mask)}
        for name, q in queries.items():
            keep = q.any(1)
            if not keep.any():
                continue
            per_row, per_layer = vas({k: v[keep] for k, v in mass.items()}, q[keep])
            out[f"{prefix}/vas_{name}"] = float(per_row.mean())
            for layer, v in zip(self.layers, per_layer.mean(1).tolist()):
                out[f"{prefix}/vas_{name}_L{layer}"] = v
        return out
