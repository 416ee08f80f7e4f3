"""launch/slurm.sbatch run for real on this machine, as SLURM would run it on a one-node
allocation: `srun` and `scontrol` are stand-ins that run the command here and record a requeue
(no SLURM on CI), everything else — the Ray head the script starts, its wait for the nodes, the
Hydra command, the SIGTERM it forwards to the driver — is the script's own. Preemption: SIGTERM
to the batch shell (what `#SBATCH --signal=B:TERM@300` sends) → the driver finishes its step,
checkpoints, exits 143 → the script requeues the job; run again, it continues from there."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.ray_processes import free_port, stop_group

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "slurm.sbatch"
pytestmark = pytest.mark.timeout(1200)

SRUN = """#!/bin/bash
# srun stand-in: drop the options, run the command on this machine
while [[ $# -gt 0 && $1 == -* ]]; do case $1 in -w|--nodes|--ntasks) shift 2;; *) shift;; esac; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
# scontrol stand-in: this machine is the allocation; a requeue is recorded
case "$1 $2" in
  "show hostnames") echo localhost ;;
  *) echo "$@" >> "$SCONTROL_LOG" ;;
esac
"""


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def launch(env: dict, args: list[str], log: Path) -> subprocess.Popen:
    # output to a file, as slurm-%j.out: the Ray head left in the background keeps it open
    with open(log, "w") as f:
        return subprocess.Popen(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)  # the script and its Ray head: one group


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        stop_group(proc.pid)
    return log.read_text()


def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    log = tmp_path / "scontrol.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "PATH": f"{shims}:{os.environ['PATH']}", "SCONTROL_LOG": str(log),
           "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "4", "SLURM_GPUS_ON_NODE": "0",
           "VENV": str(Path(sys.executable).parents[1]), "RAY_PORT": str(free_port()),
           "WANDB_MODE": "offline"}
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "logger=none",
            "logger.progress=false", "steps=6", "save_every=100", "eval_every=100",
            "cold_start.steps=4", "cold_start.batch_size=8", "cold_start.warmup_steps=1",
            "task.eval_size=4", "rollout.eval_samples=1", "algorithm.prompts_per_step=2",
            "algorithm.n_samples=4", "algorithm.minibatch_size=4", "rollout.max_new_tokens=16"]

    job = launch(env, args, tmp_path / "slurm-1.out")
    deadline = time.monotonic() + 600
    while not any(r["step"] >= 1 for r in rows(out)):  # RL has started
        assert job.poll() is None and time.monotonic() < deadline, finish(job, tmp_path / "slurm-1.out", 30)[-4000:]
        time.sleep(0.5)
    os.kill(job.pid, signal.SIGTERM)  # the batch shell only, as --signal=B:TERM does
    text = finish(job, tmp_path / "slurm-1.out", 300)
    assert job.returncode == 143, text[-4000:]
    assert "SIGTERM: the driver checkpoints and stops" in text
    assert "stopped by SIGTERM after step" in text
    stopped = max(r["step"] for r in rows(out))
    assert 1 <= stopped < 6
    assert (out / "checkpoints" / f"step_{stopped:06d}").exists()  # save_every=100: the stop's
    assert log.read_text().split() == ["requeue", "4242"]

    env["RAY_PORT"] = str(free_port())
    requeued = launch(env, args, tmp_path / "slurm-2.out")  # the same command, requeued
    text = finish(requeued, tmp_path / "slurm-2.out", 600)
    assert requeued.returncode == 0, text[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:06d}'}" in text
    assert sorted(r["step"] for r in rows(out)) == list(range(0, 7))
    assert log.read_text().split() == ["requeue", "4242"]  # not requeued again
