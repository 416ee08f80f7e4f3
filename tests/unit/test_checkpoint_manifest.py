"""Checkpoint manifests on real files: what is written, what a damaged checkpoint looks like to
the resume check and to `python -m launch.verify`, and that pruning keeps an intact one.
(The same on the real loop's DeepSpeed files: tests/e2e/test_checkpoint_integrity.py.)"""
import json
import logging
import os
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from launch.verify import main as verify_main
from rl.loop import checkpoint as checkpoint_module
from rl.loop.checkpoint import CheckpointDamaged, CheckpointManager
from rl.loop.manifest import MANIFEST, built_by, verify, write_manifest

OPTIM = "ds/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def writer(seed: int):
    """A learner's part of a checkpoint, as real files: torch-saved tensors and an HF config."""
    def write(tmp: Path) -> None:
        g = torch.Generator().manual_seed(seed)
        (tmp / "ds" / "ds").mkdir(parents=True)
        torch.save({"w": torch.randn(64, 64, generator=g)}, tmp / "ds/ds/mp_rank_00_model_states.pt")
        torch.save({"m": torch.randn(128, 64, generator=g)}, tmp / OPTIM)
        (tmp / "hf").mkdir()
        (tmp / "hf" / "config.json").write_text(json.dumps({"seed": seed}))
        (tmp / "rollouts_in_flight.json").write_text("[]")
    return write


def saved(root: Path, steps, keep_last: int = 0) -> CheckpointManager:
    mgr = CheckpointManager(root, keep_last)
    for s in steps:
        mgr.save(s, {"step": s}, writer(s))
    return mgr


def truncate(path: Path, size: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def flip_byte(path: Path, at: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_the_manifest_lists_every_file_with_its_size_and_checksum(tmp_path):
    ckpt = saved(tmp_path, [4]).list()[0]
    m = json.loads((ckpt / MANIFEST).read_text())
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")
                   if p.is_file() and p.name != MANIFEST)
    assert sorted(m["files"]) == files == sorted(
        ["ds/ds/mp_rank_00_model_states.pt", OPTIM, "hf/config.json", "rollouts_in_flight.json",
         "trainer_state.json"])
    for name in files:
        data = (ckpt / name).read_bytes()
        assert m["files"][name] == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    assert (m["step"], m["kind"], m["format"], m["commit"]) == (4, "rl_step", 1, head)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage, file, says", [
    (truncate, OPTIM, f"{OPTIM}: 1000 bytes, the manifest says"),
    (truncate, "hf/config.json", "hf/config.json: 1000 bytes"),  # (grown: a bad copy)
    (flip_byte, "ds/ds/mp_rank_00_model_states.pt", "contents differ from the manifest"),
    (lambda p: p.write_text('{"step": 9}'), "trainer_state.json", "trainer_state.json: 11 bytes"),
    (os.remove, "rollouts_in_flight.json", "rollouts_in_flight.json: missing"),
    (os.remove, MANIFEST, "no manifest.json: its save did not finish"),
    (lambda p: p.write_text("{not json"), MANIFEST, "manifest.json is unreadable"),
])
def test_resume_skips_a_damaged_newest_checkpoint_and_says_why(tmp_path, caplog, damage, file, says):
    mgr = saved(tmp_path, [2, 4])
    newest = mgr.list()[-1]
    damage(newest / file)
    with caplog.at_level(logging.WARNING, logger="rl.loop.checkpoint"):
        assert mgr.newest_intact() == tmp_path / "step_000002"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "step_000004" in skipped[0] and says in skipped[0]
    assert any("resuming from step_000002" in r.getMessage() for r in caplog.records)


def test_every_checkpoint_damaged_is_an_error_naming_the_files(tmp_path):
    mgr = saved(tmp_path, [2, 4])
    truncate(tmp_path / "step_000004" / OPTIM)
    os.remove(tmp_path / "step_000002" / MANIFEST)
    with pytest.raises(CheckpointDamaged) as err:
        mgr.newest_intact()
    msg = str(err.value)
    assert "none of the 2 checkpoints" in msg
    assert f"step_000004: {OPTIM}: 1000 bytes" in msg and "step_000002: no manifest.json" in msg
    assert "python -m launch.verify" in msg


def test_no_checkpoint_is_none_and_a_temp_folder_is_not_a_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    assert mgr.newest_intact() is None
    tmp = tmp_path / ".tmp-step_000006"  # a save killed before its rename
    writer(6)(tmp.mkdir() or tmp)
    assert mgr.list() == [] and mgr.newest_intact() is None


def test_a_manifest_of_another_step_does_not_verify(tmp_path):
    mgr = saved(tmp_path, [2])
    os.rename(tmp_path / "step_000002", tmp_path / "step_000008")
    v = mgr.verify(tmp_path / "step_000008")
    assert not v.intact and "the manifest is of step 2, not step_000008" in v.describe()


def test_fast_mode_checks_large_files_by_size_only(tmp_path):
    ckpt = saved(tmp_path, [2]).list()[0]
    flip_byte(ckpt / OPTIM)  # 33 KB: "large" below a 4 KB threshold
    assert verify(ckpt, "fast", large_bytes=4096).intact
    assert not verify(ckpt, "full", large_bytes=4096).intact
    assert not verify(ckpt, "fast").intact  # under the default 64 MiB: checksummed
    truncate(ckpt / OPTIM)
    assert "1000 bytes" in verify(ckpt, "fast", large_bytes=4096).describe()


