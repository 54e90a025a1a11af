"""Quantization maths on tensors — the one fake quantizer of rolora-plugin (PTQ, QAT, learning, monitor, export).

A :class:`TensorQuant` says how one tensor kind is quantized; :func:`fake_quant` applies it along the **last** dim
(rows = output channels of a weight, or tokens of an activation), per row or per group of ``group_size`` columns.

Formats (every scale below is per row/group, ``c`` the clip ratio, 1 = no clipping):

* ``"int"``, symmetric, b bits, codes ``[-2^(b-1), 2^(b-1)-1]``: ``Q(x) = clamp(round(x/s), qmin, qmax) · s`` with
  ``s = c · max|x| / D``. The grid is a choice: ``grid="full"`` uses ``D = 2^(b-1) - ½`` (7.5 at 4 bits: 16 levels,
  ``+max`` rounds to 8 and is clamped to 7) — compressed-tensors' definition of its int schemes; ``grid="narrow"``
  uses ``D = 2^(b-1) - 1`` (7: 15 levels, code −8 unused) — rolora's historical grid and what vLLM's Humming kernel
  computes for dynamic int activations.
* ``"int"``, asymmetric: codes ``[0, 2^b - 1]``, ``lo = c·min(min x, 0)``, ``hi = c·max(max x, 0)``,
  ``s = (hi - lo)/(2^b - 1)``, ``z = round(-lo/s)``, ``Q(x) = (clamp(round(x/s) + z) - z) · s``. No engine serves
  asymmetric dynamic activations (research recipe only).
* ``"nvfp4"`` (NVIDIA, Blackwell): E2M1 elements (``±{0, ½, 1, 1½, 2, 3, 4, 6}``) in groups of 16, each with an
  FP8-E4M3 scale, and one FP32 global scale per tensor: ``G = 448·6 / max|x|_tensor`` (weights; for activations a
  calibrated ``input_global_scale``), ``S_g = e4m3(G · c·max|x_g| / 6)`` (0 → 0.125), ``s = S_g / G``,
  ``Q(x) = e2m1(clamp(x/s, -6, 6)) · s``.
* ``"mxfp4"`` (OCP microscaling): E2M1 elements in groups of 32 with an E8M0 power-of-two scale
  ``s = 2^(p - 2)`` where ``2^p`` is ``c·max|x_g|`` rounded to a power of two (up when its mantissa is ≥ 1.75, as
  compressed-tensors' ``round_to_power_2``), biased exponent clamped to [0, 255]; ``Q(x) = e2m1(clamp(x/s,-6,6))·s``.

Rounding is round-half-to-even everywhere (``torch.round``; E2M1 and E4M3 as the hardware casts). The fast paths
compute in float32 (float64 inputs in float64) and cast back; they equal compressed-tensors 0.20's own quantize,
pack and decompress bit for bit (tests/quant/test_formats.py). :func:`round_e2m1_ref`, :func:`round_e4m3_ref` and
:func:`mx_exponent_ref` are independent float64 references of the element and scale roundings.

``ste=True`` makes the op differentiable with the straight-through estimator (STE, Bengio et al. 2013): rounding is
the identity in the backward pass, the clamp keeps its true derivative (0 outside the clip range), scales are
constants. ``scale_grad=True`` instead keeps the scale in the graph and only rounding is straight-through (LSQ /
SpinQuant's quantizer; the learned-rotation objective needs it, :mod:`rolora_plugin.rotate.learned`). Same forward values.

Nothing here touches an ``nn.Module``. Papers: RoLoRA (Huang et al., 2024), QuaRot (Ashkboos et al., 2024);
OCP Microscaling Formats spec v1.0 (MXFP4); NVIDIA NVFP4 (Blackwell); MR-GPTQ (arXiv 2509.23202).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "OFF_BITS",
    "FORMATS",
    "INT_GRIDS",
    "FP4_GROUP",
    "TensorQuant",
    "fake_quant",
    "compute_qparams",
    "quantize_with_params",
    "nvfp4_global_scale",
    "round_e2m1",
    "round_e4m3",
    "round_e2m1_ref",
    "round_e4m3_ref",
    "mx_exponent_ref",
    "quant_range",
    "compute_scales",
    "quantize_with_scales",
    "weight_scales",
    "quantize_weight",
    "quantize_activation",
    "mse_clip_search",
    "clip_search",
    "fake_quantize_weight",
    "fake_quantize_activation",
]

OFF_BITS = 16  # "16 bits" means: this tensor kind is not quantized
FORMATS = ("int", "nvfp4", "mxfp4")
INT_GRIDS = ("narrow", "full")
FP4_GROUP = {"nvfp4": 16, "mxfp4": 32}  # the group size each FP4 format defines
E2M1_MAX, E4M3_MAX, E4M3_EPS = 6.0, 448.0, 0.125  # E4M3_EPS: compressed-tensors' replacement of a zero FP8 scale


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


# ---------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor kind is fake-quantized (module docstring has the maths of each format).

    Args:
        format: ``"int"``, ``"nvfp4"`` or ``"mxfp4"``.
        bits: 2..16 for ``int`` (16 = off); 4 for the FP4 formats.
        sym: symmetric (zero point 0); the FP4 formats are symmetric.
        grid: symmetric int only: ``"full"`` (``max/(2^(b-1)-½)``, compressed-tensors) or ``"narrow"`` (``max/(2^(b-1)-1)``).
        group_size: columns per scale; None = one scale per row (channel / token). FP4: 16 (nvfp4) / 32 (mxfp4).
        clip_ratio: in (0, 1]; a float, or a tensor broadcastable to the per-group scales (weight clip search).
    """

    format: str = "int"
    bits: int = 4
    sym: bool = True
    grid: str = "narrow"
    group_size: int | None = None
    clip_ratio: object = 1.0

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"TensorQuant.format must be one of {FORMATS}, got {self.format!r}")
        _check_bits(self.bits, "TensorQuant.bits")
        if self.grid not in INT_GRIDS:
            raise ValueError(f"TensorQuant.grid must be 'full' (16 levels at 4 bits) or 'narrow' (15), got {self.grid!r}")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise ValueError(f"TensorQuant.group_size must be a positive int or None, got {self.group_size!r}")
        _check_ratio(self.clip_ratio, "TensorQuant.clip_ratio")
        if self.is_fp4 and (self.bits != 4 or not self.sym or self.group_size != FP4_GROUP[self.format]):
            raise ValueError(
                f"{self.format} is 4-bit, symmetric, in groups of {FP4_GROUP[self.format]}; got bits={self.bits}, "
                f"sym={self.sym}, group_size={self.group_size}"
            )

    @property
    def is_fp4(self) -> bool:
        return self.format in FP4_GROUP

    @property
    def off(self) -> bool:
        return self.bits >= OFF_BITS

    def with_clip(self, clip_ratio) -> "TensorQuant":
        return dataclasses.replace(self, clip_ratio=clip_ratio)

    @classmethod
    def fp4(cls, fmt: str, clip_ratio=1.0) -> "TensorQuant":
        """The ``"nvfp4"`` / ``"mxfp4"`` spec (4 bits, symmetric, the format's group size)."""
        if fmt not in FP4_GROUP:
            raise ValueError(f"FP4 formats are {tuple(FP4_GROUP)}, got {fmt!r}")
        return cls(format=fmt, bits=4, sym=True, group_size=FP4_GROUP[fmt], clip_ratio=clip_ratio)


