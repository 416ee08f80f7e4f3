#!/usr/bin/env bash
# Wheels the lent GPU machine needs for stage 4 of gpu_check.sh. It has Python 3.12, torch,
# Triton, transformers, msgpack, ninja, psutil, py-cpuinfo, einops (/work/.library/device
# KINDS.md) but no DeepSpeed, hjson or pydantic, and no internet: DeepSpeed 0.19.8 is built here
# as a pure-Python wheel (its ops compile on first use), the rest downloaded for cp312.
# Run here, then send the folder with the check (the device tool's `carry`; ~5 MiB of 64).
#   bash benchmarks/gpu_wheels.sh [DIR]      # default benchmarks/gpu_wheels (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-benchmarks/gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
$PY -m pip wheel -q --no-deps -w "$DIR" deepspeed==0.19.8
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR" \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
du -sh "$DIR"
