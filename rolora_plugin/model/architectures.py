"""Model-family specs: where a decoder keeps the pieces a rotation must touch.

Built-in families (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, LLaVA's language tower, and the Mixture-of-Experts
families Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) register through the ``rolora_register_architectures``
hook like any third-party plugin. Families with sandwich norms (Gemma-2/3) cannot be rotated exactly by folding
and are deliberately absent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..hookspecs import hookimpl
from ..plugins import add_reset_callback, get_plugin_manager

__all__ = ["EXPERT_PARAMS", "ArchitectureSpec", "VLMSpec", "ModelDims", "architecture_by_name", "UnsupportedArchitectureError", "get_architecture", "list_architectures"]


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
    norm_offset: float = 0.0
    residual_writers: tuple[str, ...] = ()
    tower: str | None = None
    # Mixture-of-Experts (transformers 5 fused experts, see rolora_plugin.rotate.moe); all None for dense families. A layer
    # whose ``experts`` path exists is an MoE layer (Qwen2/3-MoE may mix in dense layers, which use the paths above).
    router: str | None = None  # module whose ``weight`` [E, H] reads the normed residual stream (not an nn.Linear)
    experts: str | None = None  # module with gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    shared_expert: str | None = None  # an ordinary gated MLP (gate_proj/up_proj/down_proj) beside the experts
    shared_expert_gate: str | None = None  # nn.Linear [1, H] reading the residual stream

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

    def norm_gain(self, norm: nn.Module, dtype=torch.float64) -> torch.Tensor:
        """The per-channel gain ``g`` an RMSNorm multiplies by, in ``dtype``: ``weight`` (Llama-style) or
        ``1 + weight`` (Gemma, :attr:`norm_offset`). Folding moves ``g`` into the norm's readers."""
        return norm.weight.detach().to(dtype) + self.norm_offset

    def is_moe_layer(self, layer: nn.Module) -> bool:
        """True if ``layer`` holds fused experts at :attr:`experts` (an MoE layer of an MoE family)."""
        return self.experts is not None and _has_submodule(layer, self.experts)

    def moe_linear_paths(self) -> tuple[str, ...]:
        """Paths of the ``nn.Linear``s an MoE layer has besides attention: the shared expert's (and its gate)."""
        if self.shared_expert is None:
            return ()
        own = tuple(f"{self.shared_expert}.{leaf}" for leaf in ("gate_proj", "up_proj", "down_proj"))
        return own + ((self.shared_expert_gate,) if self.shared_expert_gate else ())

    def layer_linear_paths(self, layer: nn.Module) -> tuple[str, ...]:
        """:meth:`linear_paths` for a dense layer; attention, o_proj and :meth:`moe_linear_paths` for an MoE layer
        (its experts are 3-D parameters, not linears: see :mod:`rolora_plugin.rotate.moe`)."""
        if not self.is_moe_layer(layer):
            return self.linear_paths()
        return self.attention_inputs() + (self.o_proj,) + self.moe_linear_paths()

    def linear_paths(self) -> tuple[str, ...]:
        """Paths (relative to one decoder layer) of every linear a rotation edits and W4A4 quantizes, in call order."""
        return self.attention_inputs() + (self.o_proj,) + self.mlp_inputs() + (self.down_proj,)

    def linear_names(self) -> tuple[str, ...]:
        """Leaf names of every rotated linear in a layer (what peft ``target_modules`` matches)."""
        return tuple(p.rsplit(".", 1)[-1] for p in self.linear_paths())

    def input_kinds(self) -> tuple[str, ...]:
        """One leaf name per distinct linear input of a layer (linears that read the same tensor share it):
        the first attention reader, ``o_proj``, the first MLP reader and ``down_proj``."""
        paths = (self.attention_inputs()[0], self.o_proj, self.mlp_inputs()[0], self.down_proj)
        return tuple(p.rsplit(".", 1)[-1] for p in paths)

    @property
    def down_proj_parent(self) -> tuple[str, str]:
        """``(path of the module that calls down_proj, attribute name of down_proj)``, e.g. ``("mlp", "down_proj")``."""
        parent, attr = self.down_proj.rsplit(".", 1)
        return parent, attr

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers of ``model`` (a bare transformers model of this family), in order."""
        return list(get_submodule(model, self.layers))

    def layer_linears(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{qualified name: module}`` of every per-layer linear (a Linear or a peft LoRA layer wrapping one)."""
        out = {}
        for i, layer in enumerate(self.decoder_layers(model)):
            for path in self.layer_linear_paths(layer):
                out[f"{self.layers}.{i}.{path}"] = get_submodule(layer, path)
        return out

    def fused_aliases(self) -> dict[str, str]:
        """Unfused leaf name → fused leaf name for families with fused projections (empty otherwise)."""
        aliases = {}
        if self.qkv_proj:
            fused = self.qkv_proj.rsplit(".", 1)[-1]
            aliases.update({"q_proj": fused, "k_proj": fused, "v_proj": fused})
        if self.gate_up_proj:
            fused = self.gate_up_proj.rsplit(".", 1)[-1]
            aliases.update({"gate_proj": fused, "up_proj": fused})
        return aliases

    def resolve_targets(self, names, *, what: str = "target", extra: tuple[str, ...] = ()) -> list[str]:
        """Map target leaf names onto this family's layer linears (``q_proj`` → ``qkv_proj`` for fused families).

        Returns the sorted distinct leaf names; ``extra`` names (e.g. ``lm_head``) are accepted as they are.
        Raises ValueError naming the valid choices for a name that is not a layer linear.
        """
        valid = self.linear_names()
        aliases = self.fused_aliases()
        mapped = set()
        for name in names:
            leaf = aliases.get(name, name)
            if leaf not in valid and name not in extra:
                raise ValueError(
                    f"{what} {name!r} is not a linear of a {self.name} decoder layer; valid names: {sorted(valid)}"
                    f" (or 'all-linear'). Fused families map q/k/v_proj and gate/up_proj onto their fused linear."
                )
            mapped.add(leaf)
        return sorted(mapped)


