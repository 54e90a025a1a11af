"""Layer 1, the maths of rotations: Hadamard matrices built by our own code (:mod:`.sylvester`,
:mod:`.constructions`), the fast orthogonal transforms made of them (:mod:`.transform`, Triton kernels in
:mod:`.kernels` for CUDA tensors) and the weight-edit engine ``W ← Lᵀ·(W diag(s))·R`` (:mod:`.edits`).

Knows nothing of models: imports only the foundation (``plugins`` for the ``rolora_hadamard_matrix`` hook).
``from rolora_plugin.hadamard import build_transform`` (the module's path before the regroup) keeps working.
"""

from .constructions import NoHadamardError, derive_seed, find_hadamard_order, hadamard_matrix, paley
from .sylvester import sylvester
from .transform import OrthogonalTransform, build_block_transform, build_transform, fwht, hadamard_transform, hadamard_transform_ref

__all__ = [
    "OrthogonalTransform",
    "NoHadamardError",
    "hadamard_matrix",
    "sylvester",
    "paley",
    "find_hadamard_order",
    "build_block_transform",
    "build_transform",
    "hadamard_transform",
    "hadamard_transform_ref",
    "fwht",
    "derive_seed",
]
