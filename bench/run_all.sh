#!/usr/bin/env bash
# Every CPU step bench once, one after the other (each prints one JSON line and writes
# bench/results/<name>.json), at the tokenizer's vocabulary and padded to 32000 (--vocab / --model-vocab).
# ~16 minutes on the 2-core dev machine (counts: host syncs, collectives, gathers; load-independent). Separate: bench/gpu.sh (GPU) and bench/quality.py (~22 min).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
status=0
while read -r bench args; do
  [ -z "$bench" ] && continue
  echo "== bench/$bench.py $args (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  # vs_trl re-executes itself in bench/.venv-trl (bench/setup_trl_venv.sh) when trl is not importable here
  # shellcheck disable=SC2086
  if ! "$PY" "bench/$bench.py" $args "$@" 2>"/tmp/bench_$bench.err" </dev/null; then
    echo "bench/$bench.py $args failed: see /tmp/bench_$bench.err" >&2
    status=1
  fi
done <<'LIST'
phases
phases --vocab 32000
promptkd_overhead
promptkd_overhead --vocab 32000
rollout
rollout --model-vocab 32000
loss_memory
vs_trl
vs_trl --vocab 32000
counts --label merged
LIST
exit $status
