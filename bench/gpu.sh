#!/usr/bin/env bash
# The GPU benchmark in one command, for a lent H100/H200: under 9 minutes, no network.
#   bash bench/gpu.sh             -> bench/results/gpu_<GPU name>.json, and in $OUT (when set) that JSON plus
#                                    one full log per section (gpu_<section>.log)
#   bash bench/gpu.sh --dry-run   -> the same runner on CPU at tiny sizes, with a forced timeout (CI runs it)
# What it measures and in which order: bench/gpu_bench.py's docstring; how to read it: bench/README.md.
#
# The GPU image lacks some packages (bench/gpu_wheels.txt): prepare them here first with
# `bash bench/gpu_wheels.sh` (writes bench/.whl, git-ignored) and carry bench/.whl to the GPU machine:
#   run(command="bash bench/gpu.sh", carry=["bench/.whl"], timeout_s=570)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
if [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
MODULES=$(grep -v '^#' bench/gpu_wheels.txt | awk 'NF && $3 != "not-needed" {print $1}' | paste -sd, -)
if ! "$PY" -c "import $MODULES" >/dev/null 2>&1; then
  if compgen -G "bench/.whl/*.whl" >/dev/null; then
    # the image's python lacks them: install the carried wheels beside it (no index, no dependency resolution)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/bench_site bench/.whl/*.whl
    export PYTHONPATH=/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! "$PY" -c "import $MODULES" >/dev/null 2>&1; then
    echo "bench/gpu.sh: cannot import all of $MODULES (run bash bench/gpu_wheels.sh here and carry bench/.whl)" >&2
    "$PY" -c "import $MODULES" || true
    exit 2
  fi
fi
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
[ -n "${OUT:-}" ] && export BENCH_OUT="$OUT"
if [ "$DRY" = 0 ]; then
  NVIDIA_SMI=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | head -1)
  export NVIDIA_SMI
  echo "bench/gpu.sh: $NVIDIA_SMI" >&2
  # the runner keeps to its own 480 s budget; this outer limit only guards against the runner itself hanging
  exec timeout 510 "$PY" bench/gpu_bench.py "$@"
fi
exec timeout 200 "$PY" bench/gpu_bench.py "$@" --threads 1
