#!/usr/bin/env bash
# The one prepared GPU check (kernels/, the DeepSpeed learner), for one CUDA GPU with no internet
# (written for the lent H100/H200: torch 2.11 + CUDA, Triton 3.6, transformers 5.17, Python 3.12,
# no DeepSpeed/vLLM/Ray). It JUDGES: every stage ends PASS or FAIL against stated thresholds,
# a summary table lists them, and the exit status is 0 only when every stage passed.
#   0. preflight: the GPU and the versions (printed), and everything the stages need; anything
#      missing stops the check at once, naming it and the command that prepares it;
#   1. the kernel tests on CUDA: real Triton kernels against the float64 reference, bf16
#      included (the interpreter cannot do bf16), pinned forward tiling;
#   2. the transformers hook tests with the Triton path on the GPU;
#   3. attention numerics: our bf16 attention (out, dq, dk, dv) vs torch's own bf16 SDPA, both
#      against float64 (benchmarks/gpu_learner_check.py --part attention);
#   4. the benchmark at d128 (32 query / 8 kv heads, bf16), autotuned, judged against the
#      kernel spec's speed budgets (its PASS/FAIL lines);
#   5. the learner (gpu_learner_check.py --part learner): DeepSpeed ZeRO-2 on a Qwen3-0.6B-shaped
#      model (random weights) with our kernels: speed, peak memory, bf16 logprobs vs sdpa, the
#      statistics pass, the bucketed transport's round trip, offload/reload (bytes freed, state
#      intact, finite loss after);
#   6. two learner ranks on ONE GPU, the second with LOCAL_RANK=1 (benchmarks/gpu_two_ranks.py):
#      both take a data-parallel step (gloo, ZeRO-0) and agree as data parallelism must.
# The thresholds live in one place: THRESHOLDS in benchmarks/gpu_learner_check.py (the benchmark's
# speed budgets in bench_attention.py's report()).
# Not covered (no vLLM or Ray there): vLLM on CUDA, NCCL/IPC into vLLM, sleep/wake.
#
# Preparation (DeepSpeed is not on the lent machine and nothing can be fetched there):
#   bash benchmarks/gpu_wheels.sh     # on a machine with pip access: benchmarks/gpu_wheels/ (~5 MiB)
# then bring benchmarks/gpu_wheels/ along (it is git-ignored; device tool: carry
# ["benchmarks/gpu_wheels"]). The check installs them into a temporary folder when DeepSpeed is
# not importable. Also needed there: torch with CUDA, triton, transformers, pytest
# (pytest-xdist optional).
#
# Usage:
#   bash benchmarks/gpu_check.sh            # on the GPU machine; < 8 min worst case (each stage's
#                                           # timeout below, and one overall deadline)
#   bash benchmarks/gpu_check.sh --dry-run  # on CPU: every stage's code at tiny sizes (~1.5 min)
# Interpreter: $PYTHON, else .venv/bin/python when it exists, else python3. Logs: $OUT/gpu_check_logs
# when OUT is set, else a fresh /tmp/gpu_check_logs.* folder.
set -u
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (--dry-run, --help)" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
unset TRITON_INTERPRET  # real Triton on the GPU (in the dry run tests/kernels/conftest.py sets it)
WHEELS=benchmarks/gpu_wheels
SITE=${TMPDIR:-/tmp}/gpu_check_site

# --- time: each stage's own timeout, and all of them inside one deadline ---------------------------
# GPU: 15 (preflight) + 20 (pip install) + 20 (import deepspeed) + 140 + 25 + 25 + 65 + 90 + 60
# = 460 s of timeouts, and each is capped by what is left before the deadline (465 s, kill grace
# included), so the whole check ends by then whatever runs long: < 8 min on one H100.
if [ $DRY -eq 1 ]; then
    DEADLINE=500
    T_PRE=60 T_INSTALL=60 T_IMPORT=60 T_KERNEL=120 T_HOOK=90 T_ATTN=90 T_BENCH=90 T_LEARNER=150 T_RANKS=150
