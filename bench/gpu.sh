#!/usr/bin/env bash
# The GPU benchmark in one command, for a lent H100/H200 (finishes in <= 9.5 minutes; a timeout keeps the sections done):
#   bash bench/gpu.sh                 -> bench/results/gpu_<GPU name>.json (and $OUT/ when set)
#   bash bench/gpu.sh --dry-run       -> the same Python on CPU at tiny sizes (checks it before any GPU run)
# What it measures: bench/gpu_bench.py's docstring; how to read it: bench/README.md.
#
# The GPU image has torch/transformers/accelerate but not DeepSpeed: prepare wheels here first with
# `bash bench/gpu_wheels.sh` (writes bench/.whl, git-ignored) and carry bench/.whl to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
if [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  if [ -d bench/.whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/bench_site bench/.whl/*.whl
    export PYTHONPATH=/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "bench/gpu.sh: deepspeed is not importable and bench/.whl is missing (run bench/gpu_wheels.sh here first)" >&2
    exit 2
  fi
fi
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
[ -n "${OUT:-}" ] && export BENCH_OUT="$OUT"
if [ "$DRY" = 0 ]; then
  NVIDIA_SMI=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | head -1)
  export NVIDIA_SMI
  echo "bench/gpu.sh: $NVIDIA_SMI" >&2
  exec timeout 560 "$PY" bench/gpu_bench.py "$@"
fi
exec timeout 420 "$PY" bench/gpu_bench.py "$@" --threads 1
