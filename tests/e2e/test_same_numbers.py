"""A refactor keeps the numbers: a few seeded steps of each preset give the metrics recorded in
`same_numbers.json` (every metric of metrics.jsonl that is not a time, a throughput or a memory
figure, within the exact-resume tolerance).

The reference was written by the commit before the methods-as-components redesign (issue 24)
and holds every later refactor to the same figures. A change that is *meant* to move a number
(a bug fix, a new default) rewrites it, and says so in its commit:

    SAME_NUMBERS_WRITE=1 .venv/bin/python -m pytest tests/e2e/test_same_numbers.py

The presets are the ones whose code paths the redesign moved: the default run, coupled credit
(attention statistics), LeaF in RL with both terms (teacher actors, KD rows, extra groups),
AVAR's VARS on text and on the tiny VLM (with an AGTO cold start), and async rollouts.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rl.config import register_configs
from rl.loop.trainer import Trainer

CONF = str(Path(__file__).resolve().parents[2] / "conf")
REFERENCE = Path(__file__).with_name("same_numbers.json")
WRITE = os.environ.get("SAME_NUMBERS_WRITE") == "1"
REL, ABS = 1e-5, 1e-7  # the exact-resume tests' tolerance (test_pipeline.py)
register_configs()
pytestmark = pytest.mark.timeout(3600)

SMALL = ["steps=2", "eval_every=2", "save_every=10", "logger=none", "logger.progress=false",
         "task.eval_size=4", "rollout.eval_samples=2", "rollout.max_new_tokens=16",
         "cold_start.steps=12", "cold_start.batch_size=8", "cold_start.warmup_steps=2",
         "algorithm.prompts_per_step=2", "algorithm.n_samples=4", "algorithm.minibatch_size=4",
         "algorithm.lr=1e-3"]
TEACHER = ["teacher.train.steps=12", "teacher.train.batch_size=8", "teacher.train.warmup_steps=2",
           "teacher.topk=8"]
PRESETS = {
    "default": [],
    "coupled": ["credit=coupled", "credit.params.fai_band=[2,100]"],
    "leaf_arith_rl": ["experiment=leaf_arith", "leaf=rl", "leaf.kd_coef=0.1",
                      "leaf.counterfactual_groups=1",
                      *TEACHER],
    "avar_arith": ["experiment=avar_arith"],
    "avar_image": ["experiment=avar_image", "avar=agto_vars"],
    "async": ["rollout.async_steps=1", "algorithm.tis_cap=2.0"],
}


def compared(row: dict) -> dict:
    """The metrics a refactor must keep: not times, throughputs or memory."""
    return {k: v for k, v in row.items()
            if not (k.startswith(("time/", "perf/")) or k.endswith("_s") or "tokens_per_s" in k
                    or k.startswith("colocate/"))}


def run_preset(name: str, out: Path, cache: str) -> dict[str, dict]:
    overrides = [f"output_dir={out}", f"cache_dir={cache}", *SMALL, *PRESETS[name]]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {str(r["step"]): compared(r) for r in rows}


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == pytest.approx(b, rel=REL, abs=ABS)
    return a == b


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    """This module's own cache: its cold starts are trained by its presets, in its order. (A
    cold start cached by another test under the same key can differ in the last float bits: a
    run whose methods read attention statistics trains it with padded rows, one that reads none
    with packed rows.)"""
    return str(tmp_path_factory.mktemp("same_numbers_cache"))


@pytest.fixture(scope="module")
def reference():
    if WRITE:
        table: dict = {}
        yield table
        REFERENCE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    else:
        yield json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_few_seeded_steps_give_the_recorded_metrics(name, reference, ray_session,
                                                      tmp_path_factory, own_cache):
    got = run_preset(name, tmp_path_factory.mktemp(name), own_cache)
    if WRITE:
        reference[name] = got
        return
    want = reference[name]
    assert sorted(got) == sorted(want), "logged steps"
    for step, row in want.items():
        assert sorted(got[step]) == sorted(row), f"step {step}: metric names"
        wrong = {k: (got[step][k], v) for k, v in row.items() if not same(got[step][k], v)}
        assert not wrong, f"{name}, step {step}: (now, recorded) {wrong}"
