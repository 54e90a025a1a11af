"""Online rotations: transforms applied to activations at run time (R4 before down_proj, R3 on q/k after RoPE).

Placement of R4, and why. The Hadamard must act on the input of *both* the frozen base weight and the LoRA
branch of ``down_proj``, and survive peft's ``merge_and_unload`` (measured with peft
0.21, see tests/core/test_lora.py: a pre-hook on the Linear ends on ``base_layer`` only once peft wraps it; a hook on the LoRA layer is lost
at merge; a wrapper module forces users to target ``down_proj.<child>``). We therefore act *inside the MLP's
own call*: a forward-pre-hook on the MLP module attaches a temporary, prepended pre-hook to whatever module is
``mlp.down_proj`` at that moment (a plain ``nn.Linear``, peft's ``lora.Linear`` wrapper, or the merged Linear
after ``merge_and_unload``), and a forward hook on the MLP removes it. ``down_proj`` stays a plain
``nn.Linear`` with its usual name, so ``target_modules=["down_proj"]`` and ``"all-linear"`` just work, peft's
merge is exact, and the trick is family-agnostic (no MLP forward is re-implemented). Being prepended, the
rotation runs before any other pre-hook on ``down_proj`` (e.g. activation quantization).

Experts of a Mixture-of-Experts block (transformers 5 fused experts, 3-D ``gate_up_proj``/``down_proj``) have no
``down_proj`` module to hook. The ``batched_mm`` and ``grouped_mm`` experts implementations compute
``down(self._apply_gate(gate_up(x)))``, so the experts module gets an instance-level ``_apply_gate`` that runs
the class's gate and then an ordered table of transforms (R4 first, then e.g. activation quantization): the
Hadamard reaches every expert's down-projection input, with or without peft's ``ParamWrapper`` (which only
parametrizes the weights). The ``eager`` implementation inlines ``act_fn(gate) * up`` and is refused while a
transform is installed (a forward pre-hook checks the implementation on every call).

R3 is applied inside the attention function: the attention module gets an ordered table of ``(q, k, v) ->
(q, k, v)`` transforms, run by a wrapper registered in transformers' ``AttentionInterface`` around the
model's original implementation (sdpa, eager, ...). KV-cache fake quantization plugs into the same table.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from ..hadamard.transform import OrthogonalTransform

__all__ = [
    "OnlineHadamard",
    "use_consumer_arithmetic_",
    "install_down_proj_rotation",
    "remove_online_rotations",
    "add_attention_transform",
    "remove_attention_transform",
    "ROLORA_ATTN_PREFIX",
    "SUPPORTED_EXPERTS_IMPLEMENTATIONS",
    "add_expert_gate_transform",
    "expert_gate_transforms",
    "remove_expert_gate_transform",
    "check_experts_implementation",
]

ROLORA_ATTN_PREFIX = "rolora+"


class OnlineHadamard(nn.Module):
    """Applies an :class:`OrthogonalTransform` (``x @ R``) to the last dim of its input. No parameters.

    The dense factor and signs are kept as non-persistent buffers, so the module follows ``.to(device)`` and
    never appears in a state dict. Differentiable; works on any device and float dtype.
    """

    def __init__(self, transform: OrthogonalTransform, name: str = ""):
        super().__init__()
        self.transform = transform
        self.name = name
        self.width = transform.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.__dict__.get("_consumer_dense")
        if dense is not None:  # compressed-tensors' own arithmetic: (x @ W) / sqrt(n), W = float32 sqrt(n)·R (per block)
            w, scale = dense
            xw = x.to(w.dtype)
            if w.shape[0] < xw.shape[-1]:  # block-diagonal I ⊗ H_b: the b×b matrix on every block (its _multihead_matmul)
                return ((xw.unflatten(-1, (-1, w.shape[0])) @ w.to(x.device)).flatten(-2) / scale).to(x.dtype)
            return ((xw @ w.to(x.device)) / scale).to(x.dtype)
        return self.transform.apply(x)

    def use_consumer_arithmetic_(self, on: bool = True) -> None:
        """Compute ``x R`` as compressed-tensors' transform module and vLLM's dense path do: ``(x @ W) / √n`` with the
        stored float32 ``W = √n·R``. Same function up to float rounding; at 4-bit activations a rounding difference
        of 1e-7 flips codes that sit on a rounding tie, so an export is checked against its consumer in this mode."""
        if not on:
            self.__dict__.pop("_consumer_dense", None)
            return
        t = self.transform
        eye = t.dense is not None and t.signs is None and torch.equal(t.dense, torch.eye(t.dense.shape[0], dtype=t.dense.dtype))
        n = t.pow2 if eye else self.width  # block-diagonal Sylvester: the consumer holds one b×b block
        r = t.matrix(torch.float64)[:n, :n] if eye else t.matrix(torch.float64)
        w = (r * math.sqrt(n)).to(torch.float32)
        self.__dict__["_consumer_dense"] = (w, torch.tensor(n, dtype=torch.float64).sqrt())

    def extra_repr(self) -> str:
        return f"width={self.width}, {self.transform.description}"


def use_consumer_arithmetic_(model: nn.Module, on: bool = True) -> int:
    """Switch every online rotation of ``model`` to (or back from) compressed-tensors' dense arithmetic; returns the count."""
    mods = [m for m in model.modules() if isinstance(m, OnlineHadamard)]
    for m in mods:
        m.use_consumer_arithmetic_(on)
    return len(mods)


