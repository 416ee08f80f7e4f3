"""benchmarks/gpu_check.sh on this CPU machine, as real processes (no GPU here):

  - without CUDA the GPU check stops at once, loudly, naming CUDA and what to run instead;
  - `--dry-run` runs every stage's code on CPU at tiny sizes (the kernel tests' subset under
    Triton's interpreter, the hook tests, attention numerics against float64, the benchmark,
    the DeepSpeed learner, two DeepSpeed ranks with LOCAL_RANK 0 and 1 over gloo), judges each
    one and exits 0.

The dry run takes ~1.5 min alone on 2 cores (far longer on a loaded machine: hence the
timeout); it is what lets the one-shot GPU run be trusted to get through every stage.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["0 preflight", "1 kernel tests", "2 hook tests", "3 attention numerics",
          "4 benchmark", "5 learner", "6 two ranks"]


def run(*args: str, timeout: float, out: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable  # the interpreter running these tests (torch, DeepSpeed)
    if out is not None:
        env["OUT"] = str(out)  # the stages' logs: $OUT/gpu_check_logs
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - t0


@pytest.mark.timeout(120)
def test_without_cuda_the_gpu_check_stops_at_once_naming_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    proc, seconds = run(timeout=100)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert seconds < 30, f"took {seconds:.0f} s to say CUDA is missing"  # ~3 s unloaded
    assert "GPU CHECK CANNOT RUN" in out
    assert re.search(r"- CUDA: .*no CUDA GPU", out), out
    assert "--dry-run" in out  # what to run without a GPU
    assert "== 1" not in out  # no stage started


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dry_run_exercises_and_judges_every_stage(tmp_path):
    proc, seconds = run("--dry-run", timeout=850, out=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out[out.index("== GPU check summary"):]
    rows = dict(re.findall(r"^(\d [^\n]*?)\s+(PASS|FAIL)\s+\d+s", summary, re.M))
    for stage in STAGES:  # every stage ran and was judged, PASS, in the summary table
        assert [v for k, v in rows.items() if k.startswith(stage)] == ["PASS"], (stage, summary)
    assert len(rows) == len(STAGES), summary
    assert "OVERALL: PASS (7 stages)" in summary
    # the judged figures were printed with their thresholds
    assert re.search(r"^PASS  \S+ bf16 dq error.*want <=", out, re.M)
    assert re.search(r"^PASS  logprobs, kernels vs sdpa: max \|Δ\|.*want <=", out, re.M)
    assert re.search(r"^PASS  optimizer state after offload \+ reload", out, re.M)
    assert re.search(r"^PASS  rank 1 \(LOCAL_RANK=1\) stepped on", out, re.M)
    assert re.search(r"^PASS  global grad norm vs one process", out, re.M)
    logs = {p.name for p in (tmp_path / "gpu_check_logs").iterdir()}
    assert {"tests.log", "hook.log", "attention.log", "bench.log", "learner.log", "ranks.log"} <= logs
    print(f"dry run: {seconds:.0f} s")
