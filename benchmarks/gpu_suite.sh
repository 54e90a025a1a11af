#!/usr/bin/env bash
# The GPU goals of issue 17 in one command, ≤ 8 min on one H100/H200 (benchmarks/gpu_goals.py prints the table):
# online Hadamard at 8192 tokens vs a same-size memcpy (4096, 11008, 14336, bf16), the rotation pass of a
# LLaMA-2-7B-shaped model, and the train-step overhead rows of benchmarks/train_step.py (CUDA picked automatically).
#
#   bash benchmarks/gpu_suite.sh [--no-append] [--skip-rotation] [--skip-train-step]
#
# Runs from a plain checkout (PYTHONPATH is set to it); PYTHON picks the interpreter (default python3, the one that
# holds a CUDA torch). Correctness of the kernel on the device first:
#   python3 -m pytest tests/core/test_triton_hadamard.py tests/core/test_hadamard.py -m gpu -q -p no:cacheprovider
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not available"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton missing: the Hadamard rows time the PyTorch path"
timeout 480 "$PY" benchmarks/gpu_goals.py "$@"
# Issue 30: compressed-tensors' own forward (its CUDA/Triton activation quantizers) of int W4A4, NVFP4 and MXFP4 exports
# against load_rotated on the device (tests/core/test_check.py; record the outcome in RESULTS.md the first time).
timeout 300 "$PY" -m pytest tests/core/test_check.py -m gpu -q -p no:cacheprovider -rA || echo "FP4 / int W4A4 device check FAILED (see above)"
