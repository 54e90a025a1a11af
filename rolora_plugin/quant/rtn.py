"""Round-to-nearest (RTN) weight quantization of one ``nn.Linear``, with the config's optional clip search.

``Ŵ = Q_c(W)`` with per-channel / per-group scales (:func:`~rolora_plugin.quant.quantize_weight`); ``c`` is 1 or the
per row/group ratio of :func:`~rolora_plugin.quant.mse_clip_search` when ``QuantConfig.w_clip_search`` is set.

Every weight quantizer (RTN here, GPTQ in :mod:`.gptq`) leaves the scales and zero points it actually used on the
Linear as a :class:`WeightQuantParams` (:func:`weight_quant_params`), so an exporter can store the integer codes
``q = round(Ŵ / s) + z`` and the scales that reproduce ``Ŵ = (q − z) · s`` bit for bit
(:mod:`rolora_plugin.compressed`). GPTQ scales and clipped scales cannot be recomputed from ``max|Ŵ|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import QuantConfig
from .primitives import OFF_BITS, mse_clip_search, quantize_with_scales, weight_scales

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

    def __post_init__(self):
        if self.scale.shape != self.zero.shape or self.scale.dim() != 2:
            raise ValueError(f"scale and zero must both be (out, n_groups), got {tuple(self.scale.shape)} and {tuple(self.zero.shape)}")


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
    search = config.clip_search_kwargs()
    ratio = mse_clip_search(w, config.w_bits, config.w_group_size, config.w_sym, **search) if search else 1.0
    scale, zero = weight_scales(w, config.w_bits, config.w_group_size, config.w_sym, ratio)  # (out, n_groups, 1)
    grouped = w.reshape(w.shape[0], scale.shape[1], -1)
    q = quantize_with_scales(grouped, scale, zero, config.w_bits, config.w_sym).reshape(w.shape)
    err = replace_weight_(lin, q)
    params = WeightQuantParams(config.w_bits, config.w_group_size, config.w_sym, scale.squeeze(-1), zero.squeeze(-1))
    set_weight_quant_params_(lin, params)
    return err


def replace_weight_(lin: nn.Linear, q: torch.Tensor) -> float:
    """``lin.weight ← q`` in place; returns ``‖W − q‖_F / ‖W‖_F`` (computed in float64)."""
    w64 = lin.weight.detach().to(torch.float64)
    err = ((q.detach().to(torch.float64) - w64).norm() / w64.norm().clamp_min(1e-300)).item()
    with torch.no_grad():
        lin.weight.copy_(q)
    return err
