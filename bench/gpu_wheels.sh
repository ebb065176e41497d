#!/usr/bin/env bash
# Wheels that bench/gpu.sh needs on the GPU machine (whose image lacks DeepSpeed and pydantic):
# downloaded here, where PyPI is reachable, into bench/.whl (git-ignored). Carry bench/.whl along.
set -euo pipefail
cd "$(dirname "$0")/.."
D=bench/.whl
mkdir -p "$D"
PIP=${PIP:-.venv/bin/pip}
# DeepSpeed: pure-Python wheel, no ops compiled (the benches use torch AdamW).
DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps -w "$D" "deepspeed==${DS_VERSION:-0.19.8}"
# The GPU image runs CPython 3.12 on x86-64. pydantic pins pydantic-core exactly: take the main venv's pair.
ver() { "${PY:-.venv/bin/python}" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$D" hjson "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" annotated-types typing-inspection
ls -l "$D"
