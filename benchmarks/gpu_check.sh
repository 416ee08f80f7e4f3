#!/usr/bin/env bash
# The one prepared GPU check for kernels/ (see kernels/README.md), for a CUDA machine
# with no internet (written for an H200 with torch 2.11 + triton 3.6; also fine on 3.9):
#   1. the kernel tests on CUDA: real Triton kernels against the float64 reference,
#      bf16 included (the interpreter cannot do bf16), pinned forward tiling;
#   2. the transformers hook tests with the Triton path on the GPU;
#   3. the benchmark at d128 (32 query / 8 kv heads, bf16, N = 1k..16k), autotuned,
#      with the spec's speed budgets printed as PASS/FAIL;
#   4. the learner on the GPU (benchmarks/gpu_learner_check.py): DeepSpeed with a
#      Qwen3-0.6B-shaped model (random weights), our kernels inside training (speed, peak
#      memory, bf16 logprobs against sdpa, the statistics pass's cost), the learner side of the
#      bucketed weight transport, and the colocated mode's offload/reload of optimizer state.
#      DeepSpeed is installed from benchmarks/gpu_wheels/ when missing (bash
#      benchmarks/gpu_wheels.sh prepares it on a machine with pip access).
# Not covered (no vLLM or Ray there): vLLM on CUDA, NCCL/IPC into vLLM, sleep/wake.
# Each stage has its own timeout; worst case ~8 min. Usage:
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
LOG=${OUT:-/tmp}/gpu_check_logs
mkdir -p "$LOG"

echo "== environment"
$PY - <<'EOF' || { echo "no usable torch/triton/CUDA: stop"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "CUDA not available"
print(f"torch {torch.__version__}  triton {triton.__version__}  {torch.cuda.get_device_name()}  "
      f"python {__import__('sys').version.split()[0]}")
EOF

XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi  # parallel Triton compiles
# --confcutdir: only tests/kernels/conftest.py is loaded (the project's root conftest may
# import packages this machine lacks); -p no:cacheprovider: write nothing into the tree.
PYTEST="$PY -m pytest -q -rfE -p no:cacheprovider --confcutdir=tests/kernels"

echo "== 1. kernel tests on CUDA (timeout 200 s)"
KERNELS_AUTOTUNE=0 timeout 200 $PYTEST $XDIST tests/kernels/test_kernel_triton.py \
    tests/kernels/test_kernel_blockwise.py tests/kernels/test_kernel_reference.py >"$LOG/tests.log" 2>&1
t_rc=$?
tail -n 30 "$LOG/tests.log"

echo "== 2. hook tests, Triton on the GPU (timeout 45 s)"
KERNELS_AUTOTUNE=0 timeout 45 $PYTEST tests/kernels/test_kernel_hf_hook.py >"$LOG/hook.log" 2>&1
h_rc=$?
tail -n 15 "$LOG/hook.log"

echo "== 3. benchmark d128 bf16 (timeout 120 s)"
timeout 120 $PY benchmarks/bench_attention.py --device cuda --head-dim 128 --heads 32 --kv-heads 8 \
    --dtype bfloat16 --seqlens 1024,2048,4096,8192,16384 --reps 10 --max-eager-n 8192 2>&1 | tee "$LOG/bench.log"
b_rc=${PIPESTATUS[0]}

echo "== 4. the learner on the GPU (timeout 110 s)"
if ! $PY -c "import deepspeed" 2>/dev/null && ls benchmarks/gpu_wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site benchmarks/gpu_wheels/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
KERNELS_AUTOTUNE=0 timeout 110 $PY benchmarks/gpu_learner_check.py 2>&1 | tee "$LOG/learner.log"
l_rc=${PIPESTATUS[0]}

echo
echo "== GPU check summary"
printf "%-44s %s\n" "kernel tests (CUDA, bf16 included) rc=$t_rc" "$(grep -E '(passed|failed|error)' "$LOG/tests.log" | tail -n 1)"
printf "%-44s %s\n" "hook tests (Triton on GPU) rc=$h_rc" "$(grep -E '(passed|failed|error)' "$LOG/hook.log" | tail -n 1)"
printf "%-44s %s\n" "benchmark rc=$b_rc" "$(grep -cE 'PASS' "$LOG/bench.log") PASS, $(grep -cE 'FAIL' "$LOG/bench.log") FAIL"
grep -E 'PASS|FAIL' "$LOG/bench.log" || true
printf "%-44s %s\n" "learner check rc=$l_rc" "$(grep -c . "$LOG/learner.log") lines (table above)"
[ $t_rc -eq 0 ] && [ $h_rc -eq 0 ] && [ $b_rc -eq 0 ] && [ $l_rc -eq 0 ]
