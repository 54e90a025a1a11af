"""``RotationConfig``: which rotations :func:`rolora_plugin.rotate_model_` applies, validated, dict / JSON round trip.

It lives with the rotation layer, above :mod:`rolora_plugin.quant`, so ``learn_quant`` is checked against
:data:`~rolora_plugin.quant.QUANT_PRESETS` when the config is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, short_repr, spec
from ..quant.config import QUANT_PRESETS

__all__ = ["RotationConfig", "ROTATION_PRESETS", "LEARNABLE"]

LEARNABLE = ("r1", "r2")  # rotations rolora_plugin.rotate.learned can optimise on calibration data

# name -> RotationConfig fields; "w4a4" measured in benchmarks/learned_rotation.py (benchmarks/RESULTS.md)
ROTATION_PRESETS = {
    "default": {},
    "w4a4": dict(r2=True, learn=("r1", "r2")),  # needs calibration= in rotate_model_
    "w4a4-hadamard": dict(r2=True),  # the same rotations without learning (no calibration data needed)
}


def _power_of_two(b: int) -> bool:
    return not b & (b - 1)


def _names(learn) -> bool:
    return all(isinstance(n, str) for n in learn)


@dataclass
class RotationConfig(Config):
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
            learning objective fake-quantizes with (checked when the config is built).
        block_size: None (full-width Hadamards), or a power of two b: R1 and R4 become **block-diagonal**
            Hadamards ``I ⊗ H_b`` (R1 with random signs), each block mixing b consecutive channels only — matched to
            an FP4 format's group (16 NVFP4, 32 MXFP4) it flattens each quantization group without moving
            magnitude between groups (MR-GPTQ, arXiv 2509.23202). The online R4 is then compressed-tensors'
            ``hadamard`` with ``head_dim=b`` (vLLM routes NVFP4 + such a small input transform to fused kernels).
    """

    seed: int = spec(0, kind=int, min=0, what="a non-negative int")
    r1: bool = spec(True, kind=bool)
    r2: bool = spec(False, kind=bool)
    r3: bool = spec(False, kind=bool)
    r4: bool = spec(True, kind=bool)
    allow_fallback: bool = spec(True, kind=bool)
    compute_dtype: str = spec("float64", choices=("float64", "float32"))
    untie_embeddings: bool = spec(True, kind=bool)
    learn: tuple = spec((), kind=tuple, check=_names, what=f"a list of rotation names from {list(LEARNABLE)}, e.g. ['r1']")
    learn_steps: int = spec(60, kind=int, min=1, what="a positive int")
    learn_lr: float = spec(3e-3, kind=float, gt=0, lt=1, what="a float in (0, 1), e.g. 3e-3")
    learn_tokens: int = spec(256, kind=int, min=1, what="a positive int")
    learn_layers_per_step: int = spec(8, kind=int, min=0, what="an int >= 0 (0 = all layers)")
    learn_quant: str = spec("w4a4", kind=str, nonempty=True, what="the name of a QuantConfig preset, e.g. 'w4a4'")
    block_size: int | None = spec(
        None, kind=int, min=2, check=_power_of_two, optional=True, what="None or a power of two >= 2 (e.g. 16 for NVFP4, 32 for MXFP4)"
    )

    def _check(self) -> None:
        if not (self.r1 or self.r2 or self.r3 or self.r4):
            raise ValueError("RotationConfig: every rotation is off (r1=r2=r3=r4=False); enable at least one")
        if self.block_size is not None and self.learn:
            raise ValueError("RotationConfig.block_size: learned rotations are dense; use block_size=None with learn=..., or learn=()")
        self.learn = tuple(dict.fromkeys(self.learn))
        for name in self.learn:
            if name not in LEARNABLE:
                raise ValueError(f"RotationConfig.learn: {short_repr(name)} cannot be learned; choose from {list(LEARNABLE)}")
            if not getattr(self, name):
                raise ValueError(f"RotationConfig.learn asks to learn {name} but {name}=False; enable it ({name}=True) or drop it from learn")
        if self.learn_quant not in QUANT_PRESETS:
            raise ValueError(f"RotationConfig.learn_quant: unknown QuantConfig preset {short_repr(self.learn_quant)}; "
                             f"choose one of {sorted(QUANT_PRESETS)}")  # fmt: skip

    @classmethod
    def preset(cls, name: str, **overrides) -> RotationConfig:
        """A named rotation recipe, optionally with some fields overridden (mirrors :meth:`QuantConfig.preset`).

        * ``"default"``: ``RotationConfig()`` (R1 + R4, Hadamard).
        * ``"w4a4"``: R1 + R2 + R4 with R1 and R2 **learned** (needs ``calibration=`` in ``rotate_model_``); what it
          measured with ``QuantConfig.preset("w4a4")``: benchmarks/RESULTS.md, "Numbers that lived in config
          docstrings" (``benchmarks/learned_rotation.py``).
        * ``"w4a4-hadamard"``: the same rotations, Hadamard, no calibration data needed.

        Example::

            >>> RotationConfig.preset("w4a4").r2
            True
        """
        if name not in ROTATION_PRESETS:
            raise ValueError(f"unknown RotationConfig preset {short_repr(name)}; choose one of {sorted(ROTATION_PRESETS)}")
        return cls(**{**ROTATION_PRESETS[name], **overrides})
