"""The vision-language loop on the real stack, one run: the tiny Qwen2.5-VL on image_arith with
2 learner ranks — an AGTO cold start (image keys), vLLM rollouts with images, reward, one
scoring forward that feeds both preplan/anchor credit (credit=coupled) and VARS (image-token
class masses), the update, the weight sync of the whole VLM, and held-out eval with VAS."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rl.methods.avar.scores import EVIDENCE, SYSTEM, key_classes
from rl.config import register_configs
from rl.loop.trainer import Trainer
from tests.e2e.test_pipeline import metrics, record_vars_shaping, safetensors_bytes

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()
pytestmark = pytest.mark.timeout(3600)


def test_vlm_loop_with_agto_vars_and_coupled_credit(ray_session, tmp_path, monkeypatch):
    from rl.methods.credit.preplan_anchor import PreplanAnchorCredit

    shaped = record_vars_shaping(monkeypatch)  # per step: rewards before/after, correct, layers, classes
    gammas = []
    weights = PreplanAnchorCredit.weights

    def recording_weights(self, batch, stats, step):
        out = weights(self, batch, stats, step)
        gammas.append(self.trace.gamma[batch.response_mask].clone())
        return out

    monkeypatch.setattr(PreplanAnchorCredit, "weights", recording_weights)
    overrides = [
        f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
        "model=tiny_vl", "task=image_arith", "task.eval_size=4",
        "steps=2", "eval_every=2", "save_every=10", "logger=none", "logger.progress=false",
        "cold_start.steps=12", "cold_start.batch_size=8", "cold_start.warmup_steps=2",
        "avar=agto_vars", "avar.evidence=image",
        "credit=coupled", "credit.params.fai_band=[2,100]",
        "algorithm.prompts_per_step=2", "algorithm.n_samples=4", "algorithm.minibatch_size=4",
        "rollout.max_new_tokens=24", "learner.num_ranks=2",
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    finally:
        trainer.close()

    from transformers import AutoModelForImageTextToText

    m = metrics(tmp_path / "run")
    vlm_bytes = safetensors_bytes(trainer.policy_init, AutoModelForImageTextToText)  # the whole VLM
    for step in (1, 2):
        # the engines sampled from the learner's weights and the learner saw the engines'
        # pixels: sampler and learner logprobs of the same tokens agree after every sync
        assert m[step]["rollout/logprob_gap_max"] < 1e-2, m[step]["rollout/logprob_gap_max"]
        assert m[step]["train/grad_norm"] > 0 and m[step]["sync/bytes"] == vlm_bytes
        # VARS's share of the step: the statistics pass it reads and its own hooks
        assert m[step]["time/vars_share"] == pytest.approx(
            (m[step]["time/stats_s"] + m[step]["time/vars_s"]) / m[step]["time/step_s"], rel=1e-9)
    assert len(shaped) == 2 and len(gammas) == 2
    for before, after, correct, layers, classes in shaped:
        bonus = after - before
        kc = key_classes(classes, "image")
        image_keys, system_keys = (kc == EVIDENCE).sum(1), (kc == SYSTEM).sum(1)
        assert layers == [0, 1, 2, 3]
        # 5 image tokens per prompt (140 × 28 pixels), the instruction's 30 characters
        assert image_keys.tolist() == [5] * 8 and system_keys.tolist() == [30] * 8
        assert (bonus[~correct] == 0).all() and (bonus[correct] > 0).all()
    assert all((g >= 1).all() and (g > 1).any() for g in gammas)
    for step in (0, 2):
        assert m[step]["eval/vas_response"] > 0 and m[step]["eval/vas_query"] > 0
    assert summary["final_vas"] == m[2]["eval/vas_response"]
    assert summary["steps"] == 2