# ---------------------------------------------------------------------------------------------- element and scale roundings


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of ``y`` (already within [-6, 6]), ties to even: the grid step is ½ below 2, 1 below 4, 2 above."""
    a = y.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(y.dtype)
    return torch.round(a / step).mul_(step).copysign_(y)


def round_e4m3(s: torch.Tensor) -> torch.Tensor:
    """``s`` rounded to FP8-E4M3 (saturating at ±448), in s's dtype: torch's own float8 cast."""
    return s.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(s.dtype)


def round_e2m1_ref(y: torch.Tensor) -> torch.Tensor:
    """Float64 reference of :func:`round_e2m1`: distance to every E2M1 value, ties to the even code."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    a = y.to(torch.float64).abs().clamp(max=E2M1_MAX).unsqueeze(-1)
    d = (a - grid).abs()
    best = d.min(-1, keepdim=True).values
    tie_ok = (d == best) & (torch.arange(8) % 2 == 0)  # even codes (mantissa bit 0) win ties
    idx = torch.where(tie_ok.any(-1, keepdim=True), tie_ok.int().argmax(-1, keepdim=True), d.argmin(-1, keepdim=True))
    return (grid[idx.squeeze(-1)] * torch.sign(y.to(torch.float64))).to(y.dtype)


def round_e4m3_ref(s: torch.Tensor) -> torch.Tensor:
    """Float64 reference of :func:`round_e4m3`: 3 mantissa bits, exponent ≥ −6 (subnormal step 2⁻⁹), max 448, RNE."""
    x = s.to(torch.float64)
    a = x.abs().clamp(max=E4M3_MAX)
    e = torch.floor(torch.log2(a.clamp_min(2.0**-6)))
    step = torch.pow(2.0, e - 3)
    return (torch.round(a / step) * step).clamp(max=E4M3_MAX).copysign(x).to(s.dtype)


