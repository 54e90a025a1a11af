"""Hugging Face Trainer glue: ``RoLoRACallback`` (a ``transformers.TrainerCallback``) and ``add_rolora_callback``.

All logic is in :class:`rolora_plugin.callbacks.RoLoRACallbackMixin` (rotation, resume check, records, QAT,
monitor); this module only binds it to the host's callback base class. ``rolora_plugin.callbacks.RoLoRACallback``
resolves here lazily, so ``import rolora_plugin`` never imports transformers.
"""

from __future__ import annotations

from transformers import TrainerCallback

from ..callbacks import RoLoRACallbackMixin

__all__ = ["RoLoRACallback", "add_rolora_callback"]


class RoLoRACallback(RoLoRACallbackMixin, TrainerCallback):
    __doc__ = RoLoRACallbackMixin.__doc__


def add_rolora_callback(trainer, callback: RoLoRACallback | None = None) -> RoLoRACallback:
    """Attach ``callback`` (default ``RoLoRACallback()``) to an existing Trainer as its *first* callback.

    First, so the Trainer's reporters (TensorBoard, W&B, ...), which it runs before user callbacks, receive the
    monitor metrics. Call it before ``trainer.train()``: it rotates the model right away, which must happen before
    the optimizer is created.
    """
    if trainer.optimizer is not None:
        raise RuntimeError("add_rolora_callback: the Trainer already has an optimizer; attach RoLoRA before it is created")
    callback = callback if callback is not None else RoLoRACallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    callback.on_init_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
    return callback
