"""Rotation-aware LoRA (RoLoRA's "LoRA After Rotation"): LoRA adapters live on the rotated weights.

Why ordinary peft configs already work. After :func:`rolora_plugin.rotate_model_` every linear of a decoder
layer is still a plain ``nn.Linear`` with its usual name, and the online R4 Hadamard is applied by the MLP to
the input of whatever module ``mlp.down_proj`` is at call time (see :mod:`rolora_plugin.model.online`). So when peft
wraps ``down_proj`` in a ``lora.Linear``, the Hadamard precedes *both* the frozen base weight and the LoRA
branch, and after ``merge_and_unload`` it precedes the merged Linear: with ``x`` the MLP activation and ``H`` the
R4 factor, ``(xH)(W H)ᵀ + s (xH) Aᵀ Bᵀ = (xH)(W H + s B A)ᵀ``, exactly the merged layer. The merged weight
``W H + s B A`` stays in the outlier-free basis (RoLoRA, Huang et al., EMNLP Findings 2024, Sec. 3.2).

Either order works:

* rotate, then attach LoRA (``get_rolora_peft_model``; required for DoRA, PiSSA, OLoRA, whose initialisation or
  magnitude vector depend on the weights they see);
* attach LoRA, then rotate (what :class:`rolora_plugin.RoLoRACallback` does with a ``PeftModel``):
  ``rotate_model_`` rotates the LoRA matrices with the base weights (``A ← A R`` on the input side,
  ``B ← Rᵀ B`` on the output side), so the function of the model, adapters included, is unchanged.

What this module adds is name mapping and checks: :func:`map_target_modules` resolves ``"all-linear"`` to the
rotated linears of the model's family (never ``lm_head``, never the parameter-free online modules) and maps
unfused names (``q_proj``, ``gate_proj``...) onto fused families (Phi-3 ``qkv_proj``, ``gate_up_proj``).

Mixture-of-Experts families keep their experts as fused 3-D parameters (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]), which peft adapts through ``LoraConfig(target_parameters=...)`` (its
``ParamWrapper``: one rank-r pair per expert, ``delta[e] = s B_e A_e``). :func:`map_target_parameters` names them
(``"experts"`` → both); the online R4 acts inside the experts call (:mod:`rolora_plugin.model.online`), so it precedes the
adapted and the merged ``down_proj`` alike, and ``rotate_model_`` rotates ``A``/``B`` with the experts
(:mod:`rolora_plugin.rotate.moe`). ``merge_and_unload`` folds every expert's delta exactly.

The fake-quantized forward used for quantization-aware training and W4A4 monitoring lives in
:mod:`rolora_plugin.quant.qat`.

Example::

    >>> from rolora_plugin.lora import rolora_lora_config, get_rolora_peft_model  # doctest: +SKIP
    >>> cfg = rolora_lora_config(model, r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])  # doctest: +SKIP
    >>> peft_model = get_rolora_peft_model(model, cfg)  # rotates first if needed  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Iterable

from torch import nn

from .._peft import adapter_configs, adapter_names, factor_weights, is_lora_layer, lora_layer_names, rescale_factors_, unwrap_peft, uses_dora
from ..config import short_repr
from ..distributed import gather_params
from ..errors import RotationError
from ..model.architectures import EXPERT_PARAMS, get_architecture, get_submodule
from ..rotate.config import RotationConfig
from ..rotate.rotation import check_online_rotations, ensure_rotated, get_rotation_record, missing_online_rotations
from .config import LR_SCALES

__all__ = [
    "ALL_LINEAR",
    "EXPERTS",
    "map_target_modules",
    "map_target_parameters",
    "rolora_lora_config",
    "get_rolora_peft_model",
    "lora_layer_names",
    "check_online_rotations",
    "missing_online_rotations",
    "LR_SCALES",
    "scale_lora_lr_",
]

logger = logging.getLogger(__name__)
ALL_LINEAR = "all-linear"
EXPERTS = "experts"


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
        ValueError: a listed name is not a linear of this family (the message lists the valid names), or
            ``targets`` is not a string or a non-empty list of strings (e.g. a nested list).
    """
    spec = get_architecture(unwrap_peft(model))
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            return targets
        return _tower_regex(spec, spec.linear_names()) if spec.tower else sorted(set(spec.linear_names()))
    names = list(targets) if isinstance(targets, Iterable) else None
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError("LoRA targets must be 'all-linear', a regex string or a non-empty list of module-name strings "
                         f"(e.g. ['q_proj', 'v_proj']), got {short_repr(targets)}")  # fmt: skip
    targets = names
    for name, leaf in spec.fused_aliases().items():
        if name in targets:
            logger.info("LoRA target %r maps to the fused %r of %s (the adapter covers the whole fused linear)", name, leaf, spec.name)
    extra = (spec.lm_head,) if spec.lm_head else ()
    leaves = spec.resolve_targets(targets, what="LoRA target", extra=extra)
    return _tower_regex(spec, leaves) if spec.tower else leaves