def mx_exponent_ref(amax: torch.Tensor) -> torch.Tensor:
    """Float64 reference of the MX scale exponent: ``p - 2`` with ``2^p`` = amax rounded to a power of two (up iff
    its mantissa ≥ 1.75), clamped to [−127, 128]; amax 0 gives −127."""
    a = amax.to(torch.float64)
    p = torch.floor(torch.log2(a))
    p = p + (a / torch.pow(2.0, p) >= 1.75).to(p.dtype)
    return torch.where(a > 0, p - 2, torch.full_like(a, -127.0)).clamp(-127, 128)


def _mx_scale(amax: torch.Tensor) -> torch.Tensor:
    """Power-of-two MX scale from the group max (same dtype), exponent as :func:`mx_exponent_ref`."""
    m, e = torch.frexp(amax)  # amax = m · 2^e, m in [0.5, 1): mantissa 2m ≥ 1.75 rounds up
    p = (e - 1) + (m >= 0.875).to(e.dtype)
    exp = torch.where(amax > 0, p - 2, torch.full_like(p, -127)).clamp(-127, 128)
    return torch.ldexp(torch.ones_like(amax), exp)


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """NVFP4 per-tensor global scale ``448 · 6 / amax`` (float32, shape (1,); 1 where amax is 0 or not finite)."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    g = (E4M3_MAX * E2M1_MAX) / a.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


# ---------------------------------------------------------------------------------------------- scales


def quant_range(bits: int, sym: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)``: ``(-2^(b-1), 2^(b-1) - 1)`` symmetric, ``(0, 2^b - 1)`` asymmetric."""
    _check_bits(bits)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ste_round(x: torch.Tensor, fn) -> torch.Tensor:
    return x + (fn(x) - x).detach()


def compute_qparams(x: torch.Tensor, spec: TensorQuant, *, global_scale=None, differentiable: bool = False):
    """Scale and zero point of every row of ``x`` (..., g) along its last dim → ``(s, z)`` each (..., 1).

    ``x`` is already grouped (one row per scale). For the FP4 formats ``s`` is the effective scale (NVFP4:
    ``S_g / G``; ``global_scale`` G is required) and ``z`` is 0. ``differentiable``: scales stay in the graph,
    roundings of scales are straight-through (``scale_grad``); otherwise they are computed on ``x.detach()``.
    """
    xc = (x if differentiable else x.detach()).to(_compute_dtype(x))
    c = spec.clip_ratio.to(xc) if isinstance(spec.clip_ratio, torch.Tensor) else spec.clip_ratio
    if spec.format == "int":
        return _int_qparams(xc, spec, c, differentiable)
    amax = xc.abs().amax(dim=-1, keepdim=True) * c
    if spec.format == "mxfp4":
        s = _ste_round(amax, _mx_scale) if differentiable else _mx_scale(amax)
        return s, torch.zeros_like(s)
    if global_scale is None:
        raise ValueError("nvfp4 needs its per-tensor global scale (nvfp4_global_scale(max|x|))")
    g = torch.as_tensor(global_scale).to(device=xc.device, dtype=xc.dtype)
    local = g * (amax / E2M1_MAX)
    local = _ste_round(local, round_e4m3) if differentiable else round_e4m3(local)
    local = torch.where(local == 0, torch.full_like(local, E4M3_EPS), local)
    s = local / g
    return s, torch.zeros_like(s)


def _int_qparams(xc, spec, c, differentiable: bool):
    qmin, qmax = quant_range(spec.bits, spec.sym)
    if spec.sym:
        denom = qmax + 0.5 if spec.grid == "full" else qmax
        scale = xc.abs().amax(dim=-1, keepdim=True) * c / denom
        zero = torch.zeros_like(scale)
    else:
        lo = xc.amin(dim=-1, keepdim=True).clamp(max=0) * c
        hi = xc.amax(dim=-1, keepdim=True).clamp(min=0) * c
        scale = (hi - lo) / qmax
    if differentiable:
        scale = scale.clamp_min(1e-12)
    else:
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not spec.sym:
        zero = _ste_round(-lo / scale, torch.round) if differentiable else torch.round(-lo / scale)
    return scale, zero


