"""Quantization maths on tensors: integer grids, scales, quantize-dequantize, clip search and the STE.

Maths (uniform integer grid, b bits; every scale is computed along the **last** dim of its tensor):

* symmetric: ``qmax = 2^(b-1) - 1``, ``qmin = -2^(b-1)``, ``s = c · max|x| / qmax``, ``z = 0``.
* asymmetric: ``qmax = 2^b - 1``, ``qmin = 0``, ``lo = c · min(min x, 0)``, ``hi = c · max(max x, 0)``,
  ``s = (hi - lo) / qmax``, ``z = round(-lo / s)``.
* quantize-dequantize: ``Q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) · s`` (round half to even).

``c`` is the clip ratio (1 = no clipping). A zero scale (all-zero row) is replaced by 1. Weights ``W`` (out, in)
are quantized per output channel (one scale per row) or per group of ``group_size`` consecutive input columns;
activations ``x`` (..., d) per token (one scale per row of the last dim), dynamically at run time.

Fake quant keeps tensors in floating point. Inputs in float64 are computed in float64, every other dtype in
float32, and the result is cast back to the input dtype. ``ste=True`` makes the op differentiable with the
straight-through estimator (STE, Bengio et al. 2013): ``round`` is the identity in the backward pass while the
true derivative of ``clamp`` is kept: the gradient is 1 where ``round(x/s) + z`` lies in ``[qmin, qmax]`` and 0
where the clamp is active (outside the clip range). Scales are treated as constants (no gradient through max).
The forward is the same with or without the STE.

Nothing here touches an ``nn.Module``; :mod:`.rtn`, :mod:`.gptq`, :mod:`.model` and :mod:`.qat` apply it to models.
Papers: RoLoRA (Huang et al., 2024), QuaRot (Ashkboos et al., 2024).
"""

from __future__ import annotations

import warnings

import torch

__all__ = [
    "OFF_BITS",
    "quant_range",
    "compute_scales",
    "quantize_with_scales",
    "weight_scales",
    "quantize_weight",
    "quantize_activation",
    "mse_clip_search",
    "fake_quantize_weight",
    "fake_quantize_activation",
]

OFF_BITS = 16  # "16 bits" means: this tensor kind is not quantized


# ---------------------------------------------------------------------------------------------- argument checks


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bits(bits, what: str = "bits") -> None:
    if not _is_int(bits) or not 2 <= bits <= OFF_BITS:
        raise ValueError(f"{what} must be an int in 2..16 (16 means no quantization), got {bits!r}")


def _check_ratio(ratio, what: str = "clip_ratio") -> None:
    if isinstance(ratio, torch.Tensor):
        if ratio.numel() and not bool(((ratio > 0) & (ratio <= 1)).all()):
            raise ValueError(f"{what} values must lie in (0, 1]")
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"{what} must be a number in (0, 1] (1 = no clipping), got {ratio!r}")


# ---------------------------------------------------------------------------------------------- grids and scales


def quant_range(bits: int, sym: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)``: ``(-2^(b-1), 2^(b-1) - 1)`` symmetric, ``(0, 2^b - 1)`` asymmetric."""
    _check_bits(bits)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def compute_scales(x: torch.Tensor, bits: int, sym: bool = True, clip_ratio=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point along the last dim: x (..., d) → ``(s, z)`` each (..., 1) in the compute dtype.

    ``clip_ratio`` is a float or a tensor broadcastable to (..., 1). Formula in the module docstring.
    """
    _check_ratio(clip_ratio)
    x = x.detach().to(_compute_dtype(x))
    qmin, qmax = quant_range(bits, sym)
    c = clip_ratio.to(x) if isinstance(clip_ratio, torch.Tensor) else clip_ratio
    if sym:
        scale = x.abs().amax(dim=-1, keepdim=True) * c / qmax
        zero = torch.zeros_like(scale)
    else:
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0) * c
        hi = x.amax(dim=-1, keepdim=True).clamp(min=0) * c
        scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not sym:
        zero = torch.round(-lo / scale)
    return scale, zero


