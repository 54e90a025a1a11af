"""Weight-activation quantization: uniform fake-quant maths, RTN with clip search, and ``quantize_model_``.

Maths (uniform integer grid, b bits; every scale is computed along the **last** dim of its tensor):

* symmetric: ``qmax = 2^(b-1) - 1``, ``qmin = -2^(b-1)``, ``s = c · max|x| / qmax``, ``z = 0``.
* asymmetric: ``qmax = 2^b - 1``, ``qmin = 0``, ``lo = c · min(min x, 0)``, ``hi = c · max(max x, 0)``,
  ``s = (hi - lo) / qmax``, ``z = round(-lo / s)``.
* quantize-dequantize: ``Q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) · s`` (round half to even).

``c`` is the clip ratio (1 = no clipping). A zero scale (all-zero row) is replaced by 1. Weights ``W`` (out, in)
are quantized per output channel (one scale per row) or per group of ``group_size`` consecutive input columns;
activations ``x`` (..., d) per token (one scale per row of the last dim), dynamically at run time.

Fake quant keeps tensors in floating point. Inputs in float64 are computed in float64, every other dtype in
float32, and the result is cast back to the input dtype. The straight-through estimator (STE, Bengio et al.
2013) used by the ``fake_quantize_*`` ops replaces ``round`` by the identity in the backward pass while keeping
the true derivative of ``clamp``: the gradient is 1 where ``round(x/s) + z`` lies in ``[qmin, qmax]`` and 0
where the clamp is active (outside the clip range). Scales are treated as constants (no gradient through max).

Module surgery (:func:`quantize_model_`) edits weights in place (fake-quantized floats, same dtype) and adds a
forward-pre-hook on every quantized ``nn.Linear`` that fake-quantizes its input per token. That hook is
registered normally (not prepended), so it runs *after* rolora's online R4 Hadamard, which the MLP prepends to
``down_proj``'s hooks on every call (see :mod:`.online`): the quantizer sees the rotated activation, as the
hardware would. KV-cache quantization fake-quantizes keys and values per head and token inside the attention
function (after RoPE and after R3) through :func:`rolora_plugin.online.add_attention_transform`.

Papers: RoLoRA (Huang et al., 2024), QuaRot (Ashkboos et al., 2024), GPTQ (Frantar et al., 2022).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import ConfigMixin

__all__ = [
    "QuantConfig",
    "QuantizationError",
    "QuantizationRecord",
    "quantize_model_",
    "get_quantization_record",
    "install_activation_quantizers",
    "remove_activation_quantizers",
    "quant_range",
    "compute_scales",
    "quantize_with_scales",
    "weight_scales",
    "quantize_weight",
    "quantize_activation",
    "mse_clip_search",
    "fake_quantize_weight",
    "fake_quantize_activation",
    "rtn_quantize_linear_",
    "replace_weight_",
    "quantizable_linears",
    "is_skipped",
    "ActivationQuantizer",
    "KVQuantizer",
    "QUANT_RECORD_KEY",
]

logger = logging.getLogger(__name__)
QUANT_RECORD_KEY = "rolora_quant"
FORMAT_VERSION = 1
OFF_BITS = 16


class QuantizationError(ValueError):
    """The model or the inputs cannot be quantized as asked (already quantized, bad group size, no data...)."""


# ---------------------------------------------------------------------------------------------- config


@dataclass
class QuantConfig(ConfigMixin):
    """What :func:`quantize_model_` does. 16 bits means "off" for that tensor kind.

    Args:
        w_bits / a_bits / kv_bits: weight, activation (linear inputs) and KV-cache bits, each in 2..16.
        w_group_size: quantize weights per group of this many input columns (None: per output channel).
        w_sym / a_sym / kv_sym: symmetric (zero point 0) or asymmetric grids.
        a_clip_ratio / kv_clip_ratio: fixed clip ratio in (0, 1] for the dynamic per-token scales.
        w_clip_search: pick a clip ratio per row/group minimising ``Σ|W - Q(W)|^p`` (:func:`mse_clip_search`).
        w_clip_grid / w_clip_max_shrink / w_clip_norm: candidates ``1 - i/grid`` for ``i < max_shrink·grid``; p.
        method: "rtn" (round to nearest) or "gptq" (needs calibration data; :mod:`.gptq`).
        gptq_damp: damping ``λ = damp · mean(diag H)`` added to the Hessian diagonal.
        gptq_act_order: quantize columns by decreasing ``diag H`` (with groups: static groups, see :mod:`.gptq`).
        gptq_block_size: columns per lazy-batch block.
        gptq_true_sequential: within a layer, quantize linears in call order, re-running the layer in between
            so later linears see the outputs of already-quantized ones (GPTQ's ``true-sequential``).
        skip: linears left in high precision, matched by full name, by a dotted suffix or by leaf name.
    """

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = OFF_BITS
    w_group_size: int | None = None
    w_sym: bool = True
    a_sym: bool = True
    kv_sym: bool = False
    a_clip_ratio: float = 1.0
    kv_clip_ratio: float = 1.0
    w_clip_search: bool = False
    w_clip_grid: int = 100
    w_clip_max_shrink: float = 0.8
    w_clip_norm: float = 2.4
    method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_block_size: int = 128
    gptq_true_sequential: bool = True
    skip: tuple = ("lm_head",)

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "kv_bits"):
            _check_bits(getattr(self, name), f"QuantConfig.{name}")
        if self.w_group_size is not None and (not _is_int(self.w_group_size) or self.w_group_size < 1):
            raise ValueError(f"QuantConfig.w_group_size must be a positive int or None (per channel), got {self.w_group_size!r}")
        for name in ("w_sym", "a_sym", "kv_sym", "w_clip_search", "gptq_act_order", "gptq_true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("a_clip_ratio", "kv_clip_ratio"):
            _check_ratio(getattr(self, name), f"QuantConfig.{name}")
        self._check_search_and_gptq()
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"QuantConfig.skip must be a list of module names, e.g. ['lm_head'], got {self.skip!r}")
        self.skip = tuple(self.skip)
        if min(self.w_bits, self.a_bits, self.kv_bits) >= OFF_BITS:
            raise ValueError("QuantConfig: w_bits, a_bits and kv_bits are all 16 (off); set at least one below 16")

    def _check_search_and_gptq(self):
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"QuantConfig.method must be 'rtn' or 'gptq', got {self.method!r}")
        if not _is_int(self.w_clip_grid) or self.w_clip_grid < 1:
            raise ValueError(f"QuantConfig.w_clip_grid must be a positive int, got {self.w_clip_grid!r}")
        if not 0.0 <= self.w_clip_max_shrink < 1.0:
            raise ValueError(f"QuantConfig.w_clip_max_shrink must be in [0, 1), got {self.w_clip_max_shrink!r}")
        if not self.w_clip_norm > 0:
            raise ValueError(f"QuantConfig.w_clip_norm (the p of the error norm) must be > 0, got {self.w_clip_norm!r}")
        if not self.gptq_damp > 0:
            raise ValueError(f"QuantConfig.gptq_damp must be > 0 (e.g. 0.01), got {self.gptq_damp!r}")
        if not _is_int(self.gptq_block_size) or self.gptq_block_size < 1:
            raise ValueError(f"QuantConfig.gptq_block_size must be a positive int, got {self.gptq_block_size!r}")

    def clip_search_kwargs(self) -> dict | None:
        """Keyword arguments for :func:`mse_clip_search`, or None when the search is off."""
        if not self.w_clip_search:
            return None
        return dict(grid=self.w_clip_grid, max_shrink=self.w_clip_max_shrink, norm=self.w_clip_norm)


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


# ---------------------------------------------------------------------------------------------- tensor maths


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


def quantize_with_scales(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) · s`` in the compute dtype, cast back to x's dtype."""
    qmin, qmax = quant_range(bits, sym)
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


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True, clip_ratio=1.0):
    """RTN fake quantization of a weight ``W`` (out, in): returns ``Q(W)`` (out, in), same dtype and device.

    One scale per output row (``group_size=None``) or per ``group_size`` consecutive input columns. ``bits=16``
    returns ``w`` unchanged. Example::

        >>> w = torch.tensor([[1.0, -0.4, 0.2, 0.0]])
        >>> quantize_weight(w, bits=2).tolist()   # s = 1/1, grid {-2, -1, 0, 1}
        [[1.0, 0.0, 0.0, 0.0]]
    """
    if bits >= OFF_BITS:
        _check_bits(bits)
        return w
    wg = _grouped(w, group_size)
    scale, zero = compute_scales(wg, bits, sym, _ratio_view(clip_ratio, wg.shape[0], wg.shape[1]))
    return quantize_with_scales(wg, scale, zero, bits, sym).reshape(w.shape)


