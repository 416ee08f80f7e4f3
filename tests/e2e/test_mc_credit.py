"""Monte Carlo credit through the whole loop (credit=mc): the rollout group continues every
stride-th prefix of every response whose advantage is not 0, k times, between rewards and advantages, and the update's
token weights are γ_amp exactly on whole stride blocks whose value moved (a block's tokens share
their Monte Carlo advantage). The values themselves are checked by value in
tests/unit/test_credit_mc.py and tests/unit/test_mc_values.py."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from rl.loop.trainer import Trainer
from tests.e2e.test_same_numbers import CONF, SMALL

pytestmark = pytest.mark.timeout(3600)
K, STRIDE = 3, 4


def test_mc_credit_runs_through_the_loop(ray_session, tmp_path, cache_dir, monkeypatch):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"output_dir={tmp_path}", f"cache_dir={cache_dir}", *SMALL, "credit=mc",
            f"credit.params.k={K}", f"credit.params.stride={STRIDE}",
            # one-digit sums, which a short cold start gets right some of the time: groups with
            # both outcomes, so advantages that are not 0 and values that move
            "task.params.digits=1", "cold_start.steps=60"])
    seen = []
    advantages = Trainer.advantages

    def recording(self, batch, step, clock):
        out = advantages(self, batch, step, clock)
        seen.append((batch.response_mask.bool(), batch.token_weights.clone(), batch.seq_advantages != 0))
        return out

    monkeypatch.setattr(Trainer, "advantages", recording)
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert sum(int(m.sum()) for _, _, m in seen) > 0  # some responses were continued
    selected_any = False
    for step, (resp, weights, moving) in enumerate(seen, start=1):
        lengths = resp.sum(1).tolist()
        # only responses whose advantage is not 0 are continued, every STRIDE-th prefix K times
        assert rows[step]["credit/continuations"] == K * sum(
            math.ceil(n / STRIDE) for n, m in zip(lengths, moving.tolist()) if m)
        assert weights[~moving].eq(1.0).all()
        assert set(weights[resp].unique().tolist()) <= {1.0, 1.5}
        assert weights[~resp].eq(1.0).all()
        for i, n in enumerate(lengths):
            g = weights[i][resp[i]]
            for start in range(0, n, STRIDE):  # a block is selected whole or not at all
                block = g[start:start + STRIDE]
                assert torch.all(block == block[0]), (step, i, g.tolist())
            selected_any |= bool((g > 1).any())
        assert rows[step]["credit/selected_share"] == pytest.approx(
            (weights[resp] > 1).float().mean().item())
    assert selected_any  # values moved somewhere, and those tokens were amplified