# ---------------------------------------------------------------------------------------------- R4 (down_proj)

_R4_ATTR = "rolora_r4"
_HANDLES_ATTR = "_rolora_online_handles"


class _PrependedInputTransform:
    """Temporary forward-pre-hook: replaces the first positional input by ``online(input)``."""

    def __init__(self, online: nn.Module):
        self.online = online

    def __call__(self, module, args):
        return (self.online(args[0]),) + tuple(args[1:])


def _mlp_pre_hook(mlp: nn.Module, args):
    down = getattr(mlp, mlp._rolora_down_attr)
    handle = down.register_forward_pre_hook(_PrependedInputTransform(getattr(mlp, _R4_ATTR)), prepend=True)
    mlp.__dict__.setdefault("_rolora_active", []).append(handle)


def _mlp_post_hook(mlp: nn.Module, args, output):
    active = mlp.__dict__.get("_rolora_active")
    if active:
        active.pop().remove()


def install_down_proj_rotation(mlp: nn.Module, down_attr: str, transform: OrthogonalTransform) -> OnlineHadamard:
    """Make ``mlp`` apply ``transform`` to the input of ``mlp.<down_attr>`` on every call (see module doc)."""
    if hasattr(mlp, _R4_ATTR):
        raise RuntimeError(f"{type(mlp).__name__} already has an online down_proj rotation")
    online = OnlineHadamard(transform, name="r4")
    mlp.add_module(_R4_ATTR, online)
    mlp._rolora_down_attr = down_attr
    handles = [mlp.register_forward_pre_hook(_mlp_pre_hook), mlp.register_forward_hook(_mlp_post_hook, always_call=True)]
    mlp.__dict__[_HANDLES_ATTR] = handles
    return online


# ---------------------------------------------------------------------------------------------- MoE experts (R4)

SUPPORTED_EXPERTS_IMPLEMENTATIONS = ("batched_mm", "grouped_mm")
_GATE_TABLE = "_rolora_gate_transforms"
_GATE_HOOK = "_rolora_gate_hook"


def check_experts_implementation(experts: nn.Module) -> None:
    """Raise if ``experts`` runs an experts implementation whose gate output cannot be transformed online."""
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if impl not in SUPPORTED_EXPERTS_IMPLEMENTATIONS:
        raise RuntimeError(
            f"{type(experts).__name__} runs experts_implementation={impl!r}, which computes act(gate) * up inline, so "
            f"the online R4 Hadamard (or activation quantizer) on every expert's down_proj input cannot be applied; "
            f"supported: {list(SUPPORTED_EXPERTS_IMPLEMENTATIONS)} (grouped_mm: float32/bfloat16/float16 only, a "
            "torch limit). Call model.set_experts_implementation('batched_mm') (or 'grouped_mm')."
        )