def _inside(path: str | None, tower: str) -> str | None:
    """A text-LM path (relative to the ``*ForCausalLM``, base model under ``model.``) moved under ``tower``."""
    if path is None:
        return None
    return f"{tower}.{path.removeprefix('model.')}"


@dataclass(frozen=True)
class VLMSpec:
    """A vision-language model whose language tower is any registered text family (LLaVA-style).

    The language tower is rotated like the text family (its spec is looked up from ``config.<text_config>``), the
    projector's last linear (``residual_writers``) is rotated on its output side (its output replaces token
    embeddings, so it writes the residual stream), and the vision tower is left alone. Paths are relative to the
    whole model (e.g. ``LlavaForConditionalGeneration``).
    """

    name: str
    model_types: tuple[str, ...]
    tower: str = "model.language_model"
    lm_head: str | None = "lm_head"
    residual_writers: tuple[str, ...] = ("model.multi_modal_projector.linear_2",)
    text_config: str = "text_config"

    def resolve(self, text: ArchitectureSpec) -> ArchitectureSpec:
        """The :class:`ArchitectureSpec` of the whole model: ``text``'s layout moved under :attr:`tower`."""
        t = self.tower
        return replace(
            text,
            name=f"{self.name}/{text.name}",
            model_types=self.model_types,
            embed=_inside(text.embed, t),
            layers=_inside(text.layers, t),
            final_norm=_inside(text.final_norm, t),
            lm_head=self.lm_head,
            residual_writers=self.residual_writers,
            tower=t,
        )


LLAVA = VLMSpec(name="llava", model_types=("llava",))


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    expert_intermediate: int | None = None  # MoE: width of one expert's down_proj input (its own R4)
    shared_intermediate: int | None = None  # MoE with a shared expert (Qwen2-MoE): its down_proj input width

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        n_experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
        expert = (getattr(c, "moe_intermediate_size", None) or c.intermediate_size) if n_experts else None
        shared = getattr(c, "shared_expert_intermediate_size", None) if n_experts else None
        return cls(c.hidden_size, c.intermediate_size, heads, kv, head_dim, c.num_hidden_layers, expert, shared or None)


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
# Gemma (1): (1 + w) RMSNorm (norm_offset=1) and embeddings scaled by sqrt(hidden): a scalar, so it commutes with R1.
GEMMA = ArchitectureSpec(name="gemma", model_types=("gemma",), norm_offset=1.0)
# Mixture-of-Experts (rolora_plugin.rotate.moe): router and every expert get R1, every expert's down_proj input its own R4.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # the 3-D parameters of transformers' fused experts modules
_MOE = dict(router="mlp.gate", experts="mlp.experts")
MIXTRAL = ArchitectureSpec(name="mixtral", model_types=("mixtral",), **_MOE)
QWEN2_MOE = ArchitectureSpec(name="qwen2_moe", model_types=("qwen2_moe",), shared_expert="mlp.shared_expert",
                             shared_expert_gate="mlp.shared_expert_gate", **_MOE)  # fmt: skip
