#!/usr/bin/env bash
# Creates ./.venv (or $VENV) with everything promptkd needs.
# torch is installed first and pinned to the small CPU build, so pip never
# pulls a multi-GB CUDA wheel on a CPU machine. If the venv already has a
# torch (e.g. a GPU build you installed yourself), it is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
# DS_BUILD_OPS=0: DeepSpeed compiles its ops lazily, only if ever used.
DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]"
"$VENV/bin/python" -c "import torch, deepspeed, transformers; print(f'promptkd env ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')"
