"""Layer 5, fine-tuning in the rotated basis: LoRA targets, peft config and the LoRA step matched to the folded
norms (:mod:`.adapters`), the training config a host reads (:mod:`.config`: ``RoLoRAConfig`` and its sections),
and what watches a run (:mod:`.monitor`, activation statistics in :mod:`.kurtosis`).

``from rolora_plugin.lora import get_rolora_peft_model`` (the module's path before the regroup) keeps working:
this package hands on what :mod:`.adapters` exports.
"""

from . import adapters as _adapters
from .adapters import *  # noqa: F401,F403  (the names of rolora_plugin.lora before it became this package)

__all__ = list(_adapters.__all__)
