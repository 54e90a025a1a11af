"""The one place that knows peft's internals (attribute names of ``PeftModel`` and LoRA layers).

peft is never imported here: these helpers duck-type what peft builds, so they work on bare models too and keep
``import rolora_plugin`` free of host frameworks. Verified against peft 0.20 / 0.21 (``PeftModel.base_model`` is
a ``LoraModel`` whose ``.model`` is the transformers model; a LoRA layer keeps the wrapped module as
``base_layer`` and its factors in the ``ModuleDict``s ``lora_A`` / ``lora_B``, scalings in ``scaling``).
"""

from __future__ import annotations

from torch import nn

from .errors import RotationError

__all__ = [
    "active_adapters",
    "adapter_configs",
    "adapter_names",
    "bare_name",
    "base_experts",
    "base_layer",
    "lora_dropouts",
    "is_lora_layer",
    "is_peft_model",
    "lora_layer_names",
    "embedding_lora_outputs",
    "factor_weights",
    "is_lora_factor_name",
    "lora_parts",
    "param_lora_parts",
    "rescale_factors_",
    "unwrap_peft",
    "uses_dora",
]


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (it carries ``peft_config``)."""
    return hasattr(model, "peft_config")


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (or the model itself)."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model and hasattr(base, "model") and hasattr(base, "peft_config"):
        return base.model
    return model


def is_lora_layer(module: nn.Module) -> bool:
    """True for a peft LoRA layer (it wraps ``base_layer`` and holds ``lora_A``)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def lora_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the peft LoRA layers in ``model``."""
    return [name for name, m in model.named_modules() if is_lora_layer(m)]


def uses_dora(module: nn.Module) -> bool:
    """True if a LoRA layer has a DoRA magnitude vector (its effective weight is not ``W + sBA``)."""
    mags = getattr(module, "lora_magnitude_vector", None)
    return bool(mags) and len(mags) > 0


def lora_parts(module: nn.Module):
    """``(base module, [lora_A linears], [lora_B linears])`` of a peft LoRA layer, or ``(module, [], [])``.

    Raises :class:`RotationError` for wrappers a rotation cannot edit consistently (``modules_to_save`` copies,
    DoRA magnitude vectors).
    """
    if "original_module" in module._modules:  # peft ModulesToSaveWrapper / TrainableTokensWrapper
        raise RotationError(
            f"{type(module).__name__}: peft modules_to_save / trainable_token_indices keep several copies of a module "
            "the rotation must edit. Rotate the model first, then call get_peft_model (rotate_model_ on the bare model)."
        )
    base = getattr(module, "base_layer", None)
    if base is None:
        return module, [], []
    if uses_dora(module):
        raise RotationError(
            f"{type(module).__name__} uses DoRA; its magnitude vector is not invariant under rotation. Rotate the model "
            "first, then attach the DoRA adapter (rotate_model_ before get_peft_model)."
        )
    return base, list(module.lora_A.values()), list(module.lora_B.values())


def active_adapters(module: nn.Module) -> list[tuple[nn.Module, nn.Module, float]]:
    """``[(lora_A, lora_B, scaling)]`` that contribute to ``module``'s forward now (empty for a plain Linear)."""
    if not hasattr(module, "lora_A") or getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return []
    return [(module.lora_A[n], module.lora_B[n], module.scaling[n]) for n in module.active_adapters if n in module.lora_A]


def base_layer(module: nn.Module) -> nn.Module:
    """The module a peft LoRA layer wraps (``base_layer``), or ``module`` itself."""
    return getattr(module, "base_layer", module)


def lora_dropouts(module: nn.Module) -> list[nn.Module]:
    """The LoRA dropout modules of a peft LoRA layer (empty for a plain module)."""
    return list(getattr(module, "lora_dropout", {}).values())


def base_experts(module: nn.Module) -> nn.Module:
    """The transformers experts module under any peft ``ParamWrapper``s (nested, one per targeted parameter)."""
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def param_lora_parts(module: nn.Module, name: str) -> tuple[nn.Module, list[tuple[nn.Module, nn.Module]]]:
    """``(owner of parameter name, [(lora_A, lora_B)] of every peft ParamWrapper adapting it)``.

    ``module`` is the path's module as the model holds it now (the bare module, or peft's ParamWrapper chain).
    """
    parts = []
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        if module.parameter_name == name:
            parts += [(module.lora_A[k], module.lora_B[k]) for k in module.lora_A]
        module = module.base_layer
    return module, parts


def embedding_lora_outputs(module: nn.Module) -> list:
    """The hidden-side factors (``lora_embedding_B``) of a peft LoRA embedding; none for a bare embedding."""
    return list(getattr(module, "lora_embedding_B", {}).values())


def is_lora_factor_name(name: str) -> bool:
    """True for a parameter or module name inside a LoRA adapter (``...lora_A.default.weight`` and the like)."""
    return "lora_" in name


def bare_name(name: str) -> str:
    """A module or parameter name as the model without peft has it (peft's ``.base_layer`` hops removed)."""
    return name.replace(".base_layer", "")


def adapter_configs(model: nn.Module) -> dict:
    """``{adapter name: LoraConfig}`` of a ``PeftModel`` (empty for anything else)."""
    return getattr(model, "peft_config", None) or {}


def adapter_names(module: nn.Module) -> list[str]:
    """The adapters a LoRA layer holds."""
    return list(module.lora_A)


def factor_weights(module: nn.Module, adapters) -> list:
    """The ``lora_A`` and ``lora_B`` weights of ``adapters`` in a LoRA layer."""
    return [p for n in adapters for p in (module.lora_A[n].weight, module.lora_B[n].weight)]


def rescale_factors_(module: nn.Module, adapter: str, k: float) -> float:
    """``A ← A/k``, ``B ← B/k``, ``scaling`` and ``lora_alpha`` × k²: the delta ``scaling·B·A`` is unchanged while
    Adam's step on the function is multiplied by k. Returns the adapter's new ``lora_alpha``."""
    module.lora_A[adapter].weight.div_(k)
    module.lora_B[adapter].weight.div_(k)
    module.scaling[adapter] *= k * k
    module.lora_alpha[adapter] *= k * k
    return module.lora_alpha[adapter]