class _STEQuant(torch.autograd.Function):
    """Forward: quantize-dequantize with given scales. Backward: ``grad · 1[qmin ≤ round(x/s)+z ≤ qmax]``."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax):
        xc = x.to(scale.dtype)
        q = torch.round(xc / scale) + zero
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return ((torch.clamp(q, qmin, qmax) - zero) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None, None


def quantize_with_scales(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool, *, ste: bool = False) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) · s`` in the compute dtype, cast back to x's dtype.

    ``ste=True``: differentiable in x with the straight-through estimator (module docstring); same forward.
    """
    qmin, qmax = quant_range(bits, sym)
    if ste:
        return _STEQuant.apply(x, scale, zero, qmin, qmax)
    xc = x.to(_compute_dtype(x))
    q = torch.clamp(torch.round(xc / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).to(x.dtype)


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) → (out, n_groups, group) view; per channel is one group of width ``in``."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    cols = w.shape[1]
    g = cols if group_size is None else group_size
    if g < 1 or cols % g:
        raise ValueError(f"group_size {group_size} does not divide the input width {cols}; use a divisor of {cols}")
    return w.reshape(w.shape[0], cols // g, g)


def _ratio_view(clip_ratio, n_rows: int, n_groups: int):
    if isinstance(clip_ratio, torch.Tensor):
        return clip_ratio.reshape(n_rows, n_groups, 1)
    return clip_ratio


def weight_scales(w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True, clip_ratio=1.0):
    """Per-channel / per-group scales of a weight: w (out, in) → ``(s, z)`` each (out, in // group, 1).

    ``clip_ratio``: float, or a tensor (out, n_groups) as returned by :func:`mse_clip_search`.
    """
    wg = _grouped(w, group_size)
    return compute_scales(wg, bits, sym, _ratio_view(clip_ratio, wg.shape[0], wg.shape[1]))


# ---------------------------------------------------------------------------------------------- fake quant per tensor kind


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True, clip_ratio=1.0, *, ste: bool = False):
    """Fake quantization of a weight ``W`` (out, in): returns ``Q(W)`` (out, in), same dtype and device.

    One scale per output row (``group_size=None``) or per ``group_size`` consecutive input columns. ``bits=16``
    returns ``w`` unchanged. ``ste=True``: differentiable (straight-through estimator), same values. Example::

        >>> w = torch.tensor([[1.0, -0.4, 0.2, 0.0]])
        >>> quantize_weight(w, bits=2).tolist()   # s = 1/1, grid {-2, -1, 0, 1}
        [[1.0, 0.0, 0.0, 0.0]]
    """
    if bits >= OFF_BITS:
        _check_bits(bits)
        return w
    wg = _grouped(w, group_size)
    scale, zero = compute_scales(wg, bits, sym, _ratio_view(clip_ratio, wg.shape[0], wg.shape[1]))
    return quantize_with_scales(wg, scale, zero, bits, sym, ste=ste).reshape(w.shape)


def quantize_activation(x: torch.Tensor, bits: int, sym: bool = True, clip_ratio=1.0, *, ste: bool = False) -> torch.Tensor:
    """Dynamic per-token fake quantization: x (..., d) → ``Q(x)`` (..., d), one scale per row of the last dim.

    ``bits=16`` returns ``x`` unchanged; ``ste=True``: differentiable (straight-through estimator), same values.
    """
    if bits >= OFF_BITS:
        _check_bits(bits)
        return x
    scale, zero = compute_scales(x, bits, sym, clip_ratio)
    return quantize_with_scales(x, scale, zero, bits, sym, ste=ste)


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True, clip_ratio=1.0):
    """Deprecated alias of ``quantize_weight(w, bits, group_size, sym, clip_ratio, ste=True)``."""
    _deprecated("fake_quantize_weight", "quantize_weight")
    return quantize_weight(w, bits, group_size, sym, clip_ratio, ste=True)


def fake_quantize_activation(x: torch.Tensor, bits: int, sym: bool = True, clip_ratio=1.0) -> torch.Tensor:
    """Deprecated alias of ``quantize_activation(x, bits, sym, clip_ratio, ste=True)``."""
    _deprecated("fake_quantize_activation", "quantize_activation")
    return quantize_activation(x, bits, sym, clip_ratio, ste=True)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old}(...) is deprecated; use {new}(..., ste=True) (same values and gradients)", DeprecationWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------- clip search


def mse_clip_search(
    w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True, *, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> torch.Tensor:
    """Per row/group clip ratio minimising ``Σ_j |W_j - Q_c(W)_j|^p`` over candidates ``c = 1 - i/grid``.

    w: (out, in) → ratios (out, n_groups) in the compute dtype, with ``i = 0 .. int(max_shrink·grid) - 1``.
    ``c = 1`` is always a candidate and ties keep the larger ratio, so the chosen error never exceeds
    the unclipped one (in the p-norm searched). ``norm=2`` is the plain MSE; the default ``p = 2.4`` is what
    GPTQ's and QuaRot's ``find_params(mse=True)`` use (a larger p weighs the largest errors more).
    """
    wg = _grouped(w, group_size).detach()
    wc = wg.to(_compute_dtype(wg))
    best_err = torch.full(wg.shape[:2], float("inf"), dtype=wc.dtype, device=w.device)
    best = torch.ones_like(best_err)
    qmin, qmax = quant_range(bits, sym)
    for i in range(max(1, int(max_shrink * grid))):
        ratio = 1.0 - i / grid
        scale, zero = compute_scales(wc, bits, sym, ratio)
        err = _qdq_error_(wc, scale, zero, qmin, qmax, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def _qdq_error_(x, scale, zero, qmin, qmax, norm: float) -> torch.Tensor:
    """``Σ_last |Q(x) - x|^p`` with the ops of :func:`quantize_with_scales`, computed in place on one temporary."""
    e = torch.div(x, scale).round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale).sub_(x).abs_()
    return (e.mul_(e) if norm == 2 else e.pow_(norm)).sum(-1)
