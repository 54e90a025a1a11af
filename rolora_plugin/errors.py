"""The exceptions rolora-plugin raises, in one dependency-free module every other module can import."""

from __future__ import annotations

__all__ = ["CheckpointError", "RotationError", "UnsupportedArchitectureError", "QuantizationError"]


class RotationError(ValueError):
    """The model cannot be rotated (already rotated, wrong dtype/device, mismatched record, ...)."""


class UnsupportedArchitectureError(ValueError):
    """The model's family has no registered :class:`rolora_plugin.ArchitectureSpec`."""


class QuantizationError(ValueError):
    """The model or the inputs cannot be quantized as asked (already quantized, bad group size, no data...)."""


class CheckpointError(RotationError):
    """The checkpoint is incomplete or inconsistent (tensors missing, extra, of another shape; ambiguous weight
    files; a checksum or config digest that disagrees with its record). A :class:`RotationError` (so a
    ``ValueError``): callers and the ``rolora`` command treat it as bad input (one line, exit status 2)."""
