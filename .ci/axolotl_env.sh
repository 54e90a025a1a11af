#!/usr/bin/env bash
# Create (or reuse) the virtual environment for the Axolotl end-to-end test.
#
# Axolotl 0.19.0 is the newest release that installs on Python 3.11; it pins
# transformers==5.16.1 and peft==0.20.0, which differ from the main environment,
# so it lives in its own venv under a cache path:
#     ${ROLORA_CACHE:-$HOME/.cache/rolora-plugin}/axolotl-venv
# First build: ~7 min and ~4 GB. Later runs only re-install this repository
# (--no-deps, seconds). The venv counts as complete only once the marker file
# written at the very end exists; an incomplete venv is rebuilt from scratch.
#
# Usage: bash .ci/axolotl_env.sh        -> prints the venv path on its last line
# Exit status is non-zero (loudly) when the venv cannot be built.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ROLORA_CACHE:-$HOME/.cache/rolora-plugin}"
VENV="${ROLORA_AXOLOTL_VENV:-$CACHE/axolotl-venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
# Bump SPEC when the pins change: a venv built for another SPEC is rebuilt.
SPEC="axolotl==0.19.0 torch==2.13.0"
MARKER="$VENV/.rolora-complete"

# pip without the local-index noise ("Location ... is ignored"); keeps pip's exit status.
pip_quiet() { "$VENV/bin/python" -m pip --quiet "$@" 2> >(grep -v -e "is ignored" -e "^ " >&2); }

mkdir -p "$CACHE"
exec 9>"$CACHE/axolotl-venv.lock"
flock 9   # concurrent CI runs on one machine share one build

if [[ ! -f "$MARKER" || "$(cat "$MARKER")" != "$SPEC" ]]; then
    echo "axolotl_env: building $VENV ($SPEC); this takes ~7 min" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    # torch first: the CPU wheel (pip prefers the local +cpu build when one is
    # on find-links), then axolotl with torch pinned so nothing swaps it.
    pip_quiet install "torch==2.13.0"
    pip_quiet install "axolotl==0.19.0" "torch==2.13.0"
    "$VENV/bin/python" -c "import axolotl, transformers, peft; print('axolotl', axolotl.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >&2
    echo "$SPEC" > "$MARKER"
fi
# Always re-install this checkout (the venv may have been built from another clone). Its own dependencies
# are installed only where missing (pluggy); the pins Axolotl needs must survive, which is checked below.
pip_quiet install -e "$REPO"
"$VENV/bin/python" -c "import pytest" 2>/dev/null || pip_quiet install "pytest>=8"  # to run our tests there too
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
want = {"axolotl": "0.19.0", "transformers": "5.16.1", "peft": "0.20.0"}
got = {name: md.version(name) for name in want}
assert got == want, f"axolotl venv has {got}, expected {want}: delete the venv and re-run .ci/axolotl_env.sh"
import rolora_plugin, pluggy  # noqa: F401  (the package and its own dependencies import)
PY
echo "$VENV"
