"""Round-to-nearest (RTN) weight quantization of one ``nn.Linear``, with the config's optional clip search.

``Ŵ = Q_c(W)`` with per-channel / per-group scales (:func:`~rolora_plugin.quant.quantize_weight`); ``c`` is 1 or the
per row/group ratio of :func:`~rolora_plugin.quant.mse_clip_search` when ``QuantConfig.w_clip_search`` is set.

Every weight quantizer (RTN here, GPTQ in :mod:`.gptq`) leaves the scales and zero points it actually used on the
Linear as a :class:`WeightQuantParams` (:func:`weight_quant_params`), so an exporter can store the integer codes
``q = round(Ŵ / s) + z`` and the scales that reproduce ``Ŵ = (q − z) · s`` bit for bit
(:mod:`rolora_plugin.io.compressed`). GPTQ scales and clipped scales cannot be recomputed from ``max|Ŵ|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import QuantConfig
from .primitives import OFF_BITS, clip_search, compute_qparams, nvfp4_global_scale, quantize_with_params

__all__ = ["WeightQuantParams", "replace_weight_", "rtn_quantize_linear_", "set_weight_quant_params_", "weight_quant_params"]

_PARAMS_ATTR = "_rolora_weight_qparams"


@dataclass(frozen=True)
class WeightQuantParams:
    """The grid a Linear's fake-quantized weight lies on: ``Ŵ[r, g·G + j] = (q − z[r, g]) · s[r, g]``.

    Attributes:
        bits / group_size / sym: as in :class:`~rolora_plugin.quant.QuantConfig` (``group_size`` None: per channel,
            one group of width ``in_features``).
        scale: (out, n_groups) scales ``s`` in the compute dtype the weight was quantized in (float32, or float64
            for float64 weights).
        zero: (out, n_groups) zero points ``z`` (integer values, same dtype; 0 when ``sym``). The integer grid is
            :func:`~rolora_plugin.quant.quant_range` (``[-2^(b-1), 2^(b-1)-1]`` symmetric, ``[0, 2^b-1]`` asymmetric).
    """

    bits: int
    group_size: int | None
    sym: bool
    scale: torch.Tensor
    zero: torch.Tensor
    format: str = "int"
    global_scale: torch.Tensor | None = None

    def __post_init__(self):
        if self.scale.shape != self.zero.shape or self.scale.dim() != 2:
            raise ValueError(f"scale and zero must both be (out, n_groups), got {tuple(self.scale.shape)} and {tuple(self.zero.shape)}")
        if (self.format == "nvfp4") != (self.global_scale is not None):
            raise ValueError("an NVFP4 weight has a global scale (and only NVFP4 weights have one)")

    @classmethod
    def of(cls, config: QuantConfig, scale, zero, global_scale=None) -> "WeightQuantParams":
        """The params of a weight quantized with ``config.weight_spec()``; scale/zero (out, n_groups)."""
        return cls(config.w_bits, config.w_group_size, config.w_sym, scale, zero, config.w_format, global_scale)


def weight_quant_params(lin: nn.Module) -> WeightQuantParams | None:
    """The :class:`WeightQuantParams` that RTN / GPTQ left on ``lin``, or None (not quantized by them)."""
    return lin.__dict__.get(_PARAMS_ATTR)


def set_weight_quant_params_(lin: nn.Module, params: WeightQuantParams | None) -> None:
    """Attach (or with None remove) the grid of ``lin``'s weight; a plain attribute, never in the state dict."""
    if params is None:
        lin.__dict__.pop(_PARAMS_ATTR, None)
    else:
        lin.__dict__[_PARAMS_ATTR] = params


def rtn_quantize_linear_(lin: nn.Linear, config: QuantConfig) -> float:
    """Round-to-nearest weight quantization of one Linear in place (with the config's clip search).

    Same values as ``quantize_weight(W, bits, group_size, sym, c)``; the scales and zero points used are attached
    as :class:`WeightQuantParams`. Returns the relative error ``‖W − Q(W)‖_F / ‖W‖_F``.
    """
    w = lin.weight.detach()
    if config.w_bits >= OFF_BITS:
        set_weight_quant_params_(lin, None)
        return replace_weight_(lin, w)
    scale, zero, gscale = rtn_params(w, config)  # (out, n_groups, 1)
    grouped = w.reshape(w.shape[0], scale.shape[1], -1)
    q = quantize_with_params(grouped, scale, zero, config.weight_spec()).reshape(w.shape)
    err = replace_weight_(lin, q)
    set_weight_quant_params_(lin, WeightQuantParams.of(config, scale.squeeze(-1), zero.squeeze(-1), gscale))
    return err


def rtn_params(w: torch.Tensor, config: QuantConfig):
    """RTN scales of a weight (out, in) with the config's clip search: ``(s, z, G)``, s/z (out, n_groups, 1); G the
    NVFP4 global scale from ``max|W|`` (None for other formats)."""
    spec = config.weight_spec()
    gscale = nvfp4_global_scale(w.detach().abs().amax().float()) if spec.format == "nvfp4" else None
    search = config.clip_search_kwargs()
    grouped = w.detach().reshape(w.shape[0], -1, spec.group_size or w.shape[1])
    if search:
        ratio = clip_search(w, spec, global_scale=gscale, **search)
        spec = spec.with_clip(ratio.reshape(*grouped.shape[:2], 1))
    scale, zero = compute_qparams(grouped, spec, global_scale=gscale)
    return scale, zero, gscale


def replace_weight_(lin: nn.Linear, q: torch.Tensor) -> float:
    """``lin.weight ← q`` in place; returns ``‖W − q‖_F / ‖W‖_F`` (computed in float64)."""
    w64 = lin.weight.detach().to(torch.float64)
    err = ((q.detach().to(torch.float64) - w64).norm() / w64.norm().clamp_min(1e-300)).item()
    with torch.no_grad():
        lin.weight.copy_(q)
    return err