def quantize_activation(x: torch.Tensor, bits: int, sym: bool = True, clip_ratio=1.0) -> torch.Tensor:
    """Dynamic per-token fake quantization: x (..., d) → ``Q(x)`` (..., d), one scale per row of the last dim."""
    if bits >= OFF_BITS:
        _check_bits(bits)
        return x
    scale, zero = compute_scales(x, bits, sym, clip_ratio)
    return quantize_with_scales(x, scale, zero, bits, sym)


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


def fake_quantize_activation(x: torch.Tensor, bits: int, sym: bool = True, clip_ratio=1.0) -> torch.Tensor:
    """Differentiable per-token fake quant (STE). Same forward as :func:`quantize_activation`; x (..., d)."""
    if bits >= OFF_BITS:
        _check_bits(bits)
        return x
    scale, zero = compute_scales(x, bits, sym, clip_ratio)
    qmin, qmax = quant_range(bits, sym)
    return _STEQuant.apply(x, scale, zero, qmin, qmax)


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True, clip_ratio=1.0):
    """Differentiable weight fake quant (STE). Same forward as :func:`quantize_weight`; w (out, in)."""
    if bits >= OFF_BITS:
        _check_bits(bits)
        return w
    wg = _grouped(w, group_size)
    scale, zero = compute_scales(wg, bits, sym, _ratio_view(clip_ratio, wg.shape[0], wg.shape[1]))
    qmin, qmax = quant_range(bits, sym)
    return _STEQuant.apply(wg, scale, zero, qmin, qmax).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- runtime modules


