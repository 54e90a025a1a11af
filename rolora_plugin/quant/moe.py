"""Fake quantization of Mixture-of-Experts experts (fused 3-D ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]).

* Weights: every expert's matrix is quantized on its own, per output channel (or per group of ``w_group_size``
  inputs): the rows of ``P.reshape(E · out, in)`` are exactly the (expert, output channel) pairs, so RTN on that
  view is RTN per expert. GPTQ (:mod:`.gptq`) uses one Hessian per expert, from the tokens the router sends to it
  (:func:`routed_inputs`); an expert that gets no calibration token is RTN-quantized with a warning.
* Activations, per token: the experts' input (what ``gate_up_proj`` reads) through a forward-pre-hook on the
  experts module, and every expert's ``down_proj`` input through the experts' gate transform table, after the
  online R4 (:func:`rolora_plugin.model.online.add_expert_gate_transform`). The router and the shared-expert gate read
  the unquantized hidden state (the router stays in high precision).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .._peft import base_experts
from ..errors import QuantizationError, UnsupportedArchitectureError
from ..model.architectures import EXPERT_PARAMS, get_architecture, get_submodule
from ..model.online import add_expert_gate_transform, expert_gate_transforms, remove_expert_gate_transform
from .config import QuantConfig
from .primitives import OFF_BITS, clip_search, fake_quant
from .targets import is_skipped

__all__ = [
    "EXPERT_PARAMS",
    "expert_modules",
    "check_experts",
    "rtn_quantize_experts_",
    "quantize_expert_rows_",
    "rtn_expert_",
    "routed_inputs",
    "set_routed_token_counts",
    "routed_token_counts",
    "TokenQuantizer",
    "install_expert_activation_quantizers",
    "remove_expert_activation_quantizers",
]

logger = logging.getLogger(__name__)
_INPUT_HOOK = "_rolora_expert_input_quant"
_GATE_NAME = "act_quant"


def expert_modules(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """``{qualified name: experts module}`` of every MoE layer of ``model`` whose experts are not in ``config.skip``
    (empty for dense or unregistered models)."""
    try:
        spec = get_architecture(model)
    except UnsupportedArchitectureError:
        return {}
    if spec.experts is None:
        return {}
    out = {}
    for i, layer in enumerate(spec.decoder_layers(model)):
        name = f"{spec.layers}.{i}.{spec.experts}"
        if spec.is_moe_layer(layer) and not is_skipped(name, config.skip):
            out[name] = base_experts(get_submodule(layer, spec.experts))
    return out


def check_experts(experts: dict[str, nn.Module], config: QuantConfig) -> None:
    """Refuse group sizes that do not divide an expert's input width, or non-float expert weights."""
    for name, mod in experts.items():
        for pname in EXPERT_PARAMS:
            p = getattr(mod, pname)
            cols = p.shape[-1]
            if not p.is_floating_point():
                raise QuantizationError(f"{name}.{pname} has a {p.dtype} weight; quantize_model_ needs a floating-point model")
            if config.w_bits < OFF_BITS and config.w_group_size is not None and cols % config.w_group_size:
                raise QuantizationError(
                    f"w_group_size={config.w_group_size} does not divide the input width {cols} of {name}.{pname}; "
                    f"choose a divisor of {cols}, per-channel scales (w_group_size=None), or add 'experts' to skip"
                )


def quantize_expert_rows_(p: torch.Tensor, e: int, q: torch.Tensor) -> float:
    """``p[e] ← q`` in place; returns ``‖p[e] − q‖_F / ‖p[e]‖_F`` (float64)."""
    w64 = p.detach()[e].to(torch.float64)
    err = ((q.detach().to(torch.float64) - w64).norm() / w64.norm().clamp_min(1e-300)).item()
    with torch.no_grad():
        p[e].copy_(q)
    return err


