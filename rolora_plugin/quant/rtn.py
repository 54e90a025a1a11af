"""Round-to-nearest (RTN) weight quantization of one ``nn.Linear``, with the config's optional clip search.

``Ŵ = Q_c(W)`` with per-channel / per-group scales (:func:`~rolora_plugin.quant.quantize_weight`); ``c`` is 1 or the
per row/group ratio of :func:`~rolora_plugin.quant.mse_clip_search` when ``QuantConfig.w_clip_search`` is set.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig
from .primitives import mse_clip_search, quantize_weight

__all__ = ["rtn_quantize_linear_", "replace_weight_"]


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