def _tower_regex(spec, leaves) -> str:
    """A peft ``target_modules`` regex matching ``leaves`` inside the language tower only (a VLM's vision tower has
    its own ``q_proj``/``v_proj``... that a list of leaf names would also hit)."""
    import re

    paths = [p for p in spec.linear_paths() if p.rsplit(".", 1)[-1] in leaves]
    pattern = rf"{re.escape(spec.layers)}\.\d+\.({'|'.join(re.escape(p) for p in paths)})"
    if spec.lm_head and spec.lm_head in leaves:
        pattern = rf"(?:{pattern}|{re.escape(spec.lm_head)})"
    return pattern


def map_target_parameters(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """peft ``target_parameters`` for the fused experts of an MoE family.

    Args:
        model: a causal LM of a registered MoE family (bare or a ``PeftModel``).
        targets: ``"experts"`` (both expert parameters) or a list of ``"gate_up_proj"`` / ``"down_proj"``.

    Returns:
        Parameter names relative to a decoder layer's experts path, e.g.
        ``["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]`` (peft matches them as suffixes).

    Raises:
        ValueError: the family has no fused experts, or a name is not an expert parameter.
    """
    spec = get_architecture(unwrap_peft(model))
    if spec.experts is None:
        raise ValueError(f"{spec.name} has no fused experts; target_parameters applies to MoE families only")
    names = list(EXPERT_PARAMS) if targets == EXPERTS else [targets] if isinstance(targets, str) else list(targets)
    bad = sorted(set(names) - set(EXPERT_PARAMS))
    if bad:
        raise ValueError(f"LoRA target parameter(s) {bad} are not expert parameters of {spec.name}; valid: {list(EXPERT_PARAMS)} or 'experts'")
    return sorted(f"{spec.experts}.{n}" for n in set(names))


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
    if kwargs.get("target_parameters") is not None:  # MoE experts (peft ParamWrapper)
        kwargs["target_parameters"] = map_target_parameters(model, kwargs["target_parameters"])
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


def scale_lora_lr_(model: nn.Module, mode: str = "norm-rms") -> dict[str, float]:
    """Give each LoRA layer of a rotated model the step size it had before the norm was folded (``"norm-rms"``).

    Why. Without rotation a reader's LoRA ``A`` sees the norm output ``x̂ ⊙ g``; R1 folds ``g`` into the frozen
    weight, so after rotation ``A`` sees ``x̂ R1`` with rms ≈ 1. ``rms(g)`` is small in trained LLMs (SmolLM2-135M:
    0.04–0.42), so the same optimizer step moves the rotated model's function about ``1 / rms(g)`` times further:
    RoLoRA then fits the task faster. Measured (``benchmarks/RESULTS.md``, issue 15; SmolLM2, 200 steps, 3 seeds):
    this option brings RoLoRA's task fit back to LoRA's but does not close its full-precision perplexity gap
    (+5.4% vs +4.7% without it) — under AdamW that gap comes from the direction of Adam's steps in the rotated
    coordinates, not from their size. Off by default for that reason.

    How. For the LoRA layer of every reader of a folded norm (attention inputs: the input norm; MLP inputs: the
    post-attention norm) with ``k = rms(g)`` from the rotation record, the factors are re-parametrised
    ``A ← A / k``, ``B ← B / k`` and the scaling ``s ← s k²`` (``lora_alpha`` too, and ``alpha_pattern`` of the peft
    config so a saved adapter reloads with it). ``s k² (B/k)(A/k) = s B A``: the model's function is unchanged, but
    an optimizer whose step is invariant to the gradient's scale (Adam, AdamW, Adafactor without relative steps...)
    now moves ``A`` and ``B`` by ``k`` times its learning rate, i.e. exactly a per-layer learning rate ``k · lr``
    up to Adam's ``eps``. Differences from per-group learning rates: AdamW's decoupled weight decay stays at
    ``lr · wd`` (a group rate would make it ``k · lr · wd``), and gradient clipping sees ``k ×`` smaller gradients
    of these factors. With SGD the effective rate would be ``k² · lr``. Other LoRA layers (``o_proj``, ``down_proj``: no folded norm) are untouched.

    Works in every host because it edits the model, not the optimizer: call it after rotation and after peft
    attached the adapters, before the optimizer is created (``RoLoRAConfig(lora_lr_scale="norm-rms")`` does it in
    :class:`rolora_plugin.RoLoRACallback`). Idempotent: a layer already scaled is left as it is.

    Args:
        model: a peft ``PeftModel`` of a rotated dense model whose record holds ``norm_rms`` (written by
            :func:`rolora_plugin.rotate_model_` or :func:`rolora_plugin.io.streaming.rotate_checkpoint` with R1).
        mode: ``"norm-rms"`` (or ``"none"``: nothing is done).

    Returns:
        ``{qualified LoRA layer name: k}`` of the layers scaled by this call.

    Raises:
        ValueError: unknown ``mode``, no LoRA layers, an MoE model, DoRA adapters.
        RotationError: the model is not rotated, or its record has no ``norm_rms`` (no R1, an older version).
    """
    import re

    import torch

    if mode not in LR_SCALES:
        raise ValueError(f"lora_lr_scale must be one of {LR_SCALES}, got {mode!r}")
    if mode == "none":
        return {}
    inner = unwrap_peft(model)
    record = get_rotation_record(inner)
    if record is None or record.norm_rms is None:
        raise RotationError(
            "lora_lr_scale='norm-rms' needs the rms of the norms R1 folded, read at rotation time, and this model's "
            + ("record has none (rotated without R1, or by an older rolora-plugin): rotate the "
               "original weights with rotate_model_ (R1 on)" if record is not None else "is not rotated: rotate it first (rotate_model_ or RoLoRACallback)")
        )
    spec = get_architecture(inner)
    layers = spec.decoder_layers(inner)
    if any(spec.is_moe_layer(layer) for layer in layers):
        raise ValueError(f"lora_lr_scale='norm-rms' is not supported for Mixture-of-Experts models ({spec.name}); use 'none'")
    if len(record.norm_rms) != len(layers):
        raise RotationError(f"rotation record has norm_rms for {len(record.norm_rms)} layers but the model has {len(layers)}")
    names = {id(m): n for n, m in inner.named_modules()}
    configs = adapter_configs(model)
    scaled, patterns = {}, {}
    for layer, (k_in, k_mlp) in zip(layers, record.norm_rms):
        for k, readers in ((k_in, spec.attention_inputs()), (k_mlp, spec.mlp_inputs())):
            for path in readers:
                module = get_submodule(layer, path)
                if not is_lora_layer(module) or getattr(module, "_rolora_lr_scale", None) is not None:
                    continue
                if uses_dora(module):
                    raise ValueError(f"{names[id(module)]}: lora_lr_scale does not support DoRA (its magnitude vector has its own step); use 'none'")
                key = re.escape(names[id(module)])
                # an adapter loaded from a saved, already scaled one carries our alpha_pattern key: not again
                todo = [n for n in adapter_names(module) if key not in (getattr(configs.get(n), "alpha_pattern", None) or {})]
                with torch.no_grad(), gather_params(factor_weights(module, todo)):
                    for n in todo:
                        patterns.setdefault(n, {})[key] = rescale_factors_(module, n, k)
                module._rolora_lr_scale = k
                if todo:
                    scaled[names[id(module)]] = k
    if not scaled and not any(getattr(m, "_rolora_lr_scale", None) for m in inner.modules()):
        raise ValueError("lora_lr_scale='norm-rms' found no LoRA layer on a folded-norm reader (q/k/v, gate/up); attach the adapters first")
    for adapter, found in patterns.items():  # ours first: peft takes the first matching key
        if adapter in configs:
            configs[adapter].alpha_pattern = {**found, **(configs[adapter].alpha_pattern or {})}
    if scaled:
        ks = list(scaled.values())
        logger.info("lora_lr_scale='norm-rms': %d LoRA layers, step scale %.3g–%.3g", len(ks), min(ks), max(ks))
    return scaled
