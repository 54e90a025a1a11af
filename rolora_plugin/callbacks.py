"""Backwards-compatible alias of :mod:`rolora_plugin.integrations.hf_trainer` (the Hugging Face Trainer glue).

``from rolora_plugin.callbacks import RoLoRACallback`` keeps working; the names resolve on first access, so
``import rolora_plugin.callbacks`` does not import transformers. New code: ``from rolora_plugin import
RoLoRACallback`` or ``from rolora_plugin.integrations.hf_trainer import RoLoRACallback``. The host-free monitor
maths is in :mod:`rolora_plugin.monitor`, the ZeRO-3 export in :mod:`rolora_plugin.integrations.deepspeed`.
"""

import warnings

__all__ = ["RoLoRACallback", "add_rolora_callback", "install_save_hook", "remove_save_hook"]


def __getattr__(name: str):
    if name in __all__:
        from .integrations import hf_trainer

        return getattr(hf_trainer, name)
    if name == "RoLoRACallbackMixin":  # the logic now lives in the TrainerCallback subclass itself
        warnings.warn("RoLoRACallbackMixin is deprecated: use RoLoRACallback", DeprecationWarning, stacklevel=2)
        from .integrations.hf_trainer import RoLoRACallback

        return RoLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
