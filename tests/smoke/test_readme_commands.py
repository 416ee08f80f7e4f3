"""Every command the README shows runs, shortened, on the real stack (tests/smoke/readme.py).

The commands run in README order, from one scratch folder that stands in for the repository
root (`outputs/` lands there; `data/` links to the shipped samples), so a `resume=true` line
continues the run above it and `launch.inspect` reads what the runs wrote — as for a user who
pastes them one after the other. What a run printed is checked against what it saved.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.smoke.readme import README, ROOT, SHORTEN, Command, commands

COMMANDS = commands()
SUMMARY = re.compile(
    r"=== (?P<name>\S+) seed=(?P<seed>\d+): (?P<steps>\d+) RL steps on task '(?P<task>\w+)' ===\n"
    r"held-out accuracy, cold-start model : (?P<cold>[\d.]+) greedy, (?P<cold_s>[\d.]+) sampled\n"
    r"held-out accuracy, final policy     : (?P<final>[\d.]+) greedy, (?P<final_s>[\d.]+) sampled\n"
    r"credit '(?P<credit>\w+)'.*\n"
    r"(?:LeaF in RL: .*\n)?"
    r"(?:AVAR: VAS \(response tokens\) (?P<vas0>[\d.]+) → (?P<vas1>[\d.]+).*\n)?"
    r".*outputs in (?P<out>\S+)")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("readme")
    (ws / "data").symlink_to(ROOT / "data")
    return ws


def run(cmd: Command, ws: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # as a user's shell: the entry points set what they need
    return subprocess.run(["bash", "-c", cmd.shortened()], cwd=ws, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def sweep_size(cmd: Command) -> int:
    if not cmd.sweep:
        return 1
    sizes = [len(a.split("=", 1)[1].split(",")) for a in cmd.text.split()
             if "=" in a and "," in a.split("=", 1)[1]]
    return math.prod(sizes) if sizes else 1


def group_choice(cmd: Command, group: str) -> str | None:
    for a in cmd.text.split():
        if a.startswith(f"{group}="):
            return a.split("=", 1)[1]
    return None


def check_train_run(job: re.Match, ws: Path, cmd: Command) -> None:
    """What the run printed equals what it saved, and every step really trained."""
    out = ws / job["out"]
    summary = json.loads((out / "summary.json").read_text())
    steps = 3 if "resume=true" in cmd.text.split() else 2
    assert int(job["steps"]) == summary["steps"] == steps
    for key, printed in (("cold_start_accuracy", "cold"), ("cold_start_accuracy_sampled", "cold_s"),
                         ("final_accuracy", "final"), ("final_accuracy_sampled", "final_s")):
        assert f"{summary[key]:.3f}" == job[printed], key
    if job["vas0"] is not None:  # AVAR's VAS, printed as saved
        assert f"{summary['cold_start_vas']:.2f}" == job["vas0"]
        assert f"{summary['final_vas']:.2f}" == job["vas1"]
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == list(range(steps + 1))
    assert rows[steps]["eval/accuracy"] == summary["final_accuracy"]
    assert rows[0]["eval/accuracy"] == summary["cold_start_accuracy"]
    saved = OmegaConf.load(out / "config.yaml")  # the run writes the config it ran
    moved = False  # has the policy left the cold start (so a KL term has a gradient)?
    for s in range(1, steps + 1):
        r = rows[s]
        assert r["train/skipped"] == 0, s
        # A step has a gradient exactly when its batch carries a signal: a group of samples
        # with unequal rewards, or a KL term once the policy has moved off the reference.
        signal = (r["rollout/mixed_groups"] > 0 or (saved.algorithm.kl_coef > 0 and moved)
                  or r.get("leaf/kd_rows", 0) > 0)  # LeaF's KD rows: a KL to the teacher
        assert math.isfinite(r["train/grad_norm"]) and (r["train/grad_norm"] > 0) == signal, s
        moved |= signal
        # The engines sample with the weights the learner scores with (float32).
        assert r["rollout/logprob_gap"] < 1e-3, s
    for a in cmd.text.split():  # the README's own key=value settings reached the run
        key, eq, value = a.partition("=")
        if eq and "." in key and "," not in value and key.split(".")[0] not in ("task", "model") \
                and not any(s.startswith(key + "=") for s in SHORTEN):
            assert str(OmegaConf.select(saved, key)).lower() == value.lower(), a
    if (task := group_choice(cmd, "task")) is not None:
        assert job["task"] == saved.task.name == task


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id() for c in COMMANDS])
def test_readme_command(cmd: Command, workspace: Path):
    proc = run(cmd, workspace)
    log = proc.stdout
    tail = f"\n--- `{cmd.shortened()}` (README line {cmd.line}) printed:\n{log[-6000:]}"
    if cmd.gpu_only:
        # No GPU or model folder here: it must stop before any actor, naming the missing file.
        assert proc.returncode != 0, tail
        missing = next(a.split("=", 1)[1] for a in cmd.text.split() if "=/" in a)
        assert missing in log and "actors" not in log, tail
        return
    assert proc.returncode == 0, tail
    if cmd.entry == "launch.train":
        jobs = list(SUMMARY.finditer(log))
        assert len(jobs) == sweep_size(cmd), tail
        for job in jobs:
            check_train_run(job, workspace, cmd)
        if "resume=true" in cmd.text.split():
            assert "resumed from" in log, tail
    elif cmd.entry == "launch.sft":
        path = Path(re.search(r"cold-start checkpoint: (\S+)", log)[1])
        path = path if path.is_absolute() else workspace / path
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file(), tail
    elif cmd.entry == "launch.distill":
        path = Path(re.search(r"distilled checkpoint \(\w+\): (\S+)", log)[1])
        path = path if path.is_absolute() else workspace / path
        report = json.loads((path / "leaf_report.json").read_text())
        assert (path / "model.safetensors").is_file() and report["distill_steps"] == 2, tail
        if report["mode"].startswith("leaf"):  # detection ran on the student's wrong answers
            assert report["instruction_examples"] == report["student_wrong"], tail
    elif cmd.entry == "launch.inspect":
        args = cmd.text.split()
        out = workspace / (args[args.index("--out") + 1] if "--out" in args else "outputs/inspect")
        n = int(args[args.index("--samples") + 1]) if "--samples" in args else 1
        for i in range(n):
            assert (out / f"sample_{i}.html").stat().st_size > 0, tail
            assert (out / f"sample_{i}.png").read_bytes()[:4] == b"\x89PNG", tail
            if "--teacher" in args:
                assert (out / f"sample_{i}_leaf.png").read_bytes()[:4] == b"\x89PNG", tail
            if "--vas" in args:
                assert (out / f"sample_{i}_avar.png").read_bytes()[:4] == b"\x89PNG", tail
                assert "VAS, response tokens" in (out / f"sample_{i}.html").read_text(), tail
    elif cmd.entry == "launch.verify":  # the runs above it left intact checkpoints
        assert re.search(r"step_\d{6}  intact", log) and "DAMAGED" not in log, tail
        assert "resume=true continues from" in log, tail
    else:
        pytest.fail(f"no check for entry point {cmd.entry}")


def defaults() -> dict[str, str]:
    entries = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "config.yaml"))["defaults"]
    return {k: v for d in entries if isinstance(d, dict) for k, v in d.items()}


@pytest.mark.parametrize("group", ["task", "algorithm", "credit"])
def test_readme_runs_every_preset(group):
    """Each shipped task, algorithm preset and credit strategy is in some README command
    (the default one counts through `make run`, a preset's through `experiment=`), so the
    smoke suite runs every one."""
    shown = {defaults()[group]}
    for c in COMMANDS:
        for a in c.text.split():
            key, _, value = a.partition("=")
            if key == group:
                shown |= set(value.split(","))
            elif key == "experiment":  # a preset's own choice of the group counts too
                for name in value.split(","):
                    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml"))
                    shown |= {d[f"override /{group}"] for d in preset.get("defaults", [])
                              if isinstance(d, dict) and f"override /{group}" in d}
    presets = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
    assert presets <= shown, f"README shows no command with {group}={sorted(presets - shown)}"


def test_readme_runs_every_entry_point_and_make_run_is_launch_train():
    entries = {c.entry for c in COMMANDS}
    assert entries == {f"launch.{p.stem}" for p in (ROOT / "launch").glob("*.py")
                       if "def main" in p.read_text()}
    recipe = (ROOT / "Makefile").read_text().split("\nrun:")[1].splitlines()[1].strip()
    assert recipe == "$(PY) -m launch.train"
    assert any(c.text == "python -m launch.train" for c in COMMANDS)
    assert sum(c.gpu_only for c in COMMANDS) <= 1, "only the GPU example may be left unrun"


def test_parser_reads_continuations_comments_and_sweeps(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("text `python -m launch.train x=1` is prose\n```bash\nmake run   # go\n"
                      "make test\npython -m launch.train a=1 \\\n    b=2   # two lines\n"
                      "python -m launch.train -m seed=0,1 credit=none,coupled\n```\n"
                      "```python\npython -m launch.train no=1\n```\n")
    got = commands(readme)
    assert [(c.text, c.line, c.sweep) for c in got] == [
        ("python -m launch.train", 3, False), ("python -m launch.train a=1 b=2", 5, False),
        ("python -m launch.train -m seed=0,1 credit=none,coupled", 7, True)]
    assert sweep_size(got[2]) == 4
    assert got[1].shortened().endswith(" ".join(SHORTEN))
    assert README.is_file()
