"""Mixture-of-Experts layers under rotation: router, fused experts, shared expert (transformers 5 layout).

In transformers 5 an MoE block holds a router ``gate`` (``weight`` [E, H]), an experts module with fused 3-D
parameters ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (expert ``e`` computes
``down[e] · (act(g) ⊙ u)`` with ``(g, u) = gate_up[e] · x``), and for Qwen2-MoE a shared expert (an ordinary gated
MLP of width ``shared_expert_intermediate_size``) scaled by ``sigmoid(shared_expert_gate · x)``.

Maths (row vectors, ``P[e]`` one expert's [out, in] matrix, R1 on the residual stream, ``H`` the R4 Hadamard of
the expert width, ``g`` the post-attention RMSNorm gain):

* readers of the normed residual stream: router ``W ← W diag(g) R1``, ``gate_up[e] ← gate_up[e] diag(g) R1`` for
  every ``e``, the shared expert's gate/up and the shared-expert gate likewise. Top-k routing sees unchanged
  logits, so every token picks the same experts.
* writers: ``down[e] ← R1ᵀ down[e] H`` and online ``act ← act · H`` before every expert's down projection
  (:func:`rolora_plugin.model.online.add_expert_gate_transform`); the shared expert as a dense MLP with its own R4.
* peft ``target_parameters`` LoRA on the experts (``ParamWrapper``, ``delta[e] = s B_e A_e``): input side
  ``A ← A R`` (A is [E·r, in], every row), output side ``B ← Rᵀ B`` (B is [out, r·E]), so LoRA and rotation commute.

Paper: RoLoRA (Huang et al., EMNLP Findings 2024) on QuaRot's rotations (Ashkboos et al., 2024).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .._peft import base_experts, lora_parts, param_lora_parts
from ..errors import RotationError
from ..hadamard.constructions import derive_seed
from ..hadamard.transform import OrthogonalTransform, build_transform
from ..model.architectures import EXPERT_PARAMS, ArchitectureSpec, ModelDims, check_rms_norm, get_submodule
from ..model.online import (
    OnlineHadamard,
    add_expert_gate_transform,
    check_experts_implementation,
    expert_gate_transforms,
    has_down_proj_rotation,
    install_down_proj_rotation,
)

__all__ = [
    "moe_rotations",
    "check_moe_layer",
    "check_attention_clip",
    "rotate_moe_mlp",
    "install_moe_online",
    "has_moe_online",
]

def moe_rotations(config, dims: ModelDims) -> dict[str, OrthogonalTransform]:
    """The extra R4 transforms of an MoE model: ``r4_experts`` (expert width), ``r4_shared`` (shared expert)."""
    out = {}
    if not config.r4:
        return out
    for key, width in (("r4_experts", dims.expert_intermediate), ("r4_shared", dims.shared_intermediate)):
        if width:
            out[key] = build_transform(width, seed=derive_seed(config.seed, key), allow_fallback=config.allow_fallback)
    return out


def _edit_3d(param: torch.Tensor, edit: Callable, cdtype, **ops) -> None:
    """``edit`` (rotation's 2-D ``_edit``) on every expert's [out, in] slice of a 3-D parameter."""
    for e in range(param.shape[0]):
        edit(param.data[e], cdtype, **ops)


def _rotate_param(module: nn.Module, name: str, _edit: Callable, cdtype, *, scale=None, right=None, left=None) -> None:
    """Input-side (scale, right) and output-side (left) edits of parameter ``name`` (2-D or 3-D) and its LoRA;
    ``_edit(W2d, cdtype, scale=, right=, left=)`` is the rotation engine's in-place 2-D edit."""
    owner, parts = param_lora_parts(module, name)
    p = getattr(owner, name)
    if p.dim() == 3:
        _edit_3d(p, _edit, cdtype, scale=scale, right=right, left=left)
    else:
        _edit(p.data, cdtype, scale=scale, right=right, left=left)
    for a, b in parts:
        if scale is not None or right is not None:
            _edit(a.weight, cdtype, scale=scale, right=right)
        if left is not None:
            _edit(b.weight, cdtype, left=left)


def check_moe_layer(layer: nn.Module, spec: ArchitectureSpec, where: str, config) -> None:
    """Validate an MoE layer before any edit: norm, router, fused experts (shape, transposition, bias), shared
    expert linears, and an experts implementation that takes the online R4 when ``config.r4``."""
    check_rms_norm(get_submodule(layer, spec.post_attention_norm), f"{where}.{spec.post_attention_norm}")
    router = get_submodule(layer, spec.router)
    if not isinstance(getattr(router, "weight", None), torch.Tensor) or getattr(router, "bias", None) is not None:
        raise RotationError(f"{where}.{spec.router} has no bias-free weight [E, H]; cannot rotate this router")
    experts = base_experts(get_submodule(layer, spec.experts))
    for name in EXPERT_PARAMS:
        p = getattr(experts, name, None)
        if not isinstance(p, torch.Tensor) or p.dim() != 3:
            raise RotationError(f"{where}.{spec.experts}.{name} is not a fused 3-D expert parameter [E, out, in]")
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise RotationError(
            f"{where}.{spec.experts}: only concatenated [E, out, in] gated experts without bias are supported "
            "(transposed, biased or gate-less experts are not)"
        )
    if getattr(experts, "has_post_expert_norm", False):
        raise RotationError(f"{where}.{spec.experts} normalises every expert output: R1 cannot pass that norm")
    for path in spec.moe_linear_paths():
        if not isinstance(lora_parts(get_submodule(layer, path))[0], nn.Linear):
            raise RotationError(f"{where}.{path} is not an nn.Linear")
    if config.r4:
        try:
            check_experts_implementation(experts)
        except RuntimeError as e:
            raise RotationError(str(e)) from None


def check_attention_clip(model_config, config) -> None:
    """OLMoE's ``clip_qkv`` clamps the values: R2 (a rotation of each value head) would change what is clamped."""
    model_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if config.r2 and getattr(model_config, "clip_qkv", None) is not None:
        raise RotationError(
            f"config.clip_qkv={model_config.clip_qkv} clamps q/k/v elementwise; R2 rotates the values first, so the "
            "clamp would no longer be the same function. Use RotationConfig(r2=False) for this model."
        )


def rotate_moe_mlp(layer: nn.Module, spec: ArchitectureSpec, transforms: dict, cdtype, ops: dict) -> None:
    """Rotate one MoE block in place (module doc): fold the post-attention norm into every residual-stream reader,
    apply R1 to readers and writers and R4 to every expert's down_proj input.

    ``ops`` are the rotation engine's helpers (this module does not import it): ``gain(norm)`` the norm's
    per-channel gain, ``reset(norm)`` sets it to 1, ``edit`` the in-place 2-D weight edit, ``rotate_linear``
    the edit of an ``nn.Linear`` or peft LoRA layer.
    """
    edit, _rotate_linear = ops["edit"], ops["rotate_linear"]
    r1, r4e, r4s = transforms.get("r1"), transforms.get("r4_experts"), transforms.get("r4_shared")
    right = r1.apply if r1 else None
    left = r1.apply if r1 else None
    norm = get_submodule(layer, spec.post_attention_norm)
    scale = ops["gain"](norm) if r1 else None
    experts = get_submodule(layer, spec.experts)
    if r1:
        _rotate_param(get_submodule(layer, spec.router), "weight", edit, cdtype, scale=scale, right=right)
        _rotate_param(experts, "gate_up_proj", edit, cdtype, scale=scale, right=right)
    if r1 or r4e:
        _rotate_param(experts, "down_proj", edit, cdtype, right=r4e.apply if r4e else None, left=left)
    if spec.shared_expert is not None:
        readers = (f"{spec.shared_expert}.gate_proj", f"{spec.shared_expert}.up_proj", spec.shared_expert_gate)
        for path in readers if r1 else ():
            _rotate_linear(get_submodule(layer, path), cdtype, scale=scale, right=right)
        if r1 or r4s:
            down = get_submodule(layer, f"{spec.shared_expert}.down_proj")
            _rotate_linear(down, cdtype, right=r4s.apply if r4s else None, left=left)
    if r1:
        ops["reset"](norm)


def install_moe_online(layer: nn.Module, spec: ArchitectureSpec, transforms: dict) -> None:
    """Install the online R4s of one MoE layer: every expert's down_proj input, the shared expert's down_proj."""
    if "r4_experts" in transforms:
        experts = base_experts(get_submodule(layer, spec.experts))
        add_expert_gate_transform(experts, "r4", OnlineHadamard(transforms["r4_experts"], name="r4"), first=True)
    if "r4_shared" in transforms and spec.shared_expert is not None:
        install_down_proj_rotation(get_submodule(layer, spec.shared_expert), "down_proj", transforms["r4_shared"])


def has_moe_online(layer: nn.Module, spec: ArchitectureSpec) -> bool:
    """True if every online R4 of this MoE layer is installed."""
    experts = base_experts(get_submodule(layer, spec.experts))
    ok = "r4" in expert_gate_transforms(experts)
    if spec.shared_expert is not None:
        ok = ok and has_down_proj_rotation(get_submodule(layer, spec.shared_expert))
    return ok
