"""Which linears a :class:`~rolora_plugin.quant.QuantConfig` quantizes (every ``nn.Linear`` not in ``skip``).

Shared by the model-level entry point (:mod:`.model`) and the GPTQ pipeline (:mod:`.gptq`), so neither imports
the other's module.
"""

from __future__ import annotations

from torch import nn

from .config import QuantConfig

__all__ = ["is_skipped", "quantizable_linears"]


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