class ActivationQuantizer:
    """Forward-pre-hook that fake-quantizes a Linear's first input per token (STE, so it also trains)."""

    def __init__(self, bits: int, sym: bool = True, clip_ratio: float = 1.0):
        self.bits, self.sym, self.clip_ratio = bits, sym, clip_ratio

    def __call__(self, module, args):
        return (fake_quantize_activation(args[0], self.bits, self.sym, self.clip_ratio),) + tuple(args[1:])

    def __repr__(self) -> str:
        return f"ActivationQuantizer(bits={self.bits}, sym={self.sym}, clip_ratio={self.clip_ratio})"


class KVQuantizer(nn.Module):
    """Attention transform ``(q, k, v) → (q, Q(k), Q(v))``: per head and token (over head_dim). No parameters."""

    def __init__(self, bits: int, sym: bool = False, clip_ratio: float = 1.0):
        super().__init__()
        self.bits, self.sym, self.clip_ratio = bits, sym, clip_ratio

    def forward(self, q, k, v):
        return q, fake_quantize_activation(k, self.bits, self.sym, self.clip_ratio), fake_quantize_activation(v, self.bits, self.sym, self.clip_ratio)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, sym={self.sym}, clip_ratio={self.clip_ratio}"


# ---------------------------------------------------------------------------------------------- module surgery

_ACT_ATTR = "_rolora_act_quant"


@dataclass
class QuantizationRecord:
    """What :func:`quantize_model_` did; stored as a dict under ``model.config.rolora_quant``.

    ``weight_error`` maps each quantized linear to ``‖W - Q(W)‖_F / ‖W‖_F``.
    """

    config: QuantConfig
    quantized: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    kv_layers: int = 0
    weight_error: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizationRecord":
        data = dict(data)
        if data.get("format_version") != FORMAT_VERSION:
            raise QuantizationError(f"quantization record format {data.get('format_version')} is not supported")
        data["config"] = QuantConfig.from_dict(data["config"])
        return cls(**data)

    def mean_weight_error(self) -> float:
        return sum(self.weight_error.values()) / max(1, len(self.weight_error))


