#!/usr/bin/env bash
# bench/.venv-trl: a separate venv for bench/vs_trl.py only (TRL is never a project dependency).
# It gets the same torch pin as scripts/install.sh, then promptkd (editable) and trl; the last
# line checks that pip did not swap torch / transformers / deepspeed for other versions.
set -euo pipefail
cd "$(dirname "$0")/.."
V=bench/.venv-trl
[ -x "$V/bin/python" ] || python3 -m venv "$V"
"$V/bin/pip" install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
DS_BUILD_OPS=0 "$V/bin/pip" install -q --disable-pip-version-check -e . trl
"$V/bin/python" - <<'PY'
import importlib.metadata as m, subprocess, sys
names = ("torch", "transformers", "deepspeed", "accelerate", "trl")
mine = {n: m.version(n) for n in names}
main = subprocess.run([".venv/bin/python", "-c", "import importlib.metadata as m, json; print(json.dumps("
                       "{n: m.version(n) for n in %r if n != 'trl'}))" % (names,)], capture_output=True, text=True)
print("bench/.venv-trl:", mine)
if main.returncode == 0:
    import json
    other = json.loads(main.stdout)
    diff = {n: (mine[n], v) for n, v in other.items() if mine[n] != v}
    print("differs from .venv:", diff or "nothing")
    sys.exit(1 if "torch" in diff else 0)
PY
