"""The pure parts of the soak benchmark (benchmarks/actor_memory.py, benchmarks/soak.py), by
value: the slope, dir_bytes, role naming from process titles. No Ray, no processes."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from actor_memory import RoleBook, dir_bytes, process_kind  # noqa: E402
from soak import growth, last_step, role_order, slope  # noqa: E402


def test_slope_hand_worked():
    # x = 100, 150, 200, 250; y = 10, 12, 13, 17. x̄ = 175, ȳ = 13;
    # Σdx·dy = (-75)(-3) + (-25)(-1) + 25·0 + 75·4 = 550; Σdx² = 2·75² + 2·25² = 12500.
    assert slope([100, 150, 200, 250], [10, 12, 13, 17]) == pytest.approx(550 / 12500)


def test_slope_per_group_intercepts():
    # Two segments, each rising 1 per step, the second restarting 100 lower: within-segment
    # slope 1 (a single line through all four points would read a fall).
    xs, ys = [0, 1, 2, 3], [100, 101, 2, 3]
    assert slope(xs, ys, groups=[0, 0, 1, 1]) == pytest.approx(1.0)
    assert slope(xs, ys) < 0
    assert math.isnan(slope([5, 5], [1, 2]))


def test_growth_within_segments():
    # Segment 0 grows 10 → 14 (+4), segment 1 restarts at 3 and grows to 5 (+2): +6, not 5 − 10.
    assert growth([10, 12, 14, 3, 5], [0, 0, 0, 1, 1]) == 6.0


def test_dir_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "b").write_bytes(b"y" * 234)
    (tmp_path / "sub" / "deeper" / "c").write_bytes(b"")
    os.link(tmp_path / "a", tmp_path / "sub" / "a_hardlink")      # counted once
    os.symlink(tmp_path / "sub" / "b", tmp_path / "b_symlink")    # the link, not its target
    link_size = os.lstat(tmp_path / "b_symlink").st_size
    assert dir_bytes(tmp_path) == 1000 + 234 + link_size
    assert dir_bytes(tmp_path / "missing") == 0


@pytest.mark.parametrize("cmdline, parent_is_driver, kind", [
    (["ray::VLLMEngine.generate", "", ""], False, ("engine", True)),
    (["ray::VLLMEngine"], False, ("engine", True)),
    (["ray::LearnerWorker.call", ""], False, ("learner", True)),
    (["ray::TeacherWorker"], False, ("teacher", True)),
    (["ray::IDLE"], False, ("ray_idle", True)),
    (["ray::DashboardAgent"], False, ("DashboardAgent", False)),
    (["ray::SomeOtherActor.run"], False, ("SomeOtherActor", True)),
    (["/v/bin/python", "-B", "-c",
      "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=40, pipe_handle=42)"],
     True, ("reward_worker", True)),
    (["/v/bin/python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main()"],
     False, ("mp_worker", True)),
    (["/v/bin/python", "-B", "-c", "from multiprocessing.resource_tracker import main;main(39)"],
     True, ("mp_resource_tracker", False)),
    (["/v/lib/site-packages/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=x"], True,
     ("raylet", False)),
    (["/v/lib/site-packages/ray/core/src/ray/gcs/gcs_server", "--log_dir=x"], True,
     ("gcs_server", False)),
    (["/v/bin/python", "-u", "/v/lib/site-packages/ray/_private/log_monitor.py", "--x"], True,
     ("ray_log_monitor", False)),
])
def test_process_kind(cmdline, parent_is_driver, kind):
    assert process_kind(cmdline, parent_is_driver) == kind


def test_roles_stable_and_reused():
    book = RoleBook()
    first = book.assign([(30, "engine", True), (20, "engine", True), (25, "learner", True),
                         (40, "raylet", False), (41, "raylet", False)])
    assert first == {20: "engine0", 30: "engine1", 25: "learner0", 40: "raylet", 41: "raylet1"}
    # engine0 (pid 20) dies and is restarted as pid 50: the new one is engine0 again; a pid
    # that keeps living keeps its role whatever pids come and go around it.
    second = book.assign([(30, "engine", True), (50, "engine", True), (25, "learner", True),
                          (40, "raylet", False), (10, "engine", True)])
    assert second[30] == "engine1" and second[25] == "learner0" and second[40] == "raylet"
    assert {second[10], second[50]} == {"engine0", "engine2"} and second[10] == "engine0"
    # A pooled worker that becomes an actor changes kind, so it changes role.
    book = RoleBook()
    assert book.assign([(7, "ray_idle", True)]) == {7: "ray_idle0"}
    assert book.assign([(7, "learner", True)]) == {7: "learner0"}


def test_role_order():
    roles = ["raylet", "ray_idle1", "engine10", "driver", "engine2", "learner0", "DashboardAgent"]
    assert sorted(roles, key=role_order) == ["driver", "engine2", "engine10", "learner0", "raylet",
                                             "DashboardAgent", "ray_idle1"]


def test_last_step(tmp_path):
    m = tmp_path / "metrics.jsonl"
    assert last_step(m) is None
    m.write_text('{"step": 0, "eval/accuracy": 0.4}\n{"step": 1, "x": 1.0}\n{"step": 2, "x"')
    assert last_step(m) == 1          # the half-written row is not reached yet
    assert last_step(m, since=m.stat().st_mtime + 10) is None  # rows from before a resume
