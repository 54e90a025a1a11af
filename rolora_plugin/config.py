"""Configuration dataclasses. Each validates itself and round-trips through dict / JSON."""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

__all__ = ["RotationConfig", "ConfigMixin", "RECORD_KEY", "QUANT_RECORD_KEY", "ROTATION_PRESETS", "LEARNABLE", "short_repr"]

RECORD_KEY = "rolora"  # model.config.<RECORD_KEY>: the rotation record (rolora_plugin.rotate.rotation)
QUANT_RECORD_KEY = "rolora_quant"  # model.config.<QUANT_RECORD_KEY>: the quantization record (rolora_plugin.quant)
LEARNABLE = ("r1", "r2")  # rotations rolora_plugin.rotate.learned can optimise on calibration data

# name -> RotationConfig fields; "w4a4" measured in benchmarks/learned_rotation.py and benchmarks/RESULTS.md
ROTATION_PRESETS = {
    "default": {},
    "w4a4": dict(r2=True, learn=("r1", "r2")),  # needs calibration= in rotate_model_
    "w4a4-hadamard": dict(r2=True),  # the same rotations without learning (no calibration data needed)
}


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset, _repr.maxlevel = 60, 60, 6, 6, 6, 6, 3


def short_repr(value) -> str:
    """``repr(value)`` cut to a few dozen characters, items and levels (``reprlib``), 160 characters in all: what error messages show of a
    value read from a user's file, which may be huge or, through YAML aliases, a few lists shared billions of times.

    >>> short_repr(["q_proj"] * 100)
    "['q_proj', 'q_proj', 'q_proj', 'q_proj', 'q_proj', 'q_proj', ...]"
    """
    text = _repr.repr(value)
    return text if len(text) <= 160 else text[:150] + "...(cut)"


def unknown_keys(data: dict, known: set) -> list[str]:
    """The keys of ``data`` not in ``known``, as sorted strings (YAML keys may be numbers, booleans or None)."""
    return sorted(short_repr(k) if not isinstance(k, str) else k for k in data if k not in known)


