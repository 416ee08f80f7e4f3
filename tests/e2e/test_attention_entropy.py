"""Attention-entropy reweighting through the whole loop (credit=attention_entropy): the scoring
forward captures the middle layer's entropy, the token weights of the update are γ recomputed
here from it, the schedule runs from anchors (step 1) to explorers (the last step)."""
from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from rl.methods.credit.attention_entropy import entropy_gamma, normalised_entropy
from rl.loop.trainer import Trainer
from tests.e2e.test_same_numbers import CONF, SMALL

pytestmark = pytest.mark.timeout(3600)


def test_attention_entropy_credit_runs_through_the_loop(ray_session, tmp_path, cache_dir, monkeypatch):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"output_dir={tmp_path}", f"cache_dir={cache_dir}", *SMALL, "credit=attention_entropy"])
    seen = []
    advantages = Trainer.advantages

    def recording(self, batch, step, clock):
        out = advantages(self, batch, step, clock)
        seen.append((batch.attn_stats, batch.attention_mask, batch.response_mask.bool(),
                     batch.token_weights.clone()))
        return out

    monkeypatch.setattr(Trainer, "advantages", recording)
    trainer = Trainer(cfg)
    try:
        layers = trainer.methods[-1].layers
        trainer.run()
    finally:
        trainer.close()
    middle = cfg.model.tiny.num_hidden_layers // 2
    assert layers == [middle] == [2]
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    for step, s in ((1, 0.0), (2, 1.0)):
        stats, attention, resp, weights = seen[step - 1]
        assert sorted(stats) == [middle]
        want = entropy_gamma(normalised_entropy(stats[middle]["entropy"], attention), resp, s, 0.5)
        assert torch.allclose(weights, want)
        per_response = (weights * resp).sum(1) / resp.sum(1)
        assert torch.allclose(per_response, torch.ones_like(per_response), atol=1e-6)
        m = rows[step]
        assert m["credit/schedule"] == s and m["credit/gamma_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["credit/anchor_weight_share"] > rows[1]["credit/explorer_weight_share"]
    assert rows[2]["credit/anchor_weight_share"] < rows[2]["credit/explorer_weight_share"]