class _GateWithTransforms:
    """Instance-level ``experts._apply_gate``: the class's ``act(gate) * up`` ((S, 2I) → (S, I)), then every
    installed transform in order. A module-level class (not a bound function), so the model still pickles."""

    def __init__(self, experts: nn.Module):
        self.experts = experts

    def __call__(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        experts = self.experts
        out = type(experts)._apply_gate(experts, gate_up_out)
        for fn in experts.__dict__[_GATE_TABLE].values():
            out = fn(out)
        return out


def _check_hook(experts, args):
    check_experts_implementation(experts)


def add_expert_gate_transform(experts: nn.Module, name: str, fn: Callable, *, first: bool = False) -> None:
    """Run ``fn`` (shape (S, I) → (S, I)) on every expert's down_proj input (see module doc); ``first=True``
    puts it before the transforms already installed (R4 must precede an activation quantizer). An ``nn.Module``
    ``fn`` becomes the child ``rolora_gate_<name>`` so it follows device moves."""
    if not hasattr(type(experts), "_apply_gate"):
        raise RuntimeError(f"{type(experts).__name__} has no _apply_gate (not a transformers experts module)")
    check_experts_implementation(experts)
    _add_named_transform(experts, _GATE_TABLE, "rolora_gate_", name, fn, first, "expert gate transform")
    if _GATE_HOOK not in experts.__dict__:
        experts.__dict__["_apply_gate"] = _GateWithTransforms(experts)
        experts.__dict__[_GATE_HOOK] = experts.register_forward_pre_hook(_check_hook)


def _add_named_transform(owner: nn.Module, table_attr: str, prefix: str, name: str, fn: Callable, first: bool, what: str) -> None:
    """Put ``fn`` in ``owner``'s ordered transform table ``table_attr`` (at the front if ``first``); an ``nn.Module``
    ``fn`` also becomes the child ``<prefix><name>`` so it follows device moves. A name is installed once."""
    table = owner.__dict__.setdefault(table_attr, OrderedDict())
    if name in table:
        raise RuntimeError(f"{what} {name!r} is already installed on {type(owner).__name__}")
    if isinstance(fn, nn.Module):
        owner.add_module(f"{prefix}{name}", fn)
    table[name] = fn
    if first:
        table.move_to_end(name, last=False)


def expert_gate_transforms(experts: nn.Module) -> tuple[str, ...]:
    """Names of the transforms installed on ``experts``' down_proj input, in the order they run."""
    return tuple(experts.__dict__.get(_GATE_TABLE, {}))


def remove_expert_gate_transform(experts: nn.Module, name: str) -> None:
    """Remove one transform; the last one removed restores the class's ``_apply_gate`` and drops the check."""
    table = experts.__dict__.get(_GATE_TABLE, {})
    if table.pop(name, None) is not None and hasattr(experts, f"rolora_gate_{name}"):
        delattr(experts, f"rolora_gate_{name}")
    if not table and _GATE_HOOK in experts.__dict__:
        experts.__dict__.pop(_GATE_HOOK).remove()
        experts.__dict__.pop("_apply_gate", None)
        experts.__dict__.pop(_GATE_TABLE, None)


# ---------------------------------------------------------------------------------------------- attention (R3, KV)

_ATTN_TABLE = "_rolora_attn_transforms"


def add_attention_transform(attn: nn.Module, name: str, fn: Callable, config=None, *, first: bool = False) -> None:
    """Run ``fn(q, k, v) -> (q, k, v)`` on the attention inputs after RoPE (and after the KV cache update).

    Tensors are (batch, heads, seq, head_dim). Transforms run in insertion order; ``first=True`` puts ``fn``
    before those already installed (R3 uses it: it must precede a KV quantizer however often it is
    re-installed). If ``fn`` is an
    ``nn.Module`` it is registered as a child ``rolora_<name>`` so it follows device moves.
    ``config`` is the model config whose ``_attn_implementation`` gets wrapped (default: ``attn.config``).
    """
    _add_named_transform(attn, _ATTN_TABLE, "rolora_", name, fn, first, "attention transform")
    _wrap_attention_implementation(config if config is not None else attn.config, attn)


def attention_transforms(attn: nn.Module) -> tuple[str, ...]:
    """Names of the attention transforms installed on ``attn``, in the order they run."""
    return tuple(attn.__dict__.get(_ATTN_TABLE, {}))


def has_down_proj_rotation(mlp: nn.Module) -> bool:
    """True if ``mlp`` applies an online rotation (R4) to its ``down_proj`` input."""
    return hasattr(mlp, _R4_ATTR)


def remove_attention_transform(attn: nn.Module, name: str) -> None:
    table = attn.__dict__.get(_ATTN_TABLE, {})
    if table.pop(name, None) is not None and hasattr(attn, f"rolora_{name}"):
        delattr(attn, f"rolora_{name}")


def _wrap_attention_implementation(config, attn: nn.Module) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = config._attn_implementation or "eager"
    if current.startswith(ROLORA_ATTN_PREFIX):
        return
    wrapped = ROLORA_ATTN_PREFIX + current
    if wrapped not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(wrapped, _make_wrapper(current))
        if current in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = wrapped


def _make_wrapper(base: str):
    def rolora_attention(module, query, key, value, attention_mask, **kwargs):
        for fn in module.__dict__.get(_ATTN_TABLE, {}).values():
            query, key, value = fn(query, key, value)
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    rolora_attention.__name__ = f"rolora_{base.replace('|', '_')}_attention"
    return rolora_attention


def _base_attention(module: nn.Module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager" and base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" lives in each modeling file, not in the global table
    return sys.modules[type(module).__module__].eager_attention_forward


class QKRotation(nn.Module):
    """R3: ``q @ H``, ``k @ H`` per head (head_dim wide); ``(qH)(kH)ᵀ = qkᵀ`` so attention is unchanged."""

    def __init__(self, transform: OrthogonalTransform):
        super().__init__()
        self.online = OnlineHadamard(transform, name="r3")

    def forward(self, q, k, v):
        return self.online(q), self.online(k), v


def remove_online_rotations(model: nn.Module) -> None:
    """Remove every online rotation from ``model`` (used before re-installing from a record)."""
    for module in model.modules():
        for h in module.__dict__.pop(_HANDLES_ATTR, []):
            h.remove()
        if hasattr(module, _R4_ATTR):
            delattr(module, _R4_ATTR)
        if "r3" in module.__dict__.get(_ATTN_TABLE, {}):
            remove_attention_transform(module, "r3")
        if "r4" in module.__dict__.get(_GATE_TABLE, {}):
            remove_expert_gate_transform(module, "r4")
