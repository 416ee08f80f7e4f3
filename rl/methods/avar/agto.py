"""AVAR's AGTO (§3.3.2) as a loss the engine runs: L_LM + α·L_img + β·L_sys — the cold
start's objective (`avar.agto_at=cold_start`) or a stage of its own after it (`stage`).

The attention masses on the evidence and system keys are taken *with gradient* from the
kernels' class-mass pass (one indicator-valued attention call per layer; no eager N×N map).
The per-row terms are weighted by `agto_row_weight` (1 / rows of the whole minibatch), so
micro-batches and ranks add up to the minibatch mean.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from kernels import StatsSpec
from rl.algorithms.losses import TokenMeanLoss, sft_loss
import torch

from rl.methods.avar.scores import (N_CLASSES, AgtoConfig, agto_loss, check_classes, key_classes,
                            user_query_mask)
from rl.engine.base import LossOut
from rl.engine.frozen import token_logprobs

log = logging.getLogger(__name__)


@dataclass
class AgtoLoss(TokenMeanLoss):
    cfg: AgtoConfig = AgtoConfig()

    def __call__(self, model, b, temperature) -> LossOut:
        agto = self.cfg
        cap = model.attention(agto.layers, StatsSpec(n_classes=N_CLASSES), grad_mass=True)
        with cap(key_classes=b["key_classes"]) as captured:
            lp, _ = token_logprobs(model.logits(b)[0], b["input_ids"], temperature, False)
        lm = sft_loss(lp, b["response_mask"], self.normaliser)
        l_img, l_sys = agto_loss(captured.grad_mass, b["query_mask"], b["key_classes"], agto.eps)
        w = b["agto_row_weight"].to(l_img.dtype)
        value = lm + agto.alpha * (w * l_img).sum() + agto.beta * (w * l_sys).sum()
        metrics = {"lm_nll": float(-(lp * b["response_mask"]).sum() / b["response_mask"].sum()),
                   "agto_img": float(l_img.mean()), "agto_sys": float(l_sys.mean())}
        n = float(b["response_mask"].sum())
        return LossOut(value, metrics, {k: n for k in metrics})


def agto_inputs(batch: dict, agto: AgtoConfig) -> dict:
    """What AGTO reads besides the tokens: AVAR key classes, the user-turn queries Q, and a
    per-row weight that makes the terms a mean over the whole minibatch."""
    tc = batch.pop("token_classes")
    kc = key_classes(tc, agto.evidence, agto.system, batch["attention_mask"])
    check_classes(kc, "avar=agto")
    return {"key_classes": kc,
            "query_mask": user_query_mask(tc, batch["attention_mask"], batch["response_mask"], kc),
            "agto_row_weight": torch.full((len(tc),), 1.0 / len(tc))}


def agto_objective(agto: AgtoConfig):
    """AGTO as an SFT objective (rl.methods.base.ColdStartObjective): the loss, its inputs and
    what makes its checkpoints differ."""
    from rl.methods.base import ColdStartObjective

    return ColdStartObjective(AgtoLoss(cfg=agto), lambda batch: agto_inputs(batch, agto), asdict(agto))


def run_agto_stage(cfg, agto: AgtoConfig, policy: str, progress: bool) -> str:
    """`avar.agto_at=stage`: AGTO as a short SFT stage of its own (`avar.agto_stage`) from the
    policy the cold start made — the authors' setting (a trained VLM at lr 1e-5), where the
    cold-start objective (`agto_at=cold_start`) starts from random weights at the cold start's
    rate. Cached under `<cache>/agto_stage-<hash of the start, schedule and objective>`."""
    from rl.loop.cold_start import config_hash, model_key, reusable, sft_stage, sft_task_params

    schedule = cfg.avar.agto_stage
    params = sft_task_params(cfg)
    objective = agto_objective(agto)
    final = Path(cfg.cache_dir) / ("agto_stage-" + config_hash(
        str(Path(policy).resolve()), model_key(cfg.model), cfg.task.name, params, cfg.task.seed,
        schedule, objective.key))
    if reusable(final):
        log.info("AGTO stage: reusing %s", final)
        return str(final)
    log.info("AGTO stage: %d steps at lr %g from %s (α=%g, β=%g, system=%s)", schedule.steps,
             schedule.lr, policy, agto.alpha, agto.beta, agto.system)
    return sft_stage(cfg, policy, schedule, params, objective, final, "agto_stage", progress)
