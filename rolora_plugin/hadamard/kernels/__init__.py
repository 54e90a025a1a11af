"""Optional accelerator kernels. Nothing here imports an accelerator library at module level.

* :func:`is_triton_available`: cached check that ``triton`` imports.
* :func:`dispatch_triton_hadamard`: the online Hadamard (``x @ R`` of an
  :class:`~rolora_plugin.hadamard.transform.OrthogonalTransform`) as one Triton kernel for CUDA tensors, or None when it
  does not apply (CPU tensor, no triton, float64, a shape the kernel does not cover, or the kernel failed to
  compile or launch for that shape before), so the caller takes the PyTorch path. Each fallback reason is
  logged once (a kernel failure as a warning, with its error).
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache

import torch

__all__ = ["is_triton_available", "dispatch_triton_hadamard"]

logger = logging.getLogger(__name__)
_failed: set = set()  # (n, pow2, dtype) whose kernel raised: served by the PyTorch path from then on


@lru_cache(maxsize=None)
def is_triton_available() -> bool:
    """True when ``import triton`` works (checked once per process)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install raising anything else at import
        logger.info("triton is not available (%s): the online Hadamard uses the PyTorch path", exc)
        return False
    return True


@lru_cache(maxsize=None)
def _log_fallback_once(reason: str) -> None:
    logger.info("online Hadamard: PyTorch path instead of the Triton kernel (%s)", reason)


def dispatch_triton_hadamard(x: torch.Tensor, transform, transposed: bool) -> torch.Tensor | None:
    """``transform.apply(x)`` (or ``apply_transposed``) through the Triton kernel, or None when it does not apply.

    Applies to CUDA tensors of float32/float16/bfloat16 when triton is importable and the transform's shape is
    covered (:func:`rolora_plugin.hadamard.kernels.triton_hadamard.kernel_plan`). CPU tensors always get None.
    """
    if x.device.type != "cuda":
        return None
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _log_fallback_once(f"dtype {x.dtype}")
        return None
    if not is_triton_available():
        _log_fallback_once("triton is not installed")
        return None
    from . import triton_hadamard

    if triton_hadamard.kernel_plan(transform) is None:
        _log_fallback_once(f"width {transform.n} ({transform.description}) is not covered by the kernel")
        return None
    key = (transform.n, transform.pow2, x.dtype)
    if key in _failed:
        return None
    try:
        return triton_hadamard.hadamard_triton(x, transform, transposed=transposed)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # an optional kernel that fails to compile/launch must not stop training
        _failed.add(key)
        logger.warning("online Hadamard: Triton kernel failed for width %d %s (%s: %s); using the PyTorch path",
                       transform.n, x.dtype, type(exc).__name__, exc)  # fmt: skip
        return None
