"""Damaged checkpoints on the real loop (Ray, vLLM, DeepSpeed): a resume verifies them in the
driver before any actor starts, continues from the newest intact one — exactly, as if the
run had stopped there — and stops with a clear error when none is intact.

One run writes a checkpoint at every step (1, 2, 3); each test damages a copy of its folder
the way a node lost mid-flush, a full disk or a bad copy would."""
import logging
import shutil
import time
from pathlib import Path

import pytest

from rl.loop.checkpoint import CheckpointDamaged
from rl.loop.trainer import Trainer
from tests.e2e.test_pipeline import make_cfg, metrics, run

pytestmark = pytest.mark.timeout(3600)
OPTIM = "ds/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"
RESUME_EXACT = ("train/loss", "reward/total", "train/grad_norm", "rollout/response_len")


def cfg_for(out: Path, cache_dir, dataset):
    return make_cfg(out, cache_dir, dataset,
                    ["save_every=1", "keep_last=0", "resume=true", "logger=none"])


def truncate(path: Path, size: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.fixture(scope="module")
def every_step_saved(ray_session, tmp_path_factory, dataset, cache_dir):
    """3 steps, a checkpoint after each; started with resume=true in an empty folder (a
    requeued job's first start), which must say that it starts fresh."""
    out = tmp_path_factory.mktemp("saved")
    logger = logging.getLogger("rl.loop.trainer")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        summary, _ = run(cfg_for(out, cache_dir, dataset))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, summary, [r.getMessage() for r in records]


def test_resume_in_an_empty_folder_says_it_starts_fresh(every_step_saved):
    out, summary, messages = every_step_saved
    assert f"resume=true: no checkpoint in {out / 'checkpoints'}, starting fresh" in messages
    assert summary["resumed_from"] is None and summary["steps"] == 3
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "step_000001", "step_000002", "step_000003"]
    assert summary["last_save_manifest_s"] > 0 and summary["last_save_verify_s"] > 0


def test_a_truncated_optimizer_state_is_skipped_and_the_resume_is_exact(
        every_step_saved, tmp_path, dataset, cache_dir, caplog):
    full, _, _ = every_step_saved
    out = tmp_path / "run"
    shutil.copytree(full, out)
    truncate(out / "checkpoints" / "step_000003" / OPTIM)
    with caplog.at_level(logging.WARNING, logger="rl.loop.checkpoint"):
        trainer = Trainer(cfg_for(out, cache_dir, dataset))
    try:
        said = [r.getMessage() for r in caplog.records]
        assert any("step_000003 skipped" in m and f"{OPTIM}: 1000 bytes, the manifest says" in m
                   for m in said), said
        assert "resuming from step_000002, the newest intact checkpoint" in " ".join(said)
        assert trainer.step == 2
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["resumed_from"] == str(out / "checkpoints" / "step_000002")
    a, b = metrics(full), metrics(out)
    assert sorted(b) == [0, 1, 2, 3]
    for key in RESUME_EXACT:
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-5, abs=1e-7), key
    assert b[3]["train/grad_norm"] > 0
    # step 3 written again, whole this time
    assert (out / "checkpoints" / "step_000003" / OPTIM).stat().st_size > 1000


def test_every_checkpoint_damaged_stops_before_any_actor_starts(every_step_saved, tmp_path,
                                                               dataset, cache_dir):
    full, _, _ = every_step_saved
    out = tmp_path / "run"
    shutil.copytree(full, out)
    (out / "placement.json").unlink()  # written once the actors have started
    ckpts = out / "checkpoints"
    truncate(ckpts / "step_000003" / "hf" / "model.safetensors")  # the model weights
    state = ckpts / "step_000002" / "trainer_state.json"  # the trainer state, same size
    state.write_text(state.read_text().replace('"step": 2', '"step": 7'))
    (ckpts / "step_000001" / "manifest.json").unlink()  # a kill during the save
    t0 = time.perf_counter()
    with pytest.raises(CheckpointDamaged) as err:
        Trainer(cfg_for(out, cache_dir, dataset))
    msg = str(err.value)
    assert "none of the 3 checkpoints" in msg
    assert "step_000003: hf/model.safetensors: 1000 bytes, the manifest says" in msg
    assert "step_000002: trainer_state.json: contents differ from the manifest" in msg
    assert "step_000001: no manifest.json" in msg
    assert not (out / "placement.json").exists()
    assert time.perf_counter() - t0 < 60