def get_quantization_record(model_or_config) -> QuantizationRecord | None:
    """The :class:`QuantizationRecord` of a quantized model (or its config), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, QUANT_RECORD_KEY, None)
    return QuantizationRecord.from_dict(data) if data else None


def is_skipped(name: str, skip) -> bool:
    """True if module ``name`` matches an entry of ``skip`` (full name, dotted suffix or leaf name)."""
    return any(name == s or name.endswith("." + s) for s in skip)


def quantizable_linears(model: nn.Module, config: QuantConfig) -> tuple[dict, list]:
    """``({name: Linear} to quantize, [skipped names])``, in module order."""
    chosen, skipped = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            (skipped.append(name) if is_skipped(name, config.skip) else chosen.__setitem__(name, mod))
    return chosen, skipped


def _check_model(model: nn.Module, config: QuantConfig, linears: dict) -> None:
    if get_quantization_record(model) is not None or any(_ACT_ATTR in m.__dict__ for m in linears.values()):
        raise QuantizationError(
            f"{type(model).__name__} is already quantized (model.config.{QUANT_RECORD_KEY} is set); quantizing twice "
            "would compound the rounding. Reload the full-precision model to quantize with another config."
        )
    for name, mod in model.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
            raise QuantizationError(
                f"{name} is a peft LoRA layer; quantize_model_ is post-training: merge the adapters first "
                "(model = model.merge_and_unload()), then quantize"
            )
    if not linears:
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear left to quantize (skip={list(config.skip)})")
    embeds = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, lin in linears.items():
        _check_linear(name, lin, config, embeds)


def _check_linear(name: str, lin: nn.Linear, config: QuantConfig, embed_ptrs: set) -> None:
    cols = lin.in_features
    if config.w_bits < OFF_BITS and config.w_group_size is not None and cols % config.w_group_size:
        divisors = [d for d in (32, 64, 128, 256) if cols % d == 0]
        raise QuantizationError(
            f"w_group_size={config.w_group_size} does not divide the input width {cols} of layer {name!r}; choose a "
            f"divisor of {cols} (e.g. {divisors or [cols]}) or per-channel scales (w_group_size=None), or add "
            f"{name.rsplit('.', 1)[-1]!r} to skip"
        )
    if config.w_bits < OFF_BITS and lin.weight.data_ptr() in embed_ptrs:
        raise QuantizationError(
            f"{name} shares its weight with the input embeddings (tied); quantizing it would quantize the embeddings "
            "too. Keep it in QuantConfig.skip, or untie the embeddings first"
        )
    if not lin.weight.is_floating_point():
        raise QuantizationError(f"{name} has a {lin.weight.dtype} weight; quantize_model_ needs a floating-point model")


def quantize_model_(model: nn.Module, config: QuantConfig | None = None, calibration=None, *, progress: bool = True) -> QuantizationRecord:
    """Quantize ``model`` in place: weights (RTN or GPTQ), per-token activations of linear inputs, KV cache.

    Args:
        model: a causal LM (rotated or not). Every ``nn.Linear`` not in ``config.skip`` is quantized; embeddings
            and skipped linears (``lm_head`` by default) stay in high precision.
        config: :class:`QuantConfig` (default W4A4 RTN per channel).
        calibration: for GPTQ, an iterable of ``input_ids`` tensors (batch, seq) or of dicts accepted by
            ``model(**batch)``. Ignored by RTN.
        progress: tqdm bars.

    Returns:
        The :class:`QuantizationRecord`, also stored in ``model.config.rolora_quant``.

    Example::

        >>> record = quantize_model_(model, QuantConfig(w_bits=4, a_bits=8))  # doctest: +SKIP
    """
    config = config or QuantConfig()
    linears, skipped = quantizable_linears(model, config)
    _check_model(model, config, linears)
    if config.method == "gptq" and config.w_bits < OFF_BITS and calibration is None:
        raise QuantizationError("method='gptq' needs calibration data: pass calibration=[input_ids tensors or dicts]")
    record = QuantizationRecord(config=config, quantized=list(linears), skipped=skipped)
    if config.w_bits < OFF_BITS:
        record.weight_error = _quantize_weights(model, config, linears, calibration, progress)
    install_activation_quantizers(model, record)
    setattr(model.config, QUANT_RECORD_KEY, record.to_dict())
    logger.info(
        "quantized %d linears of %s (W%dA%d KV%d, %s); mean relative weight error %.4f; kept %s in high precision",
        len(linears), type(model).__name__, config.w_bits, config.a_bits, config.kv_bits, config.method,
        record.mean_weight_error(), skipped,
    )  # fmt: skip
    return record


def _quantize_weights(model, config: QuantConfig, linears: dict, calibration, progress: bool) -> dict:
    """Quantize the weights in place; returns ``{name: ‖W − Q(W)‖_F / ‖W‖_F}`` (no full copy of the model kept)."""
    if config.method == "gptq":
        from .gptq import gptq_quantize_model_

        return gptq_quantize_model_(model, config, calibration, progress=progress)
    return {name: rtn_quantize_linear_(lin, config) for name, lin in linears.items()}


def rtn_quantize_linear_(lin: nn.Linear, config: QuantConfig) -> float:
    """Round-to-nearest weight quantization of one Linear in place (with the config's clip search).

    Returns the relative error ``‖W − Q(W)‖_F / ‖W‖_F``.
    """
    w = lin.weight.detach()
    search = config.clip_search_kwargs()
    ratio = mse_clip_search(w, config.w_bits, config.w_group_size, config.w_sym, **search) if search else 1.0
    return replace_weight_(lin, quantize_weight(w, config.w_bits, config.w_group_size, config.w_sym, ratio))


def replace_weight_(lin: nn.Linear, q: torch.Tensor) -> float:
    """``lin.weight ← q`` in place; returns ``‖W − q‖_F / ‖W‖_F`` (computed in float64)."""
    w64 = lin.weight.detach().to(torch.float64)
    err = ((q.detach().to(torch.float64) - w64).norm() / w64.norm().clamp_min(1e-300)).item()
    with torch.no_grad():
        lin.weight.copy_(q)
    return err


def install_activation_quantizers(model: nn.Module, record: QuantizationRecord) -> None:
    """(Re)install the activation and KV-cache quantizers that ``record`` describes (weights are not touched).

    Used by :func:`quantize_model_` and after loading a quantized checkpoint, whose weights are already fake-quantized.
    """
    cfg = record.config
    remove_activation_quantizers(model)
    if cfg.a_bits < OFF_BITS:
        for name in record.quantized:
            lin = model.get_submodule(name)
            hook = ActivationQuantizer(cfg.a_bits, cfg.a_sym, cfg.a_clip_ratio)
            lin.__dict__[_ACT_ATTR] = (hook, lin.register_forward_pre_hook(hook))
    record.kv_layers = _install_kv_quantizers(model, cfg) if cfg.kv_bits < OFF_BITS else 0


def _install_kv_quantizers(model: nn.Module, cfg: QuantConfig) -> int:
    from .architectures import get_architecture, get_submodule
    from .online import add_attention_transform

    spec = get_architecture(model)
    layers = list(get_submodule(model, spec.layers))
    for layer in layers:
        add_attention_transform(get_submodule(layer, spec.attention), "kv_quant", KVQuantizer(cfg.kv_bits, cfg.kv_sym, cfg.kv_clip_ratio), model.config)
    return len(layers)


def remove_activation_quantizers(model: nn.Module) -> None:
    """Remove every activation / KV quantizer installed by rolora (weights stay as they are)."""
    from .online import remove_attention_transform

    for module in model.modules():
        entry = module.__dict__.pop(_ACT_ATTR, None)
        if entry is not None:
            entry[1].remove()
        if "kv_quant" in module.__dict__.get("_rolora_attn_transforms", {}):
            remove_attention_transform(module, "kv_quant")


def fake_quant_active(model: nn.Module) -> bool:  # transitional: the QAT machinery moves to quant/qat.py
    from .lora import fake_quant_active as _active

    return _active(model)