else
    DEADLINE=465
    T_PRE=15 T_INSTALL=20 T_IMPORT=20 T_KERNEL=140 T_HOOK=25 T_ATTN=25 T_BENCH=65 T_LEARNER=90 T_RANKS=60
fi
START=$SECONDS
budget() {  # the stage's own timeout, or what is left before the deadline if that is less
    local left=$((DEADLINE - (SECONDS - START) - 3))
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# --- the summary's rows --------------------------------------------------------------------------
NAMES=() RESULTS=() TIMES=() NOTES=()
record() { NAMES+=("$1"); RESULTS+=("$2"); TIMES+=("$3"); NOTES+=("$4"); }
why_rc() {  # what a stage's exit status says, for the summary
    case $1 in
        0) echo "" ;;
        124|137) echo "TIMED OUT after $2 s; " ;;
        *) echo "exit status $1; " ;;
    esac
}

loud() {  # a precondition is missing: say what and how to prepare it, stop
    {
        echo
        echo "##########################################################################################"
        echo "GPU CHECK CANNOT RUN ($([ $DRY -eq 1 ] && echo dry run || echo GPU mode), python: $PY)."
        echo "Missing:"
        printf '%s\n' "$@"
        echo "Nothing was checked. Preparation and usage: bash benchmarks/gpu_check.sh --help"
        echo "##########################################################################################"
    } >&2
    exit 2
}

if ! command -v "$PY" >/dev/null 2>&1; then
    loud "  - a Python interpreter: '$PY' does not exist" \
         "      fix: PYTHON=/path/to/python bash benchmarks/gpu_check.sh (one with torch, CUDA, triton)"
fi

echo "== gpu_check.sh $([ $DRY -eq 1 ] && echo '--dry-run (CPU, tiny sizes: exercises every stage, says nothing about a GPU)' || echo '(GPU)')"

# --- 0. preflight: what runs it, and what the stages need ------------------------------------------
echo "== 0. preflight (timeout $T_PRE s)"
t0=$SECONDS
PRE=$(timeout -k 2 "$(budget $T_PRE)" "$PY" - "$DRY" "$WHEELS" 2>&1 <<'PREFLIGHT'
import glob, importlib.util, os, platform, shutil, subprocess, sys
from importlib.metadata import version
dry = sys.argv[1] == "1"
wheels = sys.argv[2]
missing = []  # (what, fix)
def need(mod, fix):
    if importlib.util.find_spec(mod) is None:
        missing.append((f"{mod}: not importable by {sys.executable}", fix))
        return False
    return True
print(f"INFO interpreter {sys.executable}")
print(f"VER python {platform.python_version()}")
if need("torch", "install PyTorch (with CUDA on the GPU machine): pip install torch"
                 + ("" if dry else "; without torch CUDA cannot even be looked for")):
    import torch
    cuda = torch.version.cuda
    print(f"VER torch {torch.__version__}")
    print(f"VER CUDA {cuda or 'none (CPU-only torch)'}")
    if not dry:
        if not torch.cuda.is_available():
            missing.append((f"CUDA: torch {torch.__version__} sees no CUDA GPU ("
                            + ("a CPU-only build of torch" if cuda is None else
                               "no GPU or driver visible: nvidia-smi?") + ")",
                            "run this on a machine with a CUDA GPU and torch built for CUDA; "
                            "without one: bash benchmarks/gpu_check.sh --dry-run"))
        else:
            p = torch.cuda.get_device_properties(0)
            print(f"GPU {p.name}, {p.total_memory / 2**30:.1f} GiB")
            print(f"INFO compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                  f"{torch.cuda.device_count()} GPU(s) visible")
            if shutil.which("nvidia-smi"):
                r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=5)
                print(f"INFO driver {(r.stdout.strip().splitlines() or ['?'])[0]}")
if need("triton", "install Triton (it comes with CUDA builds of torch): pip install triton"):
    print(f"VER triton {version('triton')}")
if need("transformers", "pip install transformers"):
    print(f"VER transformers {version('transformers')}")
need("pytest", "pip install pytest  (stages 1 and 2 run the kernel tests)")
if importlib.util.find_spec("xdist") is None:
    print("INFO pytest-xdist not installed: the kernel tests run in one process")
if importlib.util.find_spec("deepspeed") is not None:
    print(f"VER deepspeed {version('deepspeed')}")
elif glob.glob(os.path.join(wheels, "deepspeed-*.whl")):
    print(f"INSTALL deepspeed from {wheels}/")
else:
    missing.append((f"deepspeed: not importable by {sys.executable}, and no DeepSpeed wheel in "
                    f"{wheels}/ (git-ignored: a clone does not have it)",
                    "bash benchmarks/gpu_wheels.sh on a machine with pip access, then bring "
                    f"{wheels}/ along (device tool: carry [\"{wheels}\"])"))
for what, fix in missing:
    print(f"MISSING   - {what}\nMISSING       fix: {fix}")
PREFLIGHT
)
pre_rc=$?
echo "$PRE" | grep -E '^(INFO|VER|GPU) ' | sed -E 's/^(INFO|VER) //; s/^/   /'
if [ $pre_rc -ne 0 ] || echo "$PRE" | grep -q '^MISSING'; then
    if echo "$PRE" | grep -q '^MISSING'; then
        mapfile -t lines < <(echo "$PRE" | grep '^MISSING' | sed 's/^MISSING//')
    else
        mapfile -t lines < <(echo "  - the preflight itself failed ($(why_rc $pre_rc $T_PRE)output below):";
                             echo "$PRE" | tail -n 20 | sed 's/^/      /')
    fi
    loud "${lines[@]}"
