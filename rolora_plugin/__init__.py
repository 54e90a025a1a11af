"""rolora-plugin: RoLoRA (rotated outlier-free LoRA) for HF Trainer + peft, Axolotl and DeepSpeed.

Public API (one import point)::

    from rolora_plugin import (
        rotate_model_, RotationConfig,                 # rotation engine (R1/R2/R3/R4, every width)
        quantize_model_, QuantConfig,                  # W4A4 ... W8A8, KV4; RTN, clip search, GPTQ
        RoLoRACallback, RoLoRAConfig,                  # HF Trainer callback (rotation, monitor, QAT, export)
        merge_and_export, load_rotated,                # merge in the rotated basis, standard safetensors
    )

``import rolora_plugin`` imports torch and pluggy only; transformers/peft are imported when first needed
(``RoLoRACallback`` is resolved lazily from :mod:`rolora_plugin.integrations.hf_trainer` because it subclasses
``transformers.TrainerCallback``).
"""

from . import _moved
from .hadamard.constructions import NoHadamardError
from .hadamard.transform import OrthogonalTransform, build_transform, hadamard_transform, hadamard_transform_ref
from .hookspecs import hookimpl
from .io.export import load_rotated, merge_and_export, quantize_and_export
from .io.loading import CheckpointError, load_causal_lm
from .io.records import load_learned
from .lora.adapters import get_rolora_peft_model, map_target_modules, map_target_parameters, rolora_lora_config, scale_lora_lr_
from .lora.config import ExportConfig, MonitorConfig, QATConfig, RoLoRAConfig
from .model.architectures import ArchitectureSpec, UnsupportedArchitectureError, VLMSpec, get_architecture, list_architectures
from .quant import (
    QuantConfig,
    QuantizationError,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_activation,
    quantize_model_,
    quantize_weight,
)
from .rotate.config import RotationConfig
from .rotate.rotation import RotationError, RotationRecord, ensure_rotated, get_rotation_record, install_online_rotations, rotate_model_

__version__ = "0.1.0"

_moved.install()  # one-release aliases of the module paths before the layer folders (rolora_plugin/_moved.py)

__all__ = [
    "ArchitectureSpec",
    "CheckpointError",
    "ExportConfig",
    "MonitorConfig",
    "NoHadamardError",
    "OrthogonalTransform",
    "QATConfig",
    "QuantConfig",
    "QuantizationError",
    "RoLoRACallback",
    "RoLoRAConfig",
    "RotationConfig",
    "RotationError",
    "RotationRecord",
    "UnsupportedArchitectureError",
    "VLMSpec",
    "build_transform",
    "ensure_rotated",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "get_architecture",
    "get_rolora_peft_model",
    "get_rotation_record",
    "load_causal_lm",
    "hadamard_transform",
    "hadamard_transform_ref",
    "hookimpl",
    "install_online_rotations",
    "list_architectures",
    "load_learned",
    "load_rotated",
    "map_target_modules",
    "map_target_parameters",
    "scale_lora_lr_",
    "merge_and_export",
    "quantize_activation",
    "quantize_and_export",
    "quantize_model_",
    "quantize_weight",
    "rolora_lora_config",
    "rotate_model_",
]


def __getattr__(name: str):
    if name == "RoLoRACallback":
        from .integrations.hf_trainer import RoLoRACallback

        return RoLoRACallback
    raise AttributeError(f"module 'rolora_plugin' has no attribute {name!r}")