QWEN3_MOE = ArchitectureSpec(name="qwen3_moe", model_types=("qwen3_moe",), **_MOE)  # per-head q/k norms as Qwen3
OLMOE = ArchitectureSpec(name="olmoe", model_types=("olmoe",), **_MOE)  # q/k norms over the full q/k width: after R1
BUILTIN_ARCHITECTURES = (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA, LLAVA, MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)


@hookimpl
def rolora_register_architectures():
    return list(BUILTIN_ARCHITECTURES)


@lru_cache(maxsize=1)
def _registry() -> dict[str, ArchitectureSpec]:
    table: dict[str, ArchitectureSpec] = {}
    # pluggy calls the most recently registered plugin first; reverse so later plugins override built-ins
    for specs in reversed(get_plugin_manager().hook.rolora_register_architectures()):
        for spec in specs or ():
            if not isinstance(spec, (ArchitectureSpec, VLMSpec)):
                raise TypeError(f"rolora_register_architectures must return ArchitectureSpec or VLMSpec objects, got {type(spec)}")
            for mt in spec.model_types:
                table[mt] = spec
    return table


def clear_architecture_cache() -> None:
    _registry.cache_clear()


add_reset_callback(clear_architecture_cache)  # specs come from hooks: re-read them when plugins are reloaded


def list_architectures() -> dict[str, ArchitectureSpec | VLMSpec]:
    """``{model_type: spec}`` for every registered family (text families and VLMs)."""
    return dict(_registry())


def architecture_by_name(name: str) -> ArchitectureSpec:
    """The spec a :class:`~rolora_plugin.rotate.rotation.RotationRecord` names in ``family`` (``"llama"``,
    ``"llava/llama"``...)."""
    outer, _, inner = name.partition("/")
    by_name = {s.name: s for s in _registry().values()}
    if outer not in by_name or (inner and inner not in by_name) or isinstance(by_name[outer], VLMSpec) != bool(inner):
        raise UnsupportedArchitectureError(f"no registered family named {name!r}; known: {sorted(by_name)}")
    return by_name[outer].resolve(by_name[inner]) if inner else by_name[outer]


def _resolve_vlm(vlm: VLMSpec, config) -> ArchitectureSpec:
    text_type = getattr(getattr(config, vlm.text_config, None), "model_type", None)
    text = _registry().get(text_type)
    if not isinstance(text, ArchitectureSpec):
        raise UnsupportedArchitectureError(
            f"{vlm.name}: its language tower (config.{vlm.text_config}.model_type={text_type!r}) is not a supported text "
            f"family; supported: {sorted(k for k, v in _registry().items() if isinstance(v, ArchitectureSpec))}"
        )
    return vlm.resolve(text)


def get_architecture(model: nn.Module) -> ArchitectureSpec:
    """The spec for ``model`` (matched on ``model.config.model_type``), or a clear error.

    For a VLM (:class:`VLMSpec`) the result is the language tower's family spec moved under the tower's path.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = _registry().get(model_type)
    if isinstance(spec, VLMSpec):
        return _resolve_vlm(spec, config)
    if spec is None:
        known = ", ".join(sorted(_registry()))
        hint = (
            " Gemma-2/3 use sandwich norms: an extra RMSNorm on each attention and MLP output, whose per-channel "
            "weight multiplies right before the residual add with no linear layer after it to absorb the rotation, "
            "so R1 cannot be folded exactly. Gemma (1) is supported."
            if model_type and model_type.startswith(("gemma2", "gemma3"))
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


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_rms_norm(norm: nn.Module, where: str) -> None:
    """Refuse norms that folding would get wrong (bias, LayerNorm mean subtraction, missing weight)."""
    w = getattr(norm, "weight", None)
    name = type(norm).__name__
    if not isinstance(w, torch.Tensor) or getattr(norm, "bias", None) is not None or "RMSNorm" not in name:
        raise UnsupportedArchitectureError(
            f"{where} is a {name}; rotation folds only RMSNorm weights (x / rms(x) * weight, no bias)."
        )
