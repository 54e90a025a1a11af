"""Optional accelerator kernels. Nothing here imports an accelerator library at module level.

* :func:`is_triton_available`: cached check that ``triton`` imports.
* :func:`dispatch_triton_hadamard`: the online Hadamard (``x @ R`` of an
  :class:`~rolora_plugin.hadamard.OrthogonalTransform`) as one Triton kernel for CUDA tensors, or None when it
  does not apply (CPU tensor, no triton, float64, a shape the kernel does not cover), so the caller takes the
  PyTorch path. Only the first fallback of each reason is logged.
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache

import torch

__all__ = ["is_triton_available", "dispatch_triton_hadamard"]

logger = logging.getLogger(__name__)


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
    covered (:func:`rolora_plugin.kernels.triton_hadamard.kernel_plan`). CPU tensors always get None.
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
    return triton_hadamard.hadamard_triton(x, transform, transposed=transposed)
