"""Layer 5, fine-tuning in the rotated basis: LoRA targets, peft config and the LoRA step matched to the folded
norms (:mod:`.adapters`), the training config a host reads (:mod:`.config`: ``RoLoRAConfig`` and its sections),
and what watches a run (:mod:`.monitor`, activation statistics in :mod:`.kurtosis`).

``from rolora_plugin.lora import get_rolora_peft_model`` (the module's path before the regroup) keeps working.
"""

from .adapters import (
    ALL_LINEAR,
    EXPERTS,
    LR_SCALES,
    check_online_rotations,
    get_rolora_peft_model,
    lora_layer_names,
    map_target_modules,
    map_target_parameters,
    missing_online_rotations,
    rolora_lora_config,
    scale_lora_lr_,
)

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
