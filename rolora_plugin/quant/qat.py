"""Fake-quantized forward for quantization-aware training (QAT) and the W4A4 monitor.

:func:`enable_fake_quant_` patches the forward of the target linears (bare ``nn.Linear`` or peft LoRA layers) so it
computes what a W4A4 deployment of the *merged* model computes; :func:`fake_quantized` is its context-manager form
(e.g. a fake-quantized evaluation of the current model). Design notes below; maths in :mod:`.primitives`.

Example::

    >>> handle = enable_fake_quant_(peft_model, QuantConfig(w_bits=4, a_bits=4, skip=()))  # doctest: +SKIP
    >>> ...  # train: every target forward is y = Q_a(x) Q_w(W + sBA)ᵀ, gradients by the STE
    >>> handle.remove()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from .._peft import active_adapters, base_layer, is_lora_layer, lora_dropouts, unwrap_peft, uses_dora
from ..distributed import is_partitioned
from ..model.architectures import get_architecture
from .primitives import fake_quant

__all__ = ["ALL_LINEAR", "FakeQuantHandle", "enable_fake_quant_", "fake_quant_active", "fake_quantized", "fused_expert_modules"]

logger = logging.getLogger(__name__)
ALL_LINEAR = "all-linear"
_LORA_ONLY = "lora"

# Design. QAT fake-quantizes what a W4A4 deployment of the *merged* model computes: per-token activations and
# the effective weight ``W_eff = W + Σ_i s_i B_i A_i`` (RoLoRA's low-bit LoRA setting). It patches ``forward`` of
# each target (an instance attribute, removed by ``FakeQuantHandle.remove``), so it runs after every
# forward-pre-hook, in particular after the online R4 Hadamard that the MLP prepends to ``down_proj``: the
# quantizer sees the rotated activation. Cost is kept close to plain LoRA:
#
# * LoRA layers with a frozen base use :class:`_FakeQuantLoRALinear`: forward ``y = Q_a(x) Q_w(W_eff)ᵀ``; the
#   backward is the straight-through estimator for ``Q_w`` (identity; exact for the no-clip max scaling used
#   here, where no weight is clamped) written through the LoRA factors:
#   ``∂L/∂A_i = s_i (G B_i)ᵀ X`` and ``∂L/∂B_i = s_i Gᵀ (X A_iᵀ)`` with ``G`` the output gradient — the full
#   (out × in) weight gradient is never formed, so the backward costs what plain LoRA's does (+ the input grad).
#   ``Q_a`` is the STE of :mod:`.primitives` (gradient 0 where the activation is clipped).
# * frozen plain linears fake-quantize their weight once and cache it (keyed on the weight's version);
# * trainable plain linears (full fine-tuning) use the differentiable ``quantize_weight(..., ste=True)``.
#
# Under QAT the LoRA dropout is not applied: ``W_eff`` has no per-input dropout. DoRA is refused (its effective
# weight is not ``W + sBA``), and so are ZeRO-3 partitioned weights (the patched forward bypasses the
# submodules whose calls DeepSpeed uses to gather parameters).

_FQ_ATTR = "_rolora_fake_quant"
_SHARE_INPUTS = True  # False: every linear quantizes its own input (benchmarks/train_step.py's reference variant)


class _FakeQuantLoRALinear(torch.autograd.Function):
    """``y = x · Q_w(W + Σ s_i B_i A_i)ᵀ`` with an identity STE through ``Q_w``; gradients only for x, A_i, B_i."""

    @staticmethod
    def forward(ctx, x, weight, quantize_fn, scalings, *factors):
        with torch.no_grad():
            cdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            w_eff = weight.to(cdtype)
            for s, a, b in zip(scalings, factors[0::2], factors[1::2]):
                w_eff = w_eff + s * (b.to(cdtype) @ a.to(cdtype))
            wq = quantize_fn(w_eff).to(x.dtype)
        ctx.scalings = scalings
        ctx.save_for_backward(x, wq, *factors)
        return F.linear(x, wq)

    @staticmethod
    def backward(ctx, grad):
        x, wq, *factors = ctx.saved_tensors
        grad_x = grad @ wq if ctx.needs_input_grad[0] else None
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grads = []
        for s, a, b in zip(ctx.scalings, factors[0::2], factors[1::2]):
            ga = s * (g2 @ b.to(g2.dtype)).T @ x2
            gb = s * g2.T @ (x2 @ a.to(x2.dtype).T)
            grads += [ga.to(a.dtype), gb.to(b.dtype)]
        return (grad_x, None, None, None, *grads)


class _FakeQuantState:
    """Per-module QAT state: the :class:`~rolora_plugin.quant.QuantConfig` in force (None = bypass) and a cache.

    ``shared`` (one dict per :func:`enable_fake_quant_` call) keeps the last quantized input: linears that read the
    same input tensor (q/k/v, gate/up) under the same config reuse its fake quant instead of recomputing it (same
    values; the STE gradients of the readers add up on that one node, as they would on separate ones).
    """

    def __init__(self, config, shared: dict | None = None):
        self.config = config
        self._cache = None
        self.shared = {} if shared is None else shared

    def quantize_input(self, x: torch.Tensor, cfg) -> torch.Tensor:
        spec = cfg.activation_spec()
        if not _SHARE_INPUTS or isinstance(spec.clip_ratio, torch.Tensor):
            return fake_quant(x, spec, ste=True)
        key = (x._version, torch.is_grad_enabled(), spec)
        last = self.shared.get("input")
        if last is not None and last[0] is x and last[1] == key:
            return last[2]
        xq = fake_quant(x, spec, ste=True)
        self.shared["input"] = (x, key, xq)  # the strong reference to x keeps its id from being reused
        return xq

    def frozen_weight(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight._version, weight.data_ptr(), id(self.config))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.quantize_weight(weight))
        return self._cache[1]

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant(w, self.config.weight_spec(), ste=True)


def _fake_quant_forward(self, x, *args, **kwargs):
    """Replacement ``forward`` of a target Linear / LoRA layer (see the design note above)."""
    state = self.__dict__[_FQ_ATTR]
    cfg = state.config
    if cfg is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = base_layer(self)
    xq = state.quantize_input(x, cfg).to(base.weight.dtype)
    adapters = active_adapters(self)
    bias = base.bias
    for _, b, s in adapters:
        bias = bias if b.bias is None else (s * b.bias if bias is None else bias + s * b.bias)
    if not adapters:
        w = base.weight
        wq = state.quantize_weight(w) if w.requires_grad else state.frozen_weight(w)
        return F.linear(xq, wq.to(xq.dtype), bias)
    if base.weight.requires_grad:  # base trained too: plain autograd through W_eff
        w_eff = base.weight + sum(s * (b.weight @ a.weight) for a, b, s in adapters)
        return F.linear(xq, state.quantize_weight(w_eff), bias)
    factors = [t for a, b, _ in adapters for t in (a.weight, b.weight)]
    y = _FakeQuantLoRALinear.apply(xq, base.weight, state.quantize_weight, [s for *_, s in adapters], *factors)
    return y if bias is None else y + bias


def _fake_quant_targets(model: nn.Module, targets) -> dict[str, nn.Module]:
    """``{name: module}``: decoder-layer linears (``"all-linear"``), LoRA layers only (``"lora"``) or listed leaves."""
    inner = unwrap_peft(model)
    spec = get_architecture(inner)
    linears = spec.layer_linears(inner)
    if targets == ALL_LINEAR:
        return linears
    if targets == _LORA_ONLY:
        return {name: m for name, m in linears.items() if is_lora_layer(m)}
    if isinstance(targets, str):
        raise ValueError(f"fake quant targets must be {ALL_LINEAR!r}, {_LORA_ONLY!r} or a list of leaf names, got {targets!r}")
    extra = (spec.lm_head,) if spec.lm_head else ()  # accepted, as for LoRA targets, but never a layer linear
    leaves = set(spec.resolve_targets(targets, what="fake-quant target", extra=extra))
    return {name: m for name, m in linears.items() if name.rsplit(".", 1)[-1] in leaves}


def _check_fake_quant_target(name: str, module: nn.Module) -> None:
    if uses_dora(module):
        raise ValueError(f"{name}: fake-quant training (QAT) does not support DoRA layers (effective weight is not W + sBA)")
    if any(is_partitioned(p) for p in module.parameters()):
        raise ValueError(f"{name}: fake-quant training (QAT) does not support DeepSpeed ZeRO-3 partitioned weights; use ZeRO-2")
    if not isinstance(base_layer(module), nn.Linear):
        raise ValueError(f"{name} is a {type(module).__name__}; fake quant supports nn.Linear and peft lora.Linear")


def fused_expert_modules(model: nn.Module) -> list[str]:
    """Qualified names of the fused MoE experts modules of ``model`` (bare or peft): fake quant cannot reach them."""
    inner = unwrap_peft(model)
    spec = get_architecture(inner)
    if spec.experts is None:
        return []
    return [f"{spec.layers}.{i}.{spec.experts}" for i, layer in enumerate(spec.decoder_layers(inner)) if spec.is_moe_layer(layer)]


def _refuse_fused_experts(model: nn.Module) -> None:
    """A W4A4 fake-quant forward that leaves MoE experts in full precision would be mislabelled: refuse it."""
    moe = fused_expert_modules(model)
    if moe:
        raise ValueError(
            f"fake-quant training/evaluation (QAT, the W4A4 monitor) covers nn.Linear layers only; this model's fused "
            f"MoE experts ({len(moe)} layers, e.g. {moe[0]}) would stay in full precision and the result would not "
            "be W4A4. Evaluate W4A4 with rolora_plugin.quant.quantize_model_ (it quantizes every expert), or pass "
            "targets=[...] (e.g. attention leaves) for a labelled partial fake quant."
        )


class FakeQuantHandle:
    """Returned by :func:`enable_fake_quant_`: ``set_config(cfg)`` swaps bits (None = bypass), ``remove()`` undoes."""

    def __init__(self, modules: dict[str, nn.Module], config):
        self.modules = modules
        self.config = config

    def set_config(self, config) -> None:
        self.config = config
        for m in self.modules.values():
            m.__dict__[_FQ_ATTR].config = config

    def remove(self) -> None:
        for m in self.modules.values():
            state = m.__dict__.get(_FQ_ATTR)
            if state is not None:
                state.shared.clear()
            m.__dict__.pop(_FQ_ATTR, None)
            m.__dict__.pop("forward", None)
        self.modules = {}


def fake_quant_active(model: nn.Module) -> bool:
    """True if any module of ``model`` has a fake-quant forward installed by :func:`enable_fake_quant_`."""
    return any(_FQ_ATTR in m.__dict__ for m in model.modules())


def enable_fake_quant_(model: nn.Module, config, targets=ALL_LINEAR) -> FakeQuantHandle:
    """Fake-quantize weights and activations of ``targets`` in ``model``'s forward (STE; trains).

    Args:
        model: a (rotated) causal LM, bare or a ``PeftModel``.
        config: a :class:`rolora_plugin.quant.QuantConfig`; uses ``w_bits``, ``w_group_size``, ``w_sym``,
            ``a_bits``, ``a_sym``, ``a_clip_ratio`` (weights are scaled by their max: no clipping).
        targets: ``"all-linear"`` (every decoder-layer linear, as W4A4 deployment quantizes; lm_head never),
            ``"lora"`` (LoRA layers only) or a list of leaf names.

    Returns:
        A :class:`FakeQuantHandle`; call ``remove()`` to restore the original forwards.
    """
    if fake_quant_active(model):
        raise RuntimeError("fake quant is already enabled on this model; remove the existing handle first")
    modules = _fake_quant_targets(model, targets)
    if config is not None and targets == ALL_LINEAR:
        _refuse_fused_experts(model)
    if not modules:
        raise ValueError(f"fake quant: no target module matches {targets!r} (no LoRA layers yet?)")
    for name, m in modules.items():
        _check_fake_quant_target(name, m)
    shared: dict = {}
    for m in modules.values():
        m.__dict__[_FQ_ATTR] = _FakeQuantState(config, shared)
        m.forward = types.MethodType(_fake_quant_forward, m)
    dropout = [n for n, m in modules.items() for d in lora_dropouts(m) if isinstance(d, nn.Dropout) and d.p > 0]
    if dropout:
        logger.warning("fake quant: LoRA dropout is not applied under QAT (%d layers, e.g. %s)", len(dropout), dropout[0])
    return FakeQuantHandle(modules, config)


@contextlib.contextmanager
def fake_quantized(model: nn.Module, config, targets=ALL_LINEAR):
    """Context manager form of :func:`enable_fake_quant_` (e.g. a W4A4 evaluation of the current model).

    If fake quant is already active on ``model`` (QAT), its modules temporarily use ``config`` instead
    (``config=None``: full precision) and are restored afterwards.
    """
    active = [m.__dict__[_FQ_ATTR] for m in model.modules() if _FQ_ATTR in m.__dict__]
    if active:
        saved = [s.config for s in active]
        for s in active:
            s.config = config
        try:
            yield
        finally:
            for s, c in zip(active, saved):
                s.config = c
        return
    if config is None:
        yield
        return
    handle = enable_fake_quant_(model, config, targets)
    try:
        yield
    finally:
        handle.remove()
