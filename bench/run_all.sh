#!/usr/bin/env bash
# Every CPU bench once, one after the other (each prints one JSON line and writes bench/results/<name>.json).
# ~10 minutes on the 2-core dev machine. The GPU bench is separate: bench/gpu.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
status=0
for bench in phases promptkd_overhead rollout loss_memory vs_trl; do
  echo "== bench/$bench.py (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  # vs_trl re-executes itself in bench/.venv-trl (bench/setup_trl_venv.sh) when trl is not importable here
  if ! "$PY" "bench/$bench.py" "$@" 2>"/tmp/bench_$bench.err"; then
    echo "bench/$bench.py failed: see /tmp/bench_$bench.err" >&2
    status=1
  fi
done
exit $status