def _rtn_rows(w: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """RTN of a 2-D view (rows = output channels), with the config's clip search."""
    search = config.clip_search_kwargs()
    spec = config.weight_spec()
    ratio = clip_search(w, spec, **search) if search else 1.0
    return fake_quant(w, spec.with_clip(ratio))


def rtn_expert_(p: torch.Tensor, e: int, config: QuantConfig) -> float:
    """RTN of one expert's [out, in] matrix ``p[e]`` in place; returns its relative error."""
    return quantize_expert_rows_(p, e, _rtn_rows(p.detach()[e], config))


def rtn_quantize_experts_(experts: dict[str, nn.Module], config: QuantConfig) -> dict[str, float]:
    """RTN of every expert parameter, per expert and output channel/group. Returns
    ``{"<experts>.<param>": ‖P − Q(P)‖_F / ‖P‖_F}`` over all experts of the parameter."""
    errors = {}
    for name, mod in experts.items():
        for pname in EXPERT_PARAMS:
            p = getattr(mod, pname)
            w = p.detach().reshape(-1, p.shape[-1])  # (E·out, in): one row per (expert, output channel)
            q = _rtn_rows(w, config).reshape(p.shape)
            w64 = p.detach().to(torch.float64)
            errors[f"{name}.{pname}"] = ((q.to(torch.float64) - w64).norm() / w64.norm().clamp_min(1e-300)).item()
            with torch.no_grad():
                p.copy_(q)
    return errors


def routed_inputs(hidden: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None):
    """Per expert, the rows of ``hidden`` (T, H) the router sends to it: ``[X_0, ..., X_{E-1}]``, ``X_e`` (n_e, H).

    ``top_k_index`` (T, k) is the router's choice; ``mask`` (T,) bool drops padded tokens.
    """
    chosen = torch.zeros(hidden.shape[0], num_experts, dtype=torch.bool, device=hidden.device)
    chosen.scatter_(1, top_k_index.long(), True)
    if mask is not None:
        chosen &= mask.reshape(-1, 1)
    return [hidden[chosen[:, e]] for e in range(num_experts)]


_TOKENS_ATTR = "_rolora_routed_tokens"


def set_routed_token_counts(experts: nn.Module, counts: list[int]) -> None:
    """Remember how many calibration tokens GPTQ routed to each expert (a plain attribute, not in the state dict)."""
    experts.__dict__[_TOKENS_ATTR] = [int(c) for c in counts]


def routed_token_counts(experts: dict[str, nn.Module]) -> dict[str, list[int]]:
    """``{name: [tokens routed to expert e]}`` for the experts GPTQ calibrated (empty after RTN)."""
    return {n: m.__dict__[_TOKENS_ATTR] for n, m in experts.items() if _TOKENS_ATTR in m.__dict__}


class TokenQuantizer(nn.Module):
    """Dynamic fake quantization of a tensor with ``spec`` (over the last dim), with straight-through gradients."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.spec, ste=True)

    def extra_repr(self) -> str:
        return repr(self.spec)


def _input_hook(quantizer: TokenQuantizer):
    def hook(module, args):
        return (quantizer(args[0]),) + tuple(args[1:])

    return hook


def install_expert_activation_quantizers(model: nn.Module, names: list[str], config: QuantConfig, clips: dict) -> None:
    """Per-token quantizers on the experts' input (``<name>.gate_up_proj``) and on every expert's down_proj input
    (``<name>.down_proj``, after the online R4), with ``config.activation_bits`` of those names."""
    for name in names:
        experts = base_experts(model.get_submodule(name))
        spec_in, spec_down = (config.activation_spec(f"{name}.{p}", clips.get(f"{name}.{p}")) for p in EXPERT_PARAMS)
        if not spec_in.off:
            q = TokenQuantizer(spec_in)
            experts.__dict__[_INPUT_HOOK] = experts.register_forward_pre_hook(_input_hook(q))
        if not spec_down.off:
            q = TokenQuantizer(spec_down)
            try:
                add_expert_gate_transform(experts, _GATE_NAME, q)
            except RuntimeError as e:
                raise QuantizationError(f"{name}: {e}") from None


def remove_expert_activation_quantizers(model: nn.Module) -> None:
    """Remove every expert activation quantizer (the online R4 stays)."""
    for module in model.modules():
        handle = module.__dict__.pop(_INPUT_HOOK, None)
        if handle is not None:
            handle.remove()
        if _GATE_NAME in expert_gate_transforms(module):
            remove_expert_gate_transform(module, _GATE_NAME)
