"""Which linears a :class:`~rolora_plugin.quant.QuantConfig` quantizes (every ``nn.Linear`` not in ``skip``).

For a vision-language model (a registered :class:`~rolora_plugin.model.architectures.VLMSpec`, e.g. LLaVA) only the
language tower (and ``lm_head``, unless skipped) is quantized: the vision tower and the projector are listed as
skipped, since W4A4 targets the rotated language model.

Shared by the model-level entry point (:mod:`.model`) and the GPTQ pipeline (:mod:`.gptq`), so neither imports
the other's module.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError
from ..model.architectures import get_architecture
from .config import QuantConfig

__all__ = ["is_skipped", "language_scope", "quantizable_linears"]


def is_skipped(name: str, skip) -> bool:
    """True if module ``name`` matches an entry of ``skip`` (full name, dotted suffix or leaf name)."""
    return any(name == s or name.endswith("." + s) for s in skip)


def language_scope(model: nn.Module) -> tuple[str, ...] | None:
    """Module-name prefixes that may be quantized: ``(tower + ".", lm_head)`` for a VLM, None (everything) otherwise."""
    try:
        spec = get_architecture(model)
    except UnsupportedArchitectureError:
        return None
    if spec.tower is None:
        return None
    return (spec.tower + ".",) + ((spec.lm_head,) if spec.lm_head else ())


def _in_scope(name: str, scope) -> bool:
    return scope is None or any(name == s or name.startswith(s) for s in scope)


def quantizable_linears(model: nn.Module, config: QuantConfig) -> tuple[dict, list]:
    """``({name: Linear} to quantize, [skipped names])``, in module order (a VLM: language tower only)."""
    chosen, skipped = {}, []
    scope = language_scope(model)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            keep = _in_scope(name, scope) and not is_skipped(name, config.skip)
            (chosen.__setitem__(name, mod) if keep else skipped.append(name))
    return chosen, skipped
