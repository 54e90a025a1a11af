"""Model-family specs: where a decoder keeps the pieces a rotation must touch.

Built-in families (Llama, Mistral, Qwen2, Qwen3, Phi-3) register through the ``rolora_register_architectures``
hook like any third-party plugin. Families with sandwich norms or ``(1 + w)`` RMSNorm (Gemma-2/3) cannot be
rotated exactly by folding and are deliberately absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .hookspecs import hookimpl

__all__ = ["ArchitectureSpec", "ModelDims", "UnsupportedArchitectureError", "get_architecture", "list_architectures"]


class UnsupportedArchitectureError(ValueError):
    """The model's family has no registered :class:`ArchitectureSpec`."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the rotation finds each piece of a decoder-only model. Paths are dotted attribute names.

    ``embed``, ``layers``, ``final_norm`` and ``lm_head`` are relative to the model (``lm_head`` may be absent for
    base models). Per-layer paths are relative to one decoder layer. Either ``q_proj``/``k_proj``/``v_proj`` or a
    fused ``qkv_proj`` (rows ordered q, k, v) must be set; likewise ``gate_proj``/``up_proj`` or a fused
    ``gate_up_proj`` (rows gate, up). All norms must be RMSNorm with output ``x / rms(x) * weight`` (no bias,
    no ``1 + weight``), or folding would not be exact.
    """

    name: str
    model_types: tuple[str, ...]
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str | None = "lm_head"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    q_proj: str | None = "self_attn.q_proj"
    k_proj: str | None = "self_attn.k_proj"
    v_proj: str | None = "self_attn.v_proj"
    qkv_proj: str | None = None
    o_proj: str = "self_attn.o_proj"
    mlp: str = "mlp"
    gate_proj: str | None = "mlp.gate_proj"
    up_proj: str | None = "mlp.up_proj"
    gate_up_proj: str | None = None
    down_proj: str = "mlp.down_proj"

    def __post_init__(self):
        if not self.model_types:
            raise ValueError(f"ArchitectureSpec {self.name!r}: model_types must name at least one config.model_type")
        if (self.qkv_proj is None) == (self.q_proj is None or self.k_proj is None or self.v_proj is None):
            raise ValueError(f"ArchitectureSpec {self.name!r}: set either q_proj/k_proj/v_proj or qkv_proj, not both")
        if (self.gate_up_proj is None) == (self.gate_proj is None or self.up_proj is None):
            raise ValueError(f"ArchitectureSpec {self.name!r}: set either gate_proj/up_proj or gate_up_proj, not both")

    # names of the linears in one layer that read the residual stream after each norm
    def attention_inputs(self) -> tuple[str, ...]:
        return (self.qkv_proj,) if self.qkv_proj else (self.q_proj, self.k_proj, self.v_proj)

    def mlp_inputs(self) -> tuple[str, ...]:
        return (self.gate_up_proj,) if self.gate_up_proj else (self.gate_proj, self.up_proj)

    def linear_names(self) -> tuple[str, ...]:
        """Leaf names of every rotated linear in a layer (what peft ``target_modules`` matches)."""
        paths = self.attention_inputs() + (self.o_proj,) + self.mlp_inputs() + (self.down_proj,)
        return tuple(p.rsplit(".", 1)[-1] for p in paths)


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(c.hidden_size, c.intermediate_size, heads, kv, head_dim, c.num_hidden_layers)


LLAMA = ArchitectureSpec(name="llama", model_types=("llama",))
MISTRAL = ArchitectureSpec(name="mistral", model_types=("mistral",))
QWEN2 = ArchitectureSpec(name="qwen2", model_types=("qwen2",))  # q/k/v biases are rotated with their rows
QWEN3 = ArchitectureSpec(name="qwen3", model_types=("qwen3",))  # q_norm/k_norm act per head: R1 does not reach them
PHI3 = ArchitectureSpec(
    name="phi3",
    model_types=("phi3",),
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="self_attn.qkv_proj",
    gate_proj=None,
    up_proj=None,
    gate_up_proj="mlp.gate_up_proj",
)
BUILTIN_ARCHITECTURES = (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3)


@hookimpl
def rolora_register_architectures():
    return list(BUILTIN_ARCHITECTURES)


@lru_cache(maxsize=1)
def _registry() -> dict[str, ArchitectureSpec]:
    from .plugins import get_plugin_manager

    table: dict[str, ArchitectureSpec] = {}
    # pluggy calls the most recently registered plugin first; reverse so later plugins override built-ins
    for specs in reversed(get_plugin_manager().hook.rolora_register_architectures()):
        for spec in specs or ():
            if not isinstance(spec, ArchitectureSpec):
                raise TypeError(f"rolora_register_architectures must return ArchitectureSpec objects, got {type(spec)}")
            for mt in spec.model_types:
                table[mt] = spec
    return table


def clear_architecture_cache() -> None:
    _registry.cache_clear()


def list_architectures() -> dict[str, ArchitectureSpec]:
    """``{model_type: spec}`` for every registered family."""
    return dict(_registry())


def get_architecture(model: nn.Module) -> ArchitectureSpec:
    """The spec for ``model`` (matched on ``model.config.model_type``), or a clear error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = _registry().get(model_type)
    if spec is None:
        known = ", ".join(sorted(_registry()))
        hint = (
            " Gemma-style models use sandwich norms / (1 + weight) RMSNorm, which cannot be folded exactly."
            if model_type and "gemma" in model_type
            else ""
        )
        raise UnsupportedArchitectureError(
            f"rolora-plugin cannot rotate {type(model).__name__} (config.model_type={model_type!r}); supported model "
            f"types: {known}.{hint} To add a family, return an rolora_plugin.ArchitectureSpec from a "
            "`rolora_register_architectures` hook in a plugin registered under the `rolora` entry-point group "
            "(see README, 'Extending')."
        )
    return spec


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise UnsupportedArchitectureError(
            f"{type(root).__name__} has no submodule {path!r} that its ArchitectureSpec expects: {e}"
        ) from None


def check_rms_norm(norm: nn.Module, where: str) -> None:
    """Refuse norms that folding would get wrong (bias, LayerNorm mean subtraction, missing weight)."""
    w = getattr(norm, "weight", None)
    name = type(norm).__name__
    if not isinstance(w, torch.Tensor) or getattr(norm, "bias", None) is not None or "RMSNorm" not in name:
        raise UnsupportedArchitectureError(
            f"{where} is a {name}; rotation folds only RMSNorm weights (x / rms(x) * weight, no bias)."
        )
