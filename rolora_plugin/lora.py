"""Rotation-aware LoRA (RoLoRA's "LoRA After Rotation"): LoRA adapters live on the rotated weights.

Why ordinary peft configs already work. After :func:`rolora_plugin.rotate_model_` every linear of a decoder
layer is still a plain ``nn.Linear`` with its usual name, and the online R4 Hadamard is applied by the MLP to
the input of whatever module ``mlp.down_proj`` is at call time (see :mod:`rolora_plugin.online`). So when peft
wraps ``down_proj`` in a ``lora.Linear``, the Hadamard precedes *both* the frozen base weight and the LoRA
branch, and after ``merge_and_unload`` it precedes the merged Linear: with ``x`` the MLP activation and ``H`` the
R4 factor, ``(xH)(W H)ᵀ + s (xH) Aᵀ Bᵀ = (xH)(W H + s B A)ᵀ``, exactly the merged layer. The merged weight
``W H + s B A`` stays in the outlier-free basis (RoLoRA, Huang et al., EMNLP Findings 2024, Sec. 3.2).

Either order works:

* rotate, then attach LoRA (``get_rolora_peft_model``; required for DoRA, PiSSA, OLoRA, whose initialisation or
  magnitude vector depend on the weights they see);
* attach LoRA, then rotate (what :class:`rolora_plugin.callbacks.RoLoRACallback` does with a ``PeftModel``):
  ``rotate_model_`` rotates the LoRA matrices with the base weights (``A ← A R`` on the input side,
  ``B ← Rᵀ B`` on the output side), so the function of the model, adapters included, is unchanged.

What this module adds is name mapping and checks: :func:`map_target_modules` resolves ``"all-linear"`` to the
rotated linears of the model's family (never ``lm_head``, never the parameter-free online modules) and maps
unfused names (``q_proj``, ``gate_proj``...) onto fused families (Phi-3 ``qkv_proj``, ``gate_up_proj``).

It also holds the fake-quantized forward used for quantization-aware training and W4A4 monitoring
(:func:`enable_fake_quant_`, :func:`fake_quantized`; design notes at that section).

Example::

    >>> from rolora_plugin.lora import rolora_lora_config, get_rolora_peft_model  # doctest: +SKIP
    >>> cfg = rolora_lora_config(model, r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])  # doctest: +SKIP
    >>> peft_model = get_rolora_peft_model(model, cfg)  # rotates first if needed  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import get_architecture
from .config import RotationConfig
from ._peft import active_adapters as _active_adapters
from ._peft import lora_layer_names, unwrap_peft
from .rotation import check_online_rotations, ensure_rotated, get_rotation_record, missing_online_rotations

__all__ = [
    "ALL_LINEAR",
    "map_target_modules",
    "rolora_lora_config",
    "get_rolora_peft_model",
    "lora_layer_names",
    "check_online_rotations",
    "missing_online_rotations",
    "enable_fake_quant_",
    "fake_quantized",
    "fake_quant_active",
    "FakeQuantHandle",
]

logger = logging.getLogger(__name__)
ALL_LINEAR = "all-linear"


def map_target_modules(model: nn.Module, targets: str | Iterable[str]) -> list[str] | str:
    """Map user LoRA targets to leaf names of the rotated linears of ``model``'s family.

    Args:
        model: a causal LM of a registered family (bare or a peft ``PeftModel``), rotated or not.
        targets: ``"all-linear"``, a list of leaf names (``["q_proj", "v_proj"]``, ``["down_proj"]``), or any other
            string, which peft treats as a regular expression and which is returned unchanged.

    Returns:
        A sorted list of leaf names (``"all-linear"`` → every decoder-layer linear: attention inputs, o_proj, MLP
        inputs, down_proj; never ``lm_head``), or the regex string.

    Raises:
        ValueError: a listed name is not a linear of this family (the message lists the valid names).
    """
    spec = get_architecture(unwrap_peft(model))
    if isinstance(targets, str):
        return sorted(set(spec.linear_names())) if targets == ALL_LINEAR else targets
    targets = list(targets)
    for name, leaf in spec.fused_aliases().items():
        if name in targets:
            logger.info("LoRA target %r maps to the fused %r of %s (the adapter covers the whole fused linear)", name, leaf, spec.name)
    extra = (spec.lm_head,) if spec.lm_head else ()
    return spec.resolve_targets(targets, what="LoRA target", extra=extra)


def rolora_lora_config(model: nn.Module, *, r: int = 16, lora_alpha: int = 16, target_modules=("q_proj", "v_proj"), **kwargs):
    """A peft ``LoraConfig`` (task ``CAUSAL_LM``) whose targets are mapped with :func:`map_target_modules`.

    Defaults follow the RoLoRA paper (r=16, α=16, q/v). Extra ``kwargs`` go to ``LoraConfig`` unchanged.
    Raises ValueError when a weight-dependent variant (``use_dora``, ``init_lora_weights="pissa"/"olora"/...``)
    is requested for a model that is not rotated yet: those must be attached *after* the rotation.
    """
    from peft import LoraConfig

    init = kwargs.get("init_lora_weights", True)
    weight_dependent = kwargs.get("use_dora") or (isinstance(init, str) and init != "gaussian")
    if weight_dependent and get_rotation_record(unwrap_peft(model)) is None:
        raise ValueError(
            f"DoRA / init_lora_weights={init!r} depend on the weights they are attached to, so they must be attached "
            "to the rotated model: call rotate_model_(model) first (or use get_rolora_peft_model, which does)."
        )
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=map_target_modules(model, target_modules), **kwargs)


def get_rolora_peft_model(model: nn.Module, lora_config, rotation: RotationConfig | None = None, **kwargs):
    """Rotate ``model`` (unless it already carries a rotation record) and attach ``lora_config`` with peft.

    LoRA After Rotation in one call; returns peft's ``PeftModel``. ``rotation`` defaults to ``RotationConfig()``
    and is ignored (with a check that it matches) when the model is already rotated. ``kwargs`` go to
    ``peft.get_peft_model``.
    """
    from peft import get_peft_model

    ensure_rotated(model, rotation)
    return get_peft_model(model, lora_config, **kwargs)


# ---------------------------------------------------------------------------------------------- fake-quant (QAT)
#
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
#   ``Q_a`` is quant.py's STE (gradient 0 where the activation is clipped).
# * frozen plain linears fake-quantize their weight once and cache it (keyed on the weight's version);
# * trainable plain linears (full fine-tuning) use quant.py's differentiable ``fake_quantize_weight``.
#
# Under QAT the LoRA dropout is not applied: ``W_eff`` has no per-input dropout. DoRA is refused (its effective
# weight is not ``W + sBA``), and so are ZeRO-3 partitioned weights (the patched forward bypasses the
# submodules whose calls DeepSpeed uses to gather parameters).

_FQ_ATTR = "_rolora_fake_quant"


class _FakeQuantLoRALinear(torch.autograd.Function):
    """``y = x · Q_w(W + Σ s_i B_i A_i)ᵀ`` with an identity STE through ``Q_w``; gradients only for x, A_i, B_i."""

    @staticmethod
    def forward(ctx, x, weight, quantize_weight, scalings, *factors):
        with torch.no_grad():
            cdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            w_eff = weight.to(cdtype)
            for s, a, b in zip(scalings, factors[0::2], factors[1::2]):
                w_eff = w_eff + s * (b.to(cdtype) @ a.to(cdtype))
            wq = quantize_weight(w_eff).to(x.dtype)
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
    """Per-module QAT state: the :class:`~rolora_plugin.quant.QuantConfig` in force (None = bypass) and a cache."""

    def __init__(self, config):
        self.config = config
        self._cache = None

    def frozen_weight(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight._version, weight.data_ptr(), id(self.config))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.quantize_weight(weight))
        return self._cache[1]

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        from .quant import fake_quantize_weight

        c = self.config
        return fake_quantize_weight(w, c.w_bits, c.w_group_size, c.w_sym)


def _fake_quant_forward(self, x, *args, **kwargs):
    """Replacement ``forward`` of a target Linear / LoRA layer (see the design note above)."""
    from .quant import fake_quantize_activation

    state = self.__dict__[_FQ_ATTR]
    cfg = state.config
    if cfg is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = getattr(self, "base_layer", self)
    xq = fake_quantize_activation(x, cfg.a_bits, cfg.a_sym, cfg.a_clip_ratio).to(base.weight.dtype)
    adapters = _active_adapters(self)
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
    paths = spec.attention_inputs() + (spec.o_proj,) + spec.mlp_inputs() + (spec.down_proj,)
    leaves = None if targets in (ALL_LINEAR, "lora") else set(map_target_modules(inner, targets))
    found = {}
    for i, layer in enumerate(inner.get_submodule(spec.layers)):
        for path in paths:
            mod = layer.get_submodule(path)
            if (targets == "lora" and not hasattr(mod, "lora_A")) or (leaves is not None and path.rsplit(".", 1)[-1] not in leaves):
                continue
            found[f"{spec.layers}.{i}.{path}"] = mod
    return found


def _check_fake_quant_target(name: str, module: nn.Module) -> None:
    if any(getattr(module, "use_dora", {}).values()):
        raise ValueError(f"{name}: fake-quant training (QAT) does not support DoRA layers (effective weight is not W + sBA)")
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        raise ValueError(f"{name}: fake-quant training (QAT) does not support DeepSpeed ZeRO-3 partitioned weights; use ZeRO-2")
    if not isinstance(getattr(module, "base_layer", module), nn.Linear):
        raise ValueError(f"{name} is a {type(module).__name__}; fake quant supports nn.Linear and peft lora.Linear")


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
    if not modules:
        raise ValueError(f"fake quant: no target module matches {targets!r} (no LoRA layers yet?)")
    for name, m in modules.items():
        _check_fake_quant_target(name, m)
    for m in modules.values():
        m.__dict__[_FQ_ATTR] = _FakeQuantState(config)
        m.forward = types.MethodType(_fake_quant_forward, m)
    dropout = [n for n, m in modules.items() for d in getattr(m, "lora_dropout", {}).values() if isinstance(d, nn.Dropout) and d.p > 0]
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