def test_keep_last_prunes_only_after_the_new_checkpoint_verified(tmp_path, monkeypatch, caplog):
    mgr = saved(tmp_path, [1, 2, 3], keep_last=2)
    assert [p.name for p in mgr.list()] == ["step_000002", "step_000003"]
    write_manifest = checkpoint_module.write_manifest

    def disk_loses_data_after_the_manifest(folder, kind, step):
        out = write_manifest(folder, kind, step)
        truncate(Path(folder) / OPTIM)
        return out

    monkeypatch.setattr(checkpoint_module, "write_manifest", disk_loses_data_after_the_manifest)
    with caplog.at_level(logging.ERROR, logger="rl.loop.checkpoint"):
        mgr.save(4, {"step": 4}, writer(4))
    assert [p.name for p in mgr.list()] == ["step_000002", "step_000003", "step_000004"]
    assert any("does not verify right after it was written" in r.getMessage() for r in caplog.records)
    assert mgr.newest_intact() == tmp_path / "step_000003"
    monkeypatch.setattr(checkpoint_module, "write_manifest", write_manifest)
    mgr.save(5, {"step": 5}, writer(5))  # intact again: pruned to the newest two
    assert [p.name for p in mgr.list()] == ["step_000004", "step_000005"]


def test_save_reports_the_cost_of_each_part(tmp_path):
    _, times = CheckpointManager(tmp_path).save(1, {"step": 1}, writer(1))
    assert set(times) == {"write_s", "manifest_s", "verify_s"}
    assert all(0 < t < 60 for t in times.values())


def test_the_verify_command(tmp_path, capsys):
    saved(tmp_path / "checkpoints", [2, 4])
    assert verify_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("intact ") == 2 and "resume=true continues from" in out and "step_000004" in out
    truncate(tmp_path / "checkpoints" / "step_000004" / OPTIM)
    assert verify_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "step_000004  DAMAGED" in out and f"{OPTIM}: 1000 bytes" in out
    assert out.strip().endswith(f"resume=true continues from {tmp_path / 'checkpoints' / 'step_000002'}")
    assert verify_main([str(tmp_path / "checkpoints" / "step_000002"), "--fast"]) == 0
    os.remove(tmp_path / "checkpoints" / "step_000002" / MANIFEST)
    assert verify_main([str(tmp_path / "checkpoints")]) == 2
    assert "no intact checkpoint" in capsys.readouterr().out
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert verify_main([str(tmp_path / "empty")]) == 2
    assert "resume=true starts fresh" in capsys.readouterr().out


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside_until_its_own_first(tmp_path):
    """Without this, a fresh run's step 5 would be pruned by keep-last in favour of the
    earlier run's steps 10 and 20, and a later resume would continue the earlier run."""
    saved(tmp_path, [10, 20])
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.set_aside() == 2
    assert mgr.list() == [] and mgr.newest_intact() is None
    aside = tmp_path / ".earlier-run"
    assert sorted(p.name for p in aside.iterdir()) == ["step_000010", "step_000020"]
    assert verify(aside / "step_000020").intact  # moved whole: can be moved back
    mgr.save(5, {"step": 5}, writer(5))
    assert [p.name for p in mgr.list()] == ["step_000005"] and not aside.exists()
    assert mgr.newest_intact() == tmp_path / "step_000005"
    assert mgr.set_aside() == 1 and mgr.list() == []


def test_a_cached_model_carries_a_manifest_and_a_damaged_one_is_built_again(tmp_path, caplog):
    from rl.loop.cold_start import atomic_dir

    builds = []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        writer(len(builds))(tmp)

    final = tmp_path / "cold_start-abc"
    assert atomic_dir(final, build) == final and len(builds) == 1
    m = json.loads((final / MANIFEST).read_text())
    assert m["kind"] == "cold_start" and m["step"] is None and verify(final).intact
    atomic_dir(final, build)
    assert len(builds) == 1  # intact: reused
    truncate(final / "hf" / "config.json", 3)
    with caplog.at_level(logging.WARNING, logger="rl.loop.cold_start"):
        atomic_dir(final, build)
    assert len(builds) == 2 and verify(final).intact
    assert any("is damaged (hf/config.json: 3 bytes" in r.getMessage() for r in caplog.records)
    os.remove(final / MANIFEST)  # cached before manifests existed: used as it is
    atomic_dir(final, build)
    assert len(builds) == 2


def test_built_by_names_the_commit_that_wrote_a_cached_model(tmp_path):
    model = tmp_path / "cold_start-abc"
    model.mkdir()
    (model / "config.json").write_text("{}")
    write_manifest(model, "cold_start", None)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True).stdout.strip()
    got = built_by(model)
    assert got["commit"] == head and len(head) == 40
    assert got["written_at"] == json.loads((model / MANIFEST).read_text())["written_at"]
    # a folder the user gives has no manifest: nothing to say, not an error
    given = tmp_path / "hf_model"
    given.mkdir()
    assert built_by(given) is None