class ConfigMixin:
    """``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` for flat dataclass configs."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__} needs a mapping of its fields, got {type(data).__name__} {short_repr(data)}")
        known = {f.name for f in fields(cls)}
        unknown = unknown_keys(data, known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass
class RotationConfig(ConfigMixin):
    """Which rotations :func:`rolora_plugin.rotate_model_` applies (RoLoRA / QuaRot naming).

    Args:
        seed: seeds R1's random signs, R2's signs and any orthogonal fallback factor (``torch.Generator``, never the
            global RNG). Same seed → bit-identical rotated weights.
        r1: random-sign Hadamard on the residual stream (merged into weights; no runtime cost).
        r2: head-wise random-sign Hadamard on v_proj outputs / o_proj inputs (merged; GQA aware).
        r3: online Hadamard on queries and keys after RoPE (exact in full precision; useful for KV-cache quantization).
        r4: Hadamard on down_proj's input: merged into the weight plus an online transform of the activation.
        allow_fallback: for widths with no Hadamard construction, use a seeded random orthogonal factor
            (exact, still spreads outliers). False raises instead.
        compute_dtype: dtype of the rotation maths ("float64" or "float32"); results are cast back.
        untie_embeddings: untie tied input/output embeddings (required for an exact R1 with norm folding).
        learn: rotations to *learn* on calibration data under fake quantization (:mod:`rolora_plugin.rotate.learned`), a
            subset of ``("r1", "r2")``; each must also be enabled. Learning needs ``calibration=`` in
            :func:`rolora_plugin.rotate_model_`; the Hadamard rotation is the starting point.
        learn_steps: optimiser steps (Adam on the Cayley parameter).
        learn_lr: Adam learning rate on the skew-symmetric Cayley parameter.
        learn_tokens: calibration tokens kept per layer and input site (random subsample, seeded).
        learn_layers_per_step: layers whose objective terms enter one step (random subset, seeded); 0: all.
        learn_quant: name of the :meth:`rolora_plugin.QuantConfig.preset` whose bit widths / symmetry the
            learning objective fake-quantizes with.
        block_size: None (full-width Hadamards), or a power of two b: R1 and R4 become **block-diagonal**
            Hadamards ``I ⊗ H_b`` (R1 with random signs), each block mixing b consecutive channels only — matched to
            an FP4 format's group (16 NVFP4, 32 MXFP4) it flattens each quantization group without moving
            magnitude between groups (MR-GPTQ, arXiv 2509.23202). The online R4 is then compressed-tensors'
            ``hadamard`` with ``head_dim=b`` (vLLM routes NVFP4 + such a small input transform to fused kernels).
    """

    seed: int = 0
    r1: bool = True
    r2: bool = False
    r3: bool = False
    r4: bool = True
    allow_fallback: bool = True
    compute_dtype: str = "float64"
    untie_embeddings: bool = True
    learn: tuple = ()
    learn_steps: int = 60
    learn_lr: float = 3e-3
    learn_tokens: int = 256
    learn_layers_per_step: int = 8
    learn_quant: str = "w4a4"
    block_size: int | None = None

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"RotationConfig.seed must be a non-negative int, got {short_repr(self.seed)}")
        for name in ("r1", "r2", "r3", "r4", "allow_fallback", "untie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RotationConfig.{name} must be True or False, got {short_repr(getattr(self, name))}")
        if self.compute_dtype not in ("float64", "float32"):
            raise ValueError(f"RotationConfig.compute_dtype must be 'float64' or 'float32', got {short_repr(self.compute_dtype)}")
        if not (self.r1 or self.r2 or self.r3 or self.r4):
            raise ValueError("RotationConfig: every rotation is off (r1=r2=r3=r4=False); enable at least one")
        b = self.block_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 2 or b & (b - 1)):
            raise ValueError(f"RotationConfig.block_size must be None or a power of two >= 2 (e.g. 16 for NVFP4, 32 for MXFP4), got {short_repr(b)}")
        if b is not None and self.learn:
            raise ValueError("RotationConfig.block_size: learned rotations are dense; use block_size=None with learn=..., or learn=()")
        self._check_learning()

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (``learn`` as a list, as it comes back from JSON)."""
        return {**super().to_dict(), "learn": list(self.learn)}

    def _check_learning(self):
        if isinstance(self.learn, str) or not all(isinstance(n, str) for n in self.learn):
            raise ValueError(f"RotationConfig.learn must be a list of rotation names from {list(LEARNABLE)}, e.g. ['r1'], got {short_repr(self.learn)}")
        self.learn = tuple(dict.fromkeys(self.learn))
        for name in self.learn:
            if name not in LEARNABLE:
                raise ValueError(f"RotationConfig.learn: {short_repr(name)} cannot be learned; choose from {list(LEARNABLE)}")
            if not getattr(self, name):
                raise ValueError(f"RotationConfig.learn asks to learn {name} but {name}=False; enable it ({name}=True) or drop it from learn")
        for name in ("learn_steps", "learn_tokens", "learn_layers_per_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "learn_layers_per_step" else 1):
                raise ValueError(f"RotationConfig.{name} must be a positive int (learn_layers_per_step: 0 = all layers), got {short_repr(v)}")
        if isinstance(self.learn_lr, bool) or not isinstance(self.learn_lr, (int, float)) or not 0 < self.learn_lr < 1:
            raise ValueError(f"RotationConfig.learn_lr must be a float in (0, 1), e.g. 3e-3, got {short_repr(self.learn_lr)}")
        self.learn_lr = float(self.learn_lr)
        if not isinstance(self.learn_quant, str) or not self.learn_quant:
            # the name itself is checked against QuantConfig's presets when learning starts (quant.config imports this module)
            raise ValueError(f"RotationConfig.learn_quant must name a QuantConfig preset, e.g. 'w4a4', got {short_repr(self.learn_quant)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "RotationConfig":
        """A named rotation recipe, optionally with some fields overridden (mirrors :meth:`QuantConfig.preset`).

        * ``"default"``: ``RotationConfig()`` (R1 + R4, Hadamard).
        * ``"w4a4"``: R1 + R2 + R4 with R1 and R2 **learned** (needs ``calibration=`` in ``rotate_model_``): with
          ``QuantConfig.preset("w4a4")`` on SmolLM2 BoolQ 1.88× → 1.76× FP (the calibration text; ranges over two
          calibration draws do not overlap), SciQ 1.90× → 1.91× (no change); learned R1 alone: 1.85× / 1.96×
          (benchmarks/learned_rotation.py, benchmarks/RESULTS.md).
        * ``"w4a4-hadamard"``: the same rotations, Hadamard, no calibration data needed.

        Example::

            >>> RotationConfig.preset("w4a4").r2
            True
        """
        if name not in ROTATION_PRESETS:
            raise ValueError(f"unknown RotationConfig preset {short_repr(name)}; choose one of {sorted(ROTATION_PRESETS)}")
        return cls(**{**ROTATION_PRESETS[name], **overrides})
