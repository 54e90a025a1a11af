"""rolora-plugin: RoLoRA (rotated outlier-free LoRA) for HF Trainer + peft, Axolotl and DeepSpeed.

Public API::

    from rolora_plugin import rotate_model_, RotationConfig
"""

from .architectures import ArchitectureSpec, UnsupportedArchitectureError, get_architecture, list_architectures
from .config import RotationConfig
from .hadamard import NoHadamardError, OrthogonalTransform, build_transform, hadamard_transform, hadamard_transform_ref
from .hookspecs import hookimpl
from .rotation import RotationError, RotationRecord, get_rotation_record, install_online_rotations, rotate_model_

__version__ = "0.1.0"

__all__ = [
    "ArchitectureSpec",
    "NoHadamardError",
    "OrthogonalTransform",
    "RotationConfig",
    "RotationError",
    "RotationRecord",
    "UnsupportedArchitectureError",
    "build_transform",
    "get_architecture",
    "get_rotation_record",
    "hadamard_transform",
    "hadamard_transform_ref",
    "hookimpl",
    "install_online_rotations",
    "list_architectures",
    "rotate_model_",
]
