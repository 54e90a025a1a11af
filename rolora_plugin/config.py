"""Configuration dataclasses. Each validates itself and round-trips through dict / JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

__all__ = ["RotationConfig", "ConfigMixin", "RECORD_KEY", "QUANT_RECORD_KEY"]

RECORD_KEY = "rolora"  # model.config.<RECORD_KEY>: the rotation record (rolora_plugin.rotation)
QUANT_RECORD_KEY = "rolora_quant"  # model.config.<QUANT_RECORD_KEY>: the quantization record (rolora_plugin.quant)


class ConfigMixin:
    """``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` for flat dataclass configs."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
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
    """

    seed: int = 0
    r1: bool = True
    r2: bool = False
    r3: bool = False
    r4: bool = True
    allow_fallback: bool = True
    compute_dtype: str = "float64"
    untie_embeddings: bool = True

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"RotationConfig.seed must be a non-negative int, got {self.seed!r}")
        for name in ("r1", "r2", "r3", "r4", "allow_fallback", "untie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RotationConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.compute_dtype not in ("float64", "float32"):
            raise ValueError(f"RotationConfig.compute_dtype must be 'float64' or 'float32', got {self.compute_dtype!r}")
        if not (self.r1 or self.r2 or self.r3 or self.r4):
            raise ValueError("RotationConfig: every rotation is off (r1=r2=r3=r4=False); enable at least one")