fi

if [ -n "${OUT:-}" ]; then  # the device tool brings $OUT back (at most 8 files: 7 logs here)
    LOG=$OUT/gpu_check_logs
    mkdir -p "$LOG"
else
    LOG=$(mktemp -d /tmp/gpu_check_logs.XXXXXX)
fi
echo "   logs in $LOG"
DS_VER=$(echo "$PRE" | grep '^VER deepspeed' | sed 's/^VER //')
if echo "$PRE" | grep -q '^INSTALL'; then
    echo "   installing DeepSpeed and its wheels from $WHEELS/ into $SITE"
    rm -rf "$SITE"
    if ! timeout -k 2 "$(budget $T_INSTALL)" "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl >"$LOG/install.log" 2>&1; then
        loud "  - DeepSpeed: pip could not install $WHEELS/*.whl:" \
             "$(tail -n 15 "$LOG/install.log" | sed 's/^/      /')" \
             "      fix: rebuild them with bash benchmarks/gpu_wheels.sh (they are for Python 3.12)"
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
if [ $DRY -eq 0 ] || echo "$PRE" | grep -q '^INSTALL'; then
    # importing it for real: a wheel's missing dependency shows here, not in stage 5
    if ! out=$(timeout -k 2 "$(budget $T_IMPORT)" "$PY" -c \
            "import deepspeed; print('DS_VERSION', deepspeed.__version__)" 2>&1); then
        echo "$out" >>"$LOG/install.log"
        loud "  - deepspeed does not import:" \
             "$(echo "$out" | grep -v -i warn | tail -n 12 | sed 's/^/      /')" \
             "      fix: bash benchmarks/gpu_wheels.sh (it lists the wheels DeepSpeed needs) and bring $WHEELS/ along"
    fi
    DS_VER="deepspeed $(echo "$out" | grep '^DS_VERSION' | sed 's/^DS_VERSION //')"
    echo "   $DS_VER imports"
fi
GPU=$(echo "$PRE" | grep '^GPU ' | sed 's/^GPU //')
VERS=$( (echo "$PRE" | grep '^VER ' | grep -v '^VER deepspeed' | sed 's/^VER //'; echo "$DS_VER") |
       grep . | paste -sd ';' - | sed 's/;/, /g')
record "0 preflight" PASS $((SECONDS - t0)) "${GPU:-no GPU (dry run)}"

