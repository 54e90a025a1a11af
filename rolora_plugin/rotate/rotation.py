"""``rotate_model_``: rotate a decoder LLM in place so its activations lose their outliers, function unchanged.

Maths (row-vector convention, ``nn.Linear`` computes ``y = x Wᵀ + b``; R orthogonal):

* norm folding: ``(x/rms(x) ⊙ g) Wᵀ = (x/rms(x)) (W diag(g))ᵀ`` → ``W ← W diag(g)``, ``g ← 1``.
* R1 on the residual stream ``x' = x R1``: embeddings ``E ← E R1``; readers (q/k/v, gate/up, lm_head)
  ``W ← W R1``; writers (o_proj, down_proj) ``W ← R1ᵀ W``, ``b ← b R1``. RMSNorm with unit weight commutes with
  R1 because ``rms(x R1) = rms(x)``. Embeddings are *not* mean-centred (that breaks exactness for RMSNorm).
* R2 per attention head on values: ``W_v ← (I ⊗ H)ᵀ W_v``, ``b_v ← b_v (I ⊗ H)``, ``W_o ← W_o (I ⊗ H)`` (the same
  H for every head, so GQA sharing is respected).
* R4 on down_proj's input: ``W_down ← W_down H`` and the activation is multiplied by H online (:mod:`.online`).
* R3: queries and keys multiplied by H online after RoPE; ``(qH)(kH)ᵀ = qkᵀ``.

LoRA layers already attached by peft are rotated consistently (``A ← A R`` on the input side, ``B ← Rᵀ B`` on the
output side, ``A ← A diag(g)`` when folding), so rotation and LoRA commute.

Paper: RoLoRA (Huang et al., EMNLP Findings 2024), built on QuaRot (Ashkboos et al., 2024).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .._peft import embedding_lora_outputs, unwrap_peft
from .._peft import lora_parts as _lora_parts
from ..config import QUANT_RECORD_KEY, RECORD_KEY
from ..distributed import gather_params
from ..errors import RotationError
from ..finite import all_finite, check_finite_output, nonfinite_advice
from ..hadamard.constructions import derive_seed
from ..hadamard.edits import AxisOp, edit_, headwise, on_slice, shared_workspaces
from ..hadamard.transform import OrthogonalTransform, build_block_transform, build_transform
from ..model.architectures import ArchitectureSpec, ModelDims, check_rms_norm, get_architecture, get_submodule
from ..model.online import (
    QKRotation,
    add_attention_transform,
    attention_transforms,
    has_down_proj_rotation,
    install_down_proj_rotation,
    remove_online_rotations,
)
from ..plugins import get_plugin_manager
from .config import RotationConfig
from .fingerprint import weights_fingerprint
from .learned import attach_learned, held_learned, learn_rotations, learned_names, record_entries, resolve_learned
from .moe import check_attention_clip, check_moe_layer, has_moe_online, install_moe_online, moe_rotations, rotate_moe_mlp

__all__ = [
    "rotate_model_",
    "RotationRecord",
    "RotationError",
    "get_rotation_record",
    "build_rotations",
    "install_online_rotations",
    "missing_online_rotations",
    "check_online_rotations",
    "ensure_rotated",
    "gather_params",
    "RECORD_KEY",
    "all_finite",
    "check_finite_output",
]

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
_RECORD_KEYS = {"format_version", "family", "config", "dims", "rotations", "base_fingerprint", "norm_rms", "integrity"}


@dataclass
class RotationRecord:
    """What was applied to a model: enough to rebuild every rotation bit-for-bit and to verify it.

    Stored as a plain dict under ``model.config.rolora`` (so it lands in ``config.json``) and written as
    ``rolora_rotation.json`` next to checkpoints and adapters.
    """

    config: RotationConfig
    family: str
    dims: ModelDims
    rotations: dict = field(default_factory=dict)  # name -> {width, description, exact, checksum}
    format_version: int = FORMAT_VERSION
    base_fingerprint: str | None = None  # rolora_plugin.rotate.fingerprint of the weights before rotation (None: older record)
    # per decoder layer [rms(g_input_norm), rms(g_post_attention_norm)] of the norm gains R1 folded into their readers
    # (None: no R1 or an older record). Not part of the rotation's identity (compare=False): it
    # only feeds rolora_plugin.lora.adapters.scale_lora_lr_, so records with and without it describe the same basis.
    norm_rms: list | None = field(default=None, compare=False)
    # of an exported checkpoint: {"weights": sampled fingerprint of the weight files, "config": digest of config.json
    # less the fields that legitimately change} (rolora_plugin.io.integrity.checkpoint_integrity), verified by
    # load_rotated. None: a live model, an adapter's record or an older export. Not part of the rotation's identity.
    integrity: dict | None = field(default=None, compare=False)
    # the learned matrices themselves ({name: OrthogonalTransform}) when any rotation was learned: not serialised (they
    # live in rolora/learned_rotations.safetensors, the record keeps their sha256). Filled by rotate_model_,
    # get_rotation_record(model) (from the model that holds them) and read_rotation_record / load_learned.
    learned: dict = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict:
        out = {
            "format_version": self.format_version,
            "family": self.family,
            "config": self.config.to_dict(),
            "dims": asdict(self.dims),
            "rotations": self.rotations,
        }
        if self.base_fingerprint is not None:
            out["base_fingerprint"] = self.base_fingerprint
        if self.norm_rms is not None:
            out["norm_rms"] = self.norm_rms
        if self.integrity is not None:
            out["integrity"] = dict(self.integrity)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RotationRecord":
        try:
            if data["format_version"] != FORMAT_VERSION:
                raise RotationError(f"rotation record format {data['format_version']} is not supported (expected {FORMAT_VERSION})")
            unknown = sorted(set(data) - _RECORD_KEYS)
            if unknown:
                raise RotationError(
                    f"rotation record has unknown key(s) {unknown} (valid: {sorted(_RECORD_KEYS)}); it was edited or "
                    "written by a newer rolora-plugin: use the record written by rotate_model_"
                )
            fingerprint = data.get("base_fingerprint")
            if fingerprint is not None and not isinstance(fingerprint, str):
                raise RotationError(f"rotation record: base_fingerprint must be a string, got {fingerprint!r}")
            return cls(
                config=RotationConfig.from_dict(data["config"]),
                family=data["family"],
                dims=ModelDims(**data["dims"]),
                rotations=dict(data["rotations"]),
                base_fingerprint=fingerprint,
                norm_rms=_checked_norm_rms(data.get("norm_rms")),
                integrity=_checked_integrity(data.get("integrity")),
            )
        except RotationError:
            raise
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise RotationError(f"malformed rotation record ({str(e)[:200]!r}); expected the dict written by rotate_model_") from None

    def verify(self, transforms: dict[str, OrthogonalTransform] | None = None, *, skip_learned: bool = False) -> dict[str, OrthogonalTransform]:
        """Rebuild the rotations from the config (learned ones: from ``self.learned``) and check their checksums;
        returns them. ``skip_learned``: leave learned rotations out (for callers that need only the online ones)."""
        skipped = set(learned_names(self)) if skip_learned else set()
        if not transforms:
            rebuilt = build_rotations(self.config, self.dims)
            transforms = {n: t for n, t in rebuilt.items() if n not in skipped} if skip_learned else resolve_learned(self, rebuilt)
        rebuilt = {name: t.checksum() for name, t in transforms.items() if name not in skipped}
        stored = {name: r["checksum"] for name, r in self.rotations.items() if name not in skipped}
        if rebuilt != stored:
            raise RotationError(
                f"rotation record does not match the rotations rebuilt from its config (stored {stored}, rebuilt "
                f"{rebuilt}); the record was edited or written by an incompatible version"
            )
        return transforms


def _checked_integrity(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"weights", "config"} or not all(isinstance(v, str) or v is None for v in value.values()):
        raise RotationError(f"rotation record: integrity must be {{'weights': str, 'config': str}}, got {str(value)[:200]}")
    return dict(value)


def _checked_norm_rms(value) -> list | None:
    if value is None:
        return None
    ok = isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) and 0 < v < float("inf") for v in pair)
        for pair in value
    )
    if not ok:
        raise RotationError(f"rotation record: norm_rms must be a list of [input, post-attention] positive floats per layer, got {value!r}")
    return [[float(a), float(b)] for a, b in value]


def get_rotation_record(model_or_config) -> RotationRecord | None:
    """The :class:`RotationRecord` of a rotated model (or its config), or None if it was never rotated.

    From a model, the record also holds the learned matrices the model carries (``record.learned``)."""
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, RECORD_KEY, None)
    if not data:
        return None
    record = RotationRecord.from_dict(data)
    if isinstance(model_or_config, nn.Module):
        record.learned = held_learned(unwrap_peft(model_or_config))
    return record


def build_rotations(config: RotationConfig, dims: ModelDims) -> dict[str, OrthogonalTransform]:
    """The orthogonal transforms a config asks for, keyed ``r1``..``r4``. Deterministic in ``config.seed``."""
    fb = config.allow_fallback
    seed = config.seed
    out = {}
    block = config.block_size
    if block is not None:
        for name, width in (("hidden", dims.hidden), ("intermediate", dims.intermediate)):
            if width % block:
                raise RotationError(f"RotationConfig.block_size={block} does not divide the {name} width {width}; choose a power of two that divides it")
    if config.r1:
        out["r1"] = (
            build_block_transform(dims.hidden, block, random_signs=True, seed=derive_seed(seed, "r1")) if block
            else build_transform(dims.hidden, random_signs=True, seed=derive_seed(seed, "r1"), allow_fallback=fb)
        )  # fmt: skip
    if config.r2:
        out["r2"] = build_transform(dims.head_dim, random_signs=True, seed=derive_seed(seed, "r2"), allow_fallback=fb)
    if config.r3:
        out["r3"] = build_transform(dims.head_dim, seed=derive_seed(seed, "r3"), allow_fallback=fb)
    if config.r4:
        out["r4"] = build_block_transform(dims.intermediate, block) if block else build_transform(dims.intermediate, seed=derive_seed(seed, "r4"), allow_fallback=fb)
    out.update(moe_rotations(config, dims))  # MoE: r4_experts / r4_shared of their own widths
    return out


# ---------------------------------------------------------------------------------------------- weight edits


_edit = edit_  # W ← Lᵀ·(W diag(s))·R in place, the fast engine (rolora_plugin.hadamard.edits; edit_reference is its definition)


def _rotate_linear(module: nn.Module, cdtype, *, scale=None, right=None, left=None) -> None:
    """Apply input-side (scale, right) and output-side (left) edits to a Linear or a peft LoRA layer."""
    base, lora_a, lora_b = _lora_parts(module)
    _edit(base.weight, cdtype, scale=scale, right=right, left=left)
    if left is not None and base.bias is not None:
        with torch.no_grad():
            base.bias.copy_(left(base.bias.to(cdtype)))
    for a in lora_a:
        if scale is not None or right is not None:
            _edit(a.weight, cdtype, scale=scale, right=right)
    for b in lora_b:
        if left is not None:
            _edit(b.weight, cdtype, left=left)
            if b.bias is not None:  # peft lora_bias=True
                with torch.no_grad():
                    b.bias.copy_(left(b.bias.to(cdtype)))


def _rotate_embedding(embed: nn.Module, cdtype, right: Callable) -> None:
    """``E ← E R``; for a peft LoRA embedding also ``B ← Rᵀ B`` (its delta ``A[ids] Bᵀ`` lands in the hidden dim)."""
    base = _lora_parts(embed)[0]
    _edit(base.weight, cdtype, right=right)
    for b in embedding_lora_outputs(embed):
        _edit(b, cdtype, left=right)


def _headwise(t: OrthogonalTransform, head_dim: int, cdtype, inverse: bool = False) -> AxisOp:
    if t.n != head_dim:
        raise RotationError(f"a per-head rotation of width {t.n} for heads of {head_dim}")
    return headwise(t, inverse)


# ---------------------------------------------------------------------------------------------- checks


def _check_model(model: nn.Module, spec: ArchitectureSpec) -> None:
    if get_rotation_record(model) is not None:
        raise RotationError(
            f"{type(model).__name__} is already rotated (model.config.{RECORD_KEY} is set); rotating twice would apply "
            "the rotation twice. Load the original weights to rotate again with another config."
        )
    quant = getattr(model.config, QUANT_RECORD_KEY, None)
    if quant:
        cfg = quant.get("config", {}) if isinstance(quant, dict) else {}
        raise RotationError(
            f"the model is already W{cfg.get('w_bits', '?')}A{cfg.get('a_bits', '?')}-quantized (model.config.{QUANT_RECORD_KEY}); "
            "rotating quantized weights would mix the rotation into the quantization error. Rotate the "
            "full-precision model, then quantize."
        )
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise RotationError(
                f"parameter {name} is on the meta device; load real weights first (e.g. from_pretrained without "
                "device_map='meta' / init_empty_weights) before rotating"
            )
        if not p.is_floating_point() or p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise RotationError(
                f"parameter {name} has dtype {p.dtype}: quantized or integer weights cannot be rotated exactly. Rotate "
                "the full-precision model first, then quantize it (rolora_plugin.quantize_model_)."
            )
        if not all_finite(p.detach()):
            raise RotationError(f"parameter {name} holds NaN or Inf values; a rotation would spread them over whole rows. "
                                + nonfinite_advice(p.dtype))  # fmt: skip


def _untie(model: nn.Module, spec: ArchitectureSpec) -> None:
    if spec.lm_head is None:
        return
    embed, head = get_submodule(model, spec.embed), get_submodule(model, spec.lm_head)
    head_base = _lora_parts(head)[0]
    if not _shares_weight(head_base.weight, embed.weight):
        return
    with gather_params([embed.weight]):  # ZeRO-3: clone the full weight on every rank (DeepSpeed partitions it later)
        head_base.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    logger.info("untied lm_head from the input embeddings (needed for an exact R1)")


# ---------------------------------------------------------------------------------------------- the pass


def rotate_model_(
    model: nn.Module, config: RotationConfig | None = None, *, calibration=None, learned: dict | None = None, progress: bool = True
) -> RotationRecord:
    """Rotate ``model`` in place (RoLoRA / QuaRot rotations); the full-precision function is unchanged.

    Args:
        model: a causal LM of a registered family (``model.config.model_type``), possibly already wrapped by peft.
        config: which rotations; default ``RotationConfig()`` = R1 + R4.
        calibration: ``input_ids`` tensors or dicts; required when ``config.learn`` names rotations to learn
            (:mod:`rolora_plugin.rotate.learned`), unused otherwise.
        learned: ``{name: OrthogonalTransform}`` already learned (e.g. from a record's file) to apply instead of learning.
        progress: show a tqdm bar over layers.

    Returns:
        The :class:`RotationRecord`, also stored in ``model.config.rolora``.

    Example::

        >>> from rolora_plugin import rotate_model_, RotationConfig
        >>> record = rotate_model_(model, RotationConfig(seed=0, r2=True))  # doctest: +SKIP
    """
    config = config or RotationConfig()
    inner = unwrap_peft(model)
    spec = get_architecture(inner)
    _check_model(inner, spec)
    dims = ModelDims.from_config(inner.config)
    transforms = build_rotations(config, dims)  # raises before any edit if a width is not allowed
    layers = spec.decoder_layers(inner)
    _check_structure(inner, spec, layers, rotation=config)
    cdtype = getattr(torch, config.compute_dtype)
    fingerprint = weights_fingerprint(inner)  # of the weights as given, before any edit
    if config.learn:  # on the unrotated model, before any edit
        transforms = learn_rotations(inner, spec, dims, config, transforms, calibration, given=learned, progress=progress)

    with shared_workspaces():  # one pair of float64 workspaces for every edit of the pass
        norm_rms = _apply_edits(inner, spec, dims, config, transforms, layers, cdtype, progress)

    record = RotationRecord(
        config=config,
        family=spec.name,
        dims=dims,
        rotations={
            name: {"width": t.n, "description": t.description, "exact": t.exact, "checksum": t.checksum()}
            for name, t in transforms.items()
        },
        base_fingerprint=fingerprint,
        norm_rms=norm_rms,
    )
    if config.learn:
        for name, extra in record_entries(transforms, config).items():
            record.rotations[name].update(extra)
        record.learned = {n: transforms[n] for n in config.learn}
        attach_learned(inner, transforms, config.learn)
    install_online_rotations(inner, record, transforms)
    setattr(inner.config, RECORD_KEY, record.to_dict())
    get_plugin_manager().hook.rolora_model_rotated(model=model, record=record)
    logger.info("rotated %s (%s): %s", type(inner).__name__, spec.name, {k: v["description"] for k, v in record.rotations.items()})
    return record


def _apply_edits(inner, spec: ArchitectureSpec, dims: ModelDims, config: RotationConfig, transforms: dict, layers, cdtype, progress: bool):
    """Every weight edit of :func:`rotate_model_`, in order; returns the per-layer norm RMS (None without R1)."""
    if config.r1:
        if not config.untie_embeddings and _is_tied(inner, spec):
            raise RotationError("R1 on a model with tied embeddings needs RotationConfig(untie_embeddings=True)")
        _untie(inner, spec)
        embed = get_submodule(inner, spec.embed)
        with gather_params(list(embed.parameters())):
            _rotate_embedding(embed, cdtype, transforms["r1"].apply)
            check_finite_output(((f"{spec.embed}.{n}", p) for n, p in embed.named_parameters()))

    norm_rms = [] if config.r1 else None
    for i, layer in enumerate(tqdm(layers, desc="rotating layers", disable=not progress, leave=False)):
        with gather_params(list(layer.parameters())):
            if config.r1:  # read before the fold resets the gains
                norm_rms.append([_rms(_norm_gain(get_submodule(layer, n), spec, torch.float64)) for n in (spec.input_norm, spec.post_attention_norm)])
            _rotate_layer(layer, spec, dims, transforms, cdtype)
            check_finite_output(((f"{spec.layers}.{i}.{n}", p) for n, p in layer.named_parameters()))

    for path in spec.residual_writers if config.r1 else ():  # e.g. a VLM projector: its output is residual stream
        writer = get_submodule(inner, path)
        with gather_params(list(writer.parameters())):
            _rotate_linear(writer, cdtype, left=transforms["r1"].apply)
            check_finite_output(((f"{path}.{n}", p) for n, p in writer.named_parameters()))

    if config.r1 and spec.lm_head is not None:
        norm, head = get_submodule(inner, spec.final_norm), get_submodule(inner, spec.lm_head)
        with gather_params([norm.weight] + list(head.parameters())):
            _rotate_linear(head, cdtype, scale=_norm_gain(norm, spec, cdtype), right=transforms["r1"].apply)
            _reset_norm(norm, spec)
            check_finite_output(((f"{spec.lm_head}.{n}", p) for n, p in head.named_parameters()))
    return norm_rms


def _rms(gain: torch.Tensor) -> float:
    return float(gain.double().pow(2).mean().sqrt())


def _norm_gain(norm: nn.Module, spec: ArchitectureSpec, cdtype) -> torch.Tensor:
    """The per-channel gain ``g`` the norm multiplies by (:meth:`ArchitectureSpec.norm_gain`)."""
    return spec.norm_gain(norm, cdtype)


def _reset_norm(norm: nn.Module, spec: ArchitectureSpec) -> None:
    """After folding ``g`` into the readers, make the norm's gain 1: ``weight = 1 - offset``."""
    with torch.no_grad():
        norm.weight.fill_(1.0 - spec.norm_offset)


def _rotate_layer(layer, spec: ArchitectureSpec, dims: ModelDims, transforms: dict, cdtype) -> None:
    r1, r2, r4 = transforms.get("r1"), transforms.get("r2"), transforms.get("r4")
    hd = dims.head_dim
    right_r1 = r1.apply if r1 else None
    moe = spec.is_moe_layer(layer)
    if moe:
        ops = dict(gain=lambda n: _norm_gain(n, spec, cdtype), reset=lambda n: _reset_norm(n, spec), edit=_edit, rotate_linear=_rotate_linear)
        rotate_moe_mlp(layer, spec, transforms, cdtype, ops)
    pairs = ((spec.input_norm, spec.attention_inputs()),) + (() if moe else ((spec.post_attention_norm, spec.mlp_inputs()),))
    for norm_path, readers in pairs:
        norm = get_submodule(layer, norm_path)
        scale = _norm_gain(norm, spec, cdtype) if r1 else None
        for path in readers:
            left = None
            if r2 and path in (spec.v_proj, spec.qkv_proj):
                left = _headwise(r2, hd, cdtype)
                if path == spec.qkv_proj:
                    start = (dims.num_heads + dims.num_kv_heads) * hd
                    left = on_slice(left, start, start + dims.num_kv_heads * hd)
            _rotate_linear(get_submodule(layer, path), cdtype, scale=scale, right=right_r1, left=left)
        if r1:
            _reset_norm(norm, spec)
    o_right = _headwise(r2, hd, cdtype) if r2 else None
    o_left = r1.apply if r1 else None
    if o_right or o_left:
        _rotate_linear(get_submodule(layer, spec.o_proj), cdtype, right=o_right, left=o_left)
    d_right = r4.apply if r4 else None
    if not moe and (d_right or o_left):
        _rotate_linear(get_submodule(layer, spec.down_proj), cdtype, right=d_right, left=o_left)


def install_online_rotations(model: nn.Module, record: RotationRecord, transforms: dict | None = None) -> None:
    """(Re)install the online parts (R4 before down_proj, R3 on q/k) described by ``record`` on ``model``.

    Used by :func:`rotate_model_` and when loading a rotated checkpoint; verifies the record's checksums first.
    """
    inner = unwrap_peft(model)
    transforms = record.verify(transforms)
    spec = get_architecture(inner)
    remove_online_rotations(inner)
    for layer in spec.decoder_layers(inner):
        if spec.is_moe_layer(layer):
            install_moe_online(layer, spec, transforms)
        elif "r4" in transforms:
            mlp_path, down_attr = spec.down_proj_parent
            install_down_proj_rotation(get_submodule(layer, mlp_path), down_attr, transforms["r4"])
        if "r3" in transforms:
            add_attention_transform(get_submodule(layer, spec.attention), "r3", QKRotation(transforms["r3"]), inner.config, first=True)


def missing_online_rotations(model: nn.Module) -> list[str]:
    """Names (``"r4"``, ``"r3"``) of the online rotations ``model``'s record asks for that are not installed."""
    inner = unwrap_peft(model)
    record = get_rotation_record(inner)
    if record is None:
        raise RotationError(f"{type(inner).__name__} is not rotated (no model.config.{RECORD_KEY} record)")
    spec = get_architecture(inner)
    layers = spec.decoder_layers(inner)
    mlp_path = spec.down_proj_parent[0]
    missing = []
    def has_r4(layer):
        return has_moe_online(layer, spec) if spec.is_moe_layer(layer) else has_down_proj_rotation(layer.get_submodule(mlp_path))

    if "r4" in record.rotations and not all(has_r4(layer) for layer in layers):
        missing.append("r4")
    if "r3" in record.rotations and not all("r3" in attention_transforms(layer.get_submodule(spec.attention)) for layer in layers):
        missing.append("r3")
    return missing


def check_online_rotations(model: nn.Module) -> None:
    """Raise :class:`RotationError` if ``model`` is not rotated or its online rotations are not installed.

    A rotated checkpoint loaded with plain ``from_pretrained`` has the rotated weights but no online R4/R3: its
    function is then wrong until :func:`install_online_rotations` (or :func:`rolora_plugin.load_rotated`)
    rebuilds them.
    """
    missing = missing_online_rotations(model)
    if missing:
        raise RotationError(
            f"{type(unwrap_peft(model)).__name__} carries a rotation record but its online rotation(s) {missing} are "
            "not installed; call rolora_plugin.install_online_rotations(model, get_rotation_record(model)) or load it "
            "with rolora_plugin.io.export.load_rotated(path)"
        )


def ensure_rotated(model: nn.Module, config: RotationConfig | None = None, *, calibration=None, progress: bool = True) -> RotationRecord:
    """Rotate ``model`` unless it is rotated already; the one "rotate or check" step every host path uses.

    * not rotated: :func:`rotate_model_` with ``config`` (default ``RotationConfig()``);
    * rotated and ``config`` given: the record must carry this very config, else :class:`RotationError`;
    * rotated, online rotations missing (a checkpoint loaded with plain ``from_pretrained``): re-installed from
      the record (whose checksums are verified).

    Returns the model's :class:`RotationRecord`. Never rotates twice.
    """
    inner = unwrap_peft(model)
    record = get_rotation_record(inner)
    if record is None:
        return rotate_model_(model, config or RotationConfig(), calibration=calibration, progress=progress)
    if config is not None and record.config != config:
        raise RotationError(
            f"the model is already rotated with {record.config}, but {config} was asked for; load the original "
            "weights to rotate with another config, or ask for no particular rotation (None) to accept the existing one"
        )
    if missing_online_rotations(inner):
        logger.info("model is rotated but its online rotations are missing: re-installing them from the record")
        install_online_rotations(inner, record)
    else:
        logger.info("model already rotated (%s); not rotating again", record.config)
    return record


def _is_tied(model, spec) -> bool:
    if spec.lm_head is None:
        return False
    head = _lora_parts(get_submodule(model, spec.lm_head))[0]
    return _shares_weight(head.weight, get_submodule(model, spec.embed).weight)


def _shares_weight(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Tied weights: one Parameter, or one storage. ZeRO-3 partitioned params hold empty tensors whose data_ptr
    may coincide, so storages are compared only when non-empty."""
    return a is b or (a.numel() > 0 and a.data_ptr() == b.data_ptr())


def _check_structure(model, spec: ArchitectureSpec, layers, *, rotation: RotationConfig | None = None) -> None:
    """Validate every path and norm before the first edit, so a failure leaves the model untouched.

    ``rotation``: the config about to be applied (MoE: the experts implementation must take an online R4)."""
    check_attention_clip(model.config, rotation or RotationConfig(r2=False))
    _lora_parts(get_submodule(model, spec.embed))
    if spec.lm_head is not None:
        _lora_parts(get_submodule(model, spec.lm_head))
    check_rms_norm(get_submodule(model, spec.final_norm), spec.final_norm)
    for path in spec.residual_writers:
        if not isinstance(_lora_parts(get_submodule(model, path))[0], nn.Linear):
            raise RotationError(f"{path} (a residual writer of {spec.name}) is not an nn.Linear")
    if not layers:
        raise RotationError(f"{spec.layers} holds no layers")
    for i, layer in enumerate(layers):
        moe = spec.is_moe_layer(layer)
        if moe:
            check_moe_layer(layer, spec, f"{spec.layers}.{i}", rotation or RotationConfig(r4=False))
        for p in (spec.input_norm,) + (() if moe else (spec.post_attention_norm,)):
            check_rms_norm(get_submodule(layer, p), f"{spec.layers}.{i}.{p}")
        for p in spec.attention_inputs() + (spec.o_proj,) + (() if moe else spec.mlp_inputs() + (spec.down_proj,)):
            mod = _lora_parts(get_submodule(layer, p))[0]
            if not isinstance(mod, nn.Linear):
                raise RotationError(f"{spec.layers}.{i}.{p} is a {type(mod).__name__}, expected nn.Linear")
