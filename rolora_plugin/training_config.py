"""Configuration of :class:`rolora_plugin.callbacks.RoLoRACallback`: rotation, monitor, QAT and export options.

Every config is a dataclass validated in ``__post_init__`` that round-trips through dict / JSON
(``RoLoRAConfig.from_dict(cfg.to_dict()) == cfg``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from .config import ConfigMixin, RotationConfig

__all__ = ["RoLoRAConfig", "MonitorConfig", "QATConfig", "ExportConfig"]

_TARGETS = ("all-linear", "lora")


def _check_bits(owner: str, **bits) -> None:
    for name, b in bits.items():
        if not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 16:
            raise ValueError(f"{owner}.{name} must be an int in 2..16 (16 = off), got {b!r}")


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def _check_group(owner: str, group_size) -> None:
    if group_size is not None:
        _check_int(owner, "w_group_size", group_size, 1)


def _check_targets(owner: str, targets):
    if isinstance(targets, str):
        if targets not in _TARGETS:
            raise ValueError(f"{owner}.targets must be 'all-linear', 'lora' or a list of leaf names, got {targets!r}")
        return targets
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{owner}.targets must be 'all-linear', 'lora' or a non-empty list of leaf names, got {targets!r}")
    return list(targets)


@dataclass
class MonitorConfig(ConfigMixin):
    """Quantization-aware monitor, logged through the Trainer's own ``log`` (so every reporter gets it).

    Args:
        every_n_steps: run every N optimizer steps (0 = off).
        activation_stats: log kurtosis and max-abs of the linear inputs, summarised per linear kind
            (``rolora/kurtosis/<kind>_in/{mean,max}``, ``rolora/max_abs/<kind>_in/max``).
        layers: decoder-layer indices additionally reported one by one (``rolora/kurtosis/layer<i>/<kind>_in``).
        fake_quant_eval: log the eval loss in full precision and fake-quantized (``rolora/eval_loss_fp``,
            ``rolora/eval_loss_w<w>a<a>``), the merged-model equivalent of post-training RTN quantization.
        w_bits / a_bits / w_group_size: the fake-quant setting of that evaluation (default W4A4 per channel).
        num_batches: how many eval batches each measurement uses.
    """

    every_n_steps: int = 50
    activation_stats: bool = True
    layers: list = field(default_factory=list)
    fake_quant_eval: bool = True
    w_bits: int = 4
    a_bits: int = 4
    w_group_size: int | None = None
    num_batches: int = 2

    def __post_init__(self):
        _check_int("MonitorConfig", "every_n_steps", self.every_n_steps, 0)
        _check_int("MonitorConfig", "num_batches", self.num_batches, 1)
        _check_bits("MonitorConfig", w_bits=self.w_bits, a_bits=self.a_bits)
        _check_group("MonitorConfig", self.w_group_size)
        for i in self.layers:
            _check_int("MonitorConfig", "layers[]", i, 0)
        if self.fake_quant_eval and self.w_bits == 16 and self.a_bits == 16:
            raise ValueError("MonitorConfig: fake_quant_eval with w_bits = a_bits = 16 measures nothing; lower the bits")
        self.layers = list(self.layers)

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0 and (self.activation_stats or self.fake_quant_eval)


@dataclass
class QATConfig(ConfigMixin):
    """Quantization-aware training: fake-quantized weights and activations in the forward (STE).

    Args:
        enabled: switch QAT on.
        start_step: global step from which the forward is fake-quantized (0 = from the start).
        w_bits / a_bits: bits of the effective weights ``W + sBA`` and of the per-token activations.
        w_group_size: weight quantization group size (None = per output channel).
        w_sym / a_sym: symmetric grids. a_clip_ratio: clip ratio of the activation scales (weights: no clip).
        targets: ``"all-linear"`` (every decoder-layer linear, as a W4A4 deployment), ``"lora"`` or leaf names.
    """

    enabled: bool = False
    start_step: int = 0
    w_bits: int = 4
    a_bits: int = 4
    w_group_size: int | None = None
    w_sym: bool = True
    a_sym: bool = True
    a_clip_ratio: float = 1.0
    targets: str | list = "all-linear"

    def __post_init__(self):
        for name in ("enabled", "w_sym", "a_sym"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QATConfig.{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("QATConfig", "start_step", self.start_step, 0)
        _check_bits("QATConfig", w_bits=self.w_bits, a_bits=self.a_bits)
        _check_group("QATConfig", self.w_group_size)
        if not 0.0 < self.a_clip_ratio <= 1.0:
            raise ValueError(f"QATConfig.a_clip_ratio must be in (0, 1], got {self.a_clip_ratio!r}")
        if self.enabled and self.w_bits == 16 and self.a_bits == 16:
            raise ValueError("QATConfig: enabled with w_bits = a_bits = 16 does nothing; set lower bits or enabled=False")
        self.targets = _check_targets("QATConfig", self.targets)


@dataclass
class ExportConfig(ConfigMixin):
    """What the callback writes.

    Args:
        save_rotation_record: write ``rolora_rotation.json`` next to every checkpoint and saved model/adapter.
        merged_output_dir: at the end of training, also :func:`rolora_plugin.export.merge_and_export` the model
            there (None = don't).
        overwrite: allow ``merged_output_dir`` to replace a non-empty directory.
    """

    save_rotation_record: bool = True
    merged_output_dir: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        for name in ("save_rotation_record", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ExportConfig.{name} must be True or False, got {getattr(self, name)!r}")


_SECTIONS = {"monitor": MonitorConfig, "qat": QATConfig, "export": ExportConfig}


@dataclass
class RoLoRAConfig:
    """Everything :class:`rolora_plugin.callbacks.RoLoRACallback` does.

    Args:
        rotation: the rotation applied in ``on_init_end`` when the model is not rotated yet. None (default):
            ``RotationConfig()`` for an unrotated model, and any existing rotation is accepted; set explicitly, an
            already rotated model must carry this very config.
        monitor / qat / export: see :class:`MonitorConfig`, :class:`QATConfig`, :class:`ExportConfig`
            (dicts are accepted and converted).
    """

    rotation: RotationConfig | None = None
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self):
        if isinstance(self.rotation, dict):
            self.rotation = RotationConfig.from_dict(self.rotation)
        if self.rotation is not None and not isinstance(self.rotation, RotationConfig):
            raise ValueError(f"RoLoRAConfig.rotation must be a RotationConfig, a dict or None, got {type(self.rotation).__name__}")
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
            elif not isinstance(value, cls):
                raise ValueError(f"RoLoRAConfig.{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")

    def to_dict(self) -> dict:
        out = {name: getattr(self, name).to_dict() for name in _SECTIONS}
        out["rotation"] = self.rotation.to_dict() if self.rotation is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RoLoRAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RoLoRAConfig: unknown section(s) {unknown}; valid sections are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RoLoRAConfig":
        return cls.from_dict(json.loads(text))