XDIST=""
if [ $DRY -eq 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi  # parallel Triton compiles
# --confcutdir: only tests/kernels/conftest.py is loaded (the project's root conftest may
# import packages this machine lacks); -p no:cacheprovider: write nothing into the tree.
PYTEST="$PY -m pytest -q -rfE -p no:cacheprovider --confcutdir=tests/kernels"

pytest_stage() {  # name, own timeout, log, pytest arguments...
    local name=$1 own=$2 log=$3 t rc s summary
    shift 3
    t=$(budget "$own")
    echo "== $name (timeout $t s)"
    s=$SECONDS
    if [ "$t" -lt 5 ]; then record "$name" FAIL 0 "no time left before the deadline"; return; fi
    KERNELS_AUTOTUNE=0 timeout -k 2 "$t" $PYTEST "$@" >"$log" 2>&1
    rc=$?
    tail -n 15 "$log"
    summary=$(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    if [ $rc -eq 0 ] && echo "$summary" | grep -q 'passed'; then
        record "$name" PASS $((SECONDS - s)) "$summary"
    else
        record "$name" FAIL $((SECONDS - s)) "$(why_rc $rc "$t")${summary:-no pytest summary}"
    fi
}

py_stage() {  # name, own timeout, log, title of the table's last line, command...
    local name=$1 own=$2 log=$3 title=$4 t rc s verdicts
    shift 4
    t=$(budget "$own")
    echo "== $name (timeout $t s)"
    s=$SECONDS
    if [ "$t" -lt 5 ]; then record "$name" FAIL 0 "no time left before the deadline"; return; fi
    KERNELS_AUTOTUNE=0 timeout -k 2 "$t" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    verdicts=$(grep -E "^$title: [0-9]+ PASS" "$log" | tail -n 1 | sed "s/^$title: //")
    if [ $rc -eq 0 ] && [ -n "$verdicts" ]; then
        record "$name" PASS $((SECONDS - s)) "$verdicts"
    else
        record "$name" FAIL $((SECONDS - s)) "$(why_rc $rc "$t")${verdicts:-no verdicts (crashed?)}"
    fi
}

KTESTS="tests/kernels/test_kernel_triton.py tests/kernels/test_kernel_blockwise.py tests/kernels/test_kernel_reference.py"
if [ $DRY -eq 1 ]; then
    # CPU: Triton's interpreter (float32/16 only), a few tests of each file; all are collected
    pytest_stage "1 kernel tests (interpreter, subset)" $T_KERNEL "$LOG/tests.log" $KTESTS \
        -k "bf16 or reference_output or no_stats_spec"
    pytest_stage "2 hook tests (subset)" $T_HOOK "$LOG/hook.log" tests/kernels/test_kernel_hf_hook.py \
        -k "triton"
    py_stage "3 attention numerics vs float64 (CPU)" $T_ATTN "$LOG/attention.log" "attention numerics" \
        "$PY" benchmarks/gpu_learner_check.py --device cpu --part attention
    BENCH=(--device cpu --head-dim 32 --heads 2 --kv-heads 1 --dtype float32 --seqlens 1024
           --reps 1 --max-eager-n 1024)
else
    pytest_stage "1 kernel tests (CUDA, bf16 included)" $T_KERNEL "$LOG/tests.log" $XDIST $KTESTS
    pytest_stage "2 hook tests (Triton on the GPU)" $T_HOOK "$LOG/hook.log" tests/kernels/test_kernel_hf_hook.py
    py_stage "3 attention numerics vs float64 (bf16)" $T_ATTN "$LOG/attention.log" "attention numerics" \
        "$PY" benchmarks/gpu_learner_check.py --device cuda --part attention
    # the spec's budgets are read at N=4096; 16k shows the long end (eager maps only up to 4k)
    BENCH=(--device cuda --head-dim 128 --heads 32 --kv-heads 8 --dtype bfloat16 --seqlens 4096,16384
           --reps 10 --max-eager-n 4096)
fi

# --- 4. the benchmark: bench_attention.py prints the spec's budgets as PASS/FAIL lines ------------
t=$(budget $T_BENCH)
name="4 benchmark, speed budgets$([ $DRY -eq 1 ] && echo ' (CPU: memory)')"
echo "== $name (timeout $t s)"
s=$SECONDS
if [ "$t" -lt 5 ]; then
    record "$name" FAIL 0 "no time left before the deadline"
else
    timeout -k 2 "$t" "$PY" benchmarks/bench_attention.py "${BENCH[@]}" 2>&1 | tee "$LOG/bench.log"
    b_rc=${PIPESTATUS[0]}
    acc=$(sed -n '/^acceptance at/,$p' "$LOG/bench.log")
    n_pass=$(echo "$acc" | grep -c 'PASS$')
    n_fail=$(echo "$acc" | grep -c 'FAIL$')
    n_na=$(echo "$acc" | grep -c ' n/a$')
    if [ $DRY -eq 1 ] && [ $b_rc -eq 0 ] && [ $((n_pass + n_fail)) -ge 1 ] && [ "$n_na" -eq 0 ]; then
        # the CPU budgets (blockwise peak memory vs eager maps) are meant for N=4096 and 8 heads:
        # at the dry run's size a fixed overhead dominates, so its lines are read, not judged
        record "$name" PASS $((SECONDS - s)) "ran; budget lines read: $n_pass PASS, $n_fail FAIL (not judged at dry-run size)"
    elif [ $b_rc -eq 0 ] && [ "$n_pass" -ge 1 ] && [ "$n_fail" -eq 0 ] && [ "$n_na" -eq 0 ]; then
        record "$name" PASS $((SECONDS - s)) "$n_pass PASS, 0 FAIL"
    else
        record "$name" FAIL $((SECONDS - s)) "$(why_rc $b_rc "$t")$n_pass PASS, $n_fail FAIL, $n_na n/a"
    fi
fi

# --- 5. the learner, 6. two ranks on one GPU ---------------------------------------------------------
if [ $DRY -eq 1 ]; then
    py_stage "5 learner (DeepSpeed, tiny, CPU)" $T_LEARNER "$LOG/learner.log" "learner check" \
        "$PY" benchmarks/gpu_learner_check.py --device cpu --part learner --shape tiny --steps 2 \
        --rows 2 --length 48
    py_stage "6 two ranks, LOCAL_RANK 0/1 (CPU, gloo)" $T_RANKS "$LOG/ranks.log" "two ranks" \
        "$PY" benchmarks/gpu_two_ranks.py --device cpu --timeout $(($(budget $T_RANKS) - 4))
else
    py_stage "5 learner (DeepSpeed, Qwen3-0.6B shape)" $T_LEARNER "$LOG/learner.log" "learner check" \
        "$PY" benchmarks/gpu_learner_check.py --device cuda --part learner
    py_stage "6 two ranks on one GPU, LOCAL_RANK 0/1" $T_RANKS "$LOG/ranks.log" "two ranks" \
        "$PY" benchmarks/gpu_two_ranks.py --device cuda --timeout $(($(budget $T_RANKS) - 4))
fi

# --- summary -------------------------------------------------------------------------------------
echo
echo "== GPU check summary$([ $DRY -eq 1 ] && echo ' (DRY RUN on CPU)'): ${GPU:-no GPU}; $VERS; $((SECONDS - START)) s"
printf "%-44s %-6s %6s  %s\n" "stage" "result" "time" "detail"
fails=0
for i in "${!NAMES[@]}"; do
    printf "%-44s %-6s %5ss  %s\n" "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}" "${NOTES[$i]}"
    [ "${RESULTS[$i]}" = PASS ] || fails=$((fails + 1))
done
if [ $fails -eq 0 ]; then
    echo "OVERALL: PASS (${#NAMES[@]} stages)"
else
    echo "OVERALL: FAIL ($fails of ${#NAMES[@]} stages failed; logs in $LOG)"
fi
[ $fails -eq 0 ]