def _bounds(spec: TensorQuant) -> tuple[float, float]:
    return (-E2M1_MAX, E2M1_MAX) if spec.is_fp4 else quant_range(spec.bits, spec.sym)


def _round_codes(y: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    return round_e2m1(y) if spec.is_fp4 else torch.round(y)


class _STEQuant(torch.autograd.Function):
    """Forward: quantize-dequantize with given scales. Backward: ``grad · 1[lo ≤ round(x/s)+z ≤ hi]``."""

    @staticmethod
    def forward(ctx, x, scale, zero, spec):
        xc = x.to(scale.dtype)
        lo, hi = _bounds(spec)
        if spec.is_fp4:
            y = xc / scale
            ctx.save_for_backward((y >= lo) & (y <= hi))
            return (round_e2m1(y.clamp(lo, hi)) * scale).to(x.dtype)
        q = torch.round(xc / scale) + zero
        ctx.save_for_backward((q >= lo) & (q <= hi))
        return ((torch.clamp(q, lo, hi) - zero) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None


# ---------------------------------------------------------------------------------------------- the STE fast path (int)
#
# What QAT and the dynamic activation quantizers run on every forward: ``fake_quant(x, int spec, ste=True)`` with a
# float clip ratio. Same values and gradients as the reference composition above (``compute_qparams`` +
# ``_STEQuant``; held equal in tests/quant/test_primitives_fast.py, float64/float32/bfloat16, every grid), in fewer
# passes over x: the row max from one ``aminmax`` read (no |x| temporary), then ``x/s`` rounded, clamped and scaled
# in place on one new tensor. The clip mask (for the backward) is formed only when a code can leave the grid: a
# symmetric narrow grid without clipping (s = max|x|/qmax) keeps every ``round(x/s)`` within ±qmax whenever every
# row max is finite and its scale a normal float (|x/s| ≤ qmax·(1 + 2⁻²³) < qmax + ½), which is checked on the
# (rows, 1) scales of CPU tensors; there the STE backward is the identity. Zeros may come out as +0.0 where the
# reference gives −0.0 (it adds the zero point 0); the values are equal.


_STE_FAST_PATH = True  # False: every STE call takes the reference composition (benchmarks/train_step.py compares both)


def _int_ste_fast_ok(x: torch.Tensor, spec: TensorQuant) -> bool:
    return _STE_FAST_PATH and spec.format == "int" and not isinstance(spec.clip_ratio, torch.Tensor) and x.is_floating_point()


def _int_scale_fast(xc: torch.Tensor, spec: TensorQuant):
    """``(scale, zero or None, amax or None)`` of :func:`_int_qparams` (non-differentiable), from one ``aminmax`` read."""
    qmin, qmax = quant_range(spec.bits, spec.sym)
    c = spec.clip_ratio
    mn, mx = torch.aminmax(xc, dim=-1, keepdim=True)
    if spec.sym:
        amax = torch.maximum(mn.neg_(), mx)  # == |x|.amax() exactly (negation is exact; NaN propagates)
        scale = amax * c / (qmax + 0.5 if spec.grid == "full" else qmax)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None, amax
    lo, hi = mn.clamp_(max=0).mul_(c), mx.clamp_(min=0).mul_(c)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale), None


def _codes_stay_on_grid(spec: TensorQuant, scale: torch.Tensor, amax) -> bool:
    """True when no ``round(x/s)`` can be clamped (see the note above); CPU tensors only (a device sync elsewhere)."""
    if amax is None or spec.grid != "narrow" or spec.clip_ratio != 1.0 or scale.device.type != "cpu":
        return False
    tiny, big = torch.finfo(scale.dtype).tiny, torch.finfo(scale.dtype).max
    return bool(((amax == 0) | ((scale >= tiny) & (scale <= big))).all())


class _STEIntQuant(torch.autograd.Function):
    """``fake_quant(x, spec, ste=True)`` for an int spec with a float clip ratio, x grouped (..., g): the fast path."""

    @staticmethod
    def forward(ctx, x, spec):
        xc = x.detach().to(_compute_dtype(x))
        scale, zero, amax = _int_scale_fast(xc, spec)
        lo, hi = quant_range(spec.bits, spec.sym)
        q = (xc.div_(scale) if xc.data_ptr() != x.data_ptr() else torch.div(xc, scale)).round_()  # one new tensor
        if zero is not None:
            q.add_(zero)
        if _codes_stay_on_grid(spec, scale, amax):
            inside = None
        else:
            qc = q.clamp(lo, hi)
            inside, q = qc == q, qc
        if zero is not None:
            q.sub_(zero)
        ctx.identity = inside is None
        if inside is not None:
            ctx.save_for_backward(inside)
        return q.mul_(scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.identity:
            return grad, None
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


def quantize_with_params(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: TensorQuant, *, ste: bool = False, scale_grad: bool = False):
    """Quantize-dequantize ``x`` (..., g) on the grid of ``spec`` with given ``(s, z)`` (..., 1); x's dtype back.

    int: ``(clamp(round(x/s) + z, qmin, qmax) - z) · s``; FP4: ``e2m1(clamp(x/s, -6, 6)) · s``.
    """
    if ste and not scale_grad:
        return _STEQuant.apply(x, scale, zero, spec)
    xc = x.to(scale.dtype)
    lo, hi = _bounds(spec)
    rnd = (lambda t: _ste_round(t, lambda u: _round_codes(u, spec))) if scale_grad else (lambda t: _round_codes(t, spec))  # noqa: E731
    if spec.is_fp4:
        return (rnd(torch.clamp(xc / scale, lo, hi)) * scale).to(x.dtype)
    q = torch.clamp(rnd(xc / scale) + zero, lo, hi)
    return ((q - zero) * scale).to(x.dtype)


def _grouped_last(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(..., d) → (..., d // g, g); per row (None) is one group of width d."""
    d = x.shape[-1]
    g = d if group_size is None else group_size
    if g < 1 or d % g:
        raise ValueError(f"group_size {group_size} does not divide the input width {d}; use a divisor of {d}")
    return x.reshape(*x.shape[:-1], d // g, g)


def fake_quant(x: torch.Tensor, spec: TensorQuant, *, ste: bool = False, scale_grad: bool = False, global_scale=None) -> torch.Tensor:
    """Fake-quantize ``x`` (..., d) with ``spec`` along its last dim (per row or per group): same shape and dtype.

    ``global_scale``: NVFP4's per-tensor scale (a calibrated ``input_global_scale``); None computes it from this
    tensor (``448·6/max|x|``: what a weight uses, or a dynamic per-tensor activation scale). ``ste`` /
    ``scale_grad``: module docstring. ``spec.off`` (16 bits) returns ``x``. Example::

        >>> fake_quant(torch.tensor([[1.0, -0.4, 0.2, 0.0]]), TensorQuant(bits=2)).tolist()  # s = 1, codes -2..1
        [[1.0, 0.0, 0.0, 0.0]]
    """
    if spec.off:
        return x
    xg = _grouped_last(x, spec.group_size)
    if ste and not scale_grad and _int_ste_fast_ok(x, spec):
        return _STEIntQuant.apply(xg, spec).reshape(x.shape)
    if spec.format == "nvfp4" and global_scale is None:
        global_scale = nvfp4_global_scale(x.detach().abs().amax().float())
    if isinstance(spec.clip_ratio, torch.Tensor):
        spec = spec.with_clip(spec.clip_ratio.reshape(*xg.shape[:-1], 1))
    scale, zero = compute_qparams(xg, spec, global_scale=global_scale, differentiable=scale_grad)
    return quantize_with_params(xg, scale, zero, spec, ste=ste, scale_grad=scale_grad).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- clip search


def clip_search(w: torch.Tensor, spec: TensorQuant, *, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4, global_scale=None) -> torch.Tensor:
    """Per row/group clip ratio minimising ``Σ_j |W_j - Q_c(W)_j|^p`` over candidates ``c = 1 - i/grid``.

    w: (out, in) → ratios (out, n_groups) in the compute dtype, ``i = 0 .. int(max_shrink·grid) - 1``. ``c = 1`` is
    always a candidate and ties keep the larger ratio, so the chosen error never exceeds the unclipped one (in the
    p-norm searched). ``norm=2`` is the plain MSE; the default ``p = 2.4`` is what GPTQ's and QuaRot's
    ``find_params(mse=True)`` use. NVFP4: ``global_scale`` (default from ``w``) stays fixed, the group scales shrink.
    """
    wg = _grouped(w, spec.group_size).detach()
    wc = wg.to(_compute_dtype(wg))
    if spec.format == "nvfp4" and global_scale is None:
        global_scale = nvfp4_global_scale(wc.abs().amax().float())
    best_err = torch.full(wg.shape[:2], float("inf"), dtype=wc.dtype, device=w.device)
    best = torch.ones_like(best_err)
    for i in range(max(1, int(max_shrink * grid))):
        ratio = 1.0 - i / grid
        cand = dataclasses.replace(spec, clip_ratio=ratio)
        scale, zero = compute_qparams(wc, cand, global_scale=global_scale)
        err = _qdq_error(wc, scale, zero, cand, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def _qdq_error(x, scale, zero, spec: TensorQuant, norm: float) -> torch.Tensor:
    """``Σ_last |Q(x) - x|^p`` (integer grids computed in place on one temporary)."""
    if spec.is_fp4:
        e = quantize_with_params(x, scale, zero, spec).sub_(x).abs_()
    else:
        qmin, qmax = quant_range(spec.bits, spec.sym)
        e = torch.div(x, scale).round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale).sub_(x).abs_()
    return (e.mul_(e) if norm == 2 else e.pow_(norm)).sum(-1)


# ---------------------------------------------------------------------------------------------- integer helpers (stable signatures)


def _int_spec(bits: int, sym: bool, int_grid: str, group_size=None, clip_ratio=1.0) -> TensorQuant:
    return TensorQuant("int", bits, sym, int_grid, group_size, clip_ratio)


def compute_scales(x: torch.Tensor, bits: int, sym: bool = True, clip_ratio=1.0, int_grid: str = "narrow"):
    """Integer scale and zero point along the last dim: x (..., d) → ``(s, z)`` each (..., 1) (:func:`compute_qparams`)."""
    return compute_qparams(x, _int_spec(bits, sym, int_grid, None, clip_ratio))


def quantize_with_scales(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool, *, ste: bool = False) -> torch.Tensor:
    """Integer ``(clamp(round(x / s) + z, qmin, qmax) - z) · s`` (:func:`quantize_with_params` with an int spec)."""
    return quantize_with_params(x, scale, zero, _int_spec(bits, sym, "narrow"), ste=ste)


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) → (out, n_groups, group) view; per channel is one group of width ``in``."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    return _grouped_last(w, group_size)


def _ratio_view(clip_ratio, n_rows: int, n_groups: int):
    return clip_ratio.reshape(n_rows, n_groups, 1) if isinstance(clip_ratio, torch.Tensor) else clip_ratio


def weight_scales(w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True, clip_ratio=1.0, int_grid: str = "narrow"):
    """Per-channel / per-group integer scales of a weight: w (out, in) → ``(s, z)`` each (out, in // group, 1)."""
    wg = _grouped(w, group_size)
    return compute_scales(wg, bits, sym, _ratio_view(clip_ratio, wg.shape[0], wg.shape[1]), int_grid)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True, clip_ratio=1.0, *, ste: bool = False, int_grid: str = "narrow"):
    """Integer fake quantization of a weight ``W`` (out, in), per output row or per group of input columns:
    ``fake_quant(W, TensorQuant("int", bits, sym, int_grid, group_size, clip_ratio))``. Example::

        >>> quantize_weight(torch.tensor([[1.0, -0.4, 0.2, 0.0]]), bits=2).tolist()   # s = 1/1, grid {-2, -1, 0, 1}
        [[1.0, 0.0, 0.0, 0.0]]
    """
    _check_bits(bits)
    if bits >= OFF_BITS:
        return w
    _grouped(w, group_size)
    return fake_quant(w, _int_spec(bits, sym, int_grid, group_size, clip_ratio), ste=ste)


def quantize_activation(x: torch.Tensor, bits: int, sym: bool = True, clip_ratio=1.0, *, ste: bool = False, int_grid: str = "narrow") -> torch.Tensor:
    """Dynamic per-token integer fake quantization: ``fake_quant(x, TensorQuant("int", bits, sym, int_grid, None, clip_ratio))``."""
    _check_bits(bits)
    if bits >= OFF_BITS:
        return x
    return fake_quant(x, _int_spec(bits, sym, int_grid, None, clip_ratio), ste=ste)


def mse_clip_search(w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True, *, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4, int_grid: str = "narrow") -> torch.Tensor:
    """Integer form of :func:`clip_search`: w (out, in) → ratios (out, n_groups)."""
    return clip_search(w, _int_spec(bits, sym, int_grid, group_size), grid=grid, max_shrink=max_shrink, norm=norm)


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
