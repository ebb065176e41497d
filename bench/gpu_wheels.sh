#!/usr/bin/env bash
# Wheels that bench/gpu.sh needs on the lent GPU machine, whose image lacks them (bench/gpu_wheels.txt lists
# them; bench/gpu_image.txt what the image has). Run here, where PyPI is reachable; writes bench/.whl
# (git-ignored), which the GPU call carries: run(command="bash bench/gpu.sh", carry=["bench/.whl"], ...).
# The image runs CPython 3.12 on x86-64: binary wheels are fetched for cp312 manylinux; pure ones as they are.
# Versions are this venv's (PY), so what the GPU runs is what CI tested. One version of each: two stop the
# whole install there, so the folder is emptied first.
set -euo pipefail
cd "$(dirname "$0")/.."
D=bench/.whl
PY=${PY:-.venv/bin/python}
rm -rf "$D"
mkdir -p "$D"
ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
while read -r module dist how _; do
  case $module in ''|'#'*) continue ;; esac
  [ "$how" = not-needed ] && continue
  spec="$dist==$(ver "$dist")"
  if [ "$how" = build ]; then
    # source-only on PyPI; DeepSpeed's ops are not compiled (the bench uses torch AdamW), its wheel is pure Python
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$D" "$spec"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$D" "$spec"
  fi
done < bench/gpu_wheels.txt
ls -l "$D"
du -sh "$D"
