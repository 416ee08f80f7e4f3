#!/usr/bin/env bash
# Wheels the lent GPU machine needs for the DeepSpeed stages of gpu_check.sh. It has Python 3.12,
# torch, Triton, transformers, msgpack, ninja, psutil, py-cpuinfo, einops (/work/.library/device
# KINDS.md) but no DeepSpeed, hjson or pydantic, and no internet: DeepSpeed 0.19.8 is built here
# as a pure-Python wheel (its ops compile on first use), the rest downloaded for cp312.
# Run on a machine with pip access, then send the folder with the check (the device tool's
# `carry: ["benchmarks/gpu_wheels"]`; ~5 MiB of 64). gpu_check.sh installs them when DeepSpeed is
# not importable there.
#   bash benchmarks/gpu_wheels.sh [DIR]      # default benchmarks/gpu_wheels (git-ignored)
# The interpreter that runs pip: $PYTHON, else .venv/bin/python when it exists, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-benchmarks/gpu_wheels}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_wheels.sh: no Python interpreter '$PY' (set PYTHON=/path/to/python)" >&2
    exit 2
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "gpu_wheels.sh: '$PY' has no pip (set PYTHON= to an interpreter with pip, or" \
         "'$PY -m ensurepip')" >&2
    exit 2
fi
echo "gpu_wheels.sh: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])')) -> $DIR"
mkdir -p "$DIR"
"$PY" -m pip wheel -q --no-deps -w "$DIR" deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR" \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls "$DIR"/deepspeed-*.whl >/dev/null 2>&1 || { echo "gpu_wheels.sh: no DeepSpeed wheel in $DIR" >&2; exit 1; }
ls -1 "$DIR"
du -sh "$DIR"
