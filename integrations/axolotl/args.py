"""Pydantic input args of :class:`~rolora_plugin.integrations.axolotl.plugin.RoLoRAPlugin`: one ``rolora:`` key.

Axolotl merges ``RoLoRAArgs`` into its config schema (``get_input_args``), so a typo or a bad value fails the
config validation with a message naming the key and the fix. The ``rotation``, ``monitor`` and ``qat`` sections
are the library's own dataclasses (:class:`rolora_plugin.RotationConfig`,
:class:`rolora_plugin.lora.config.MonitorConfig`, :class:`~rolora_plugin.lora.config.QATConfig`), built
with their ``from_dict`` so the checks and messages are the same as in Python. Example::

    plugins:
      - rolora.RoLoRAPlugin
    rolora:
      rotation: {seed: 0, r2: true}        # R1 + R2 + R4 (r1/r4 default on)
      monitor: {every_n_steps: 50}         # kurtosis + W4A4 fake-quant eval loss in the training logs
      qat: {enabled: false}                # {enabled: true, preset: nvfp4}: NVFP4 QAT (also mxfp4, w4a4-int, ...)
      export: {merge: true}                # <output_dir>/rolora-merged after training

``qat`` / ``monitor`` take the flat keys (``w_bits``, ``a_bits``, ...), a nested ``quant:`` mapping, or ``preset:``
(a ``QuantConfig.preset`` name: QAT trains in that preset's format, e.g. NVFP4; GPTQ / clip searches of the preset
are post-training steps, run on the merged export: ``rolora quantize ... --recipe nvfp4``). A bad value fails the
config validation with the library's message, e.g. ``rolora.qat: QATConfig.preset must be one of [...]``.

The defaults are the library's (``ExportConfig.default("overwrite")``, ...), read from its config classes so they
cannot drift; ``merge`` is the plugin's own switch (the library's ``ExportConfig`` names a folder instead).

This module imports pydantic and rolora_plugin only (never axolotl).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...lora.config import LR_SCALES, ExportConfig, MonitorConfig, QATConfig, RoLoRAConfig
from ...rotate.config import RotationConfig

__all__ = ["RoLoRAArgs", "RoLoRAOptions", "RoLoRAExportArgs", "MERGED_SUBDIR"]

MERGED_SUBDIR = "rolora-merged"
_SECTIONS = {"rotation": RotationConfig, "monitor": MonitorConfig, "qat": QATConfig}


class RoLoRAExportArgs(BaseModel):
    """What the plugin writes after training."""

    model_config = ConfigDict(extra="forbid")

    merge: bool = Field(default=True, description="export the merged model (LoRA merged in the rotated basis) after training")
    merged_output_dir: Optional[str] = Field(
        default=ExportConfig.default("merged_output_dir"), description=f"where; default <output_dir>/{MERGED_SUBDIR}"
    )
    overwrite: bool = Field(
        default=ExportConfig.default("overwrite"), description="replace an existing merged_output_dir (e.g. from an earlier run)"
    )
    save_rotation_record: bool = Field(
        default=ExportConfig.default("save_rotation_record"), description="write rolora_rotation.json next to every checkpoint"
    )


class RoLoRAOptions(BaseModel):
    """Everything under the ``rolora:`` key."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    rotation: RotationConfig = Field(default_factory=RotationConfig, description="rotations and seed (RotationConfig)")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="quantization-aware monitor (MonitorConfig)")
    qat: QATConfig = Field(
        default_factory=QATConfig, description="fake-quant training (QATConfig; e.g. {enabled: true, preset: nvfp4})"
    )
    export: RoLoRAExportArgs = Field(default_factory=RoLoRAExportArgs)
    lora_lr_scale: Literal[LR_SCALES] = Field(
        default=RoLoRAConfig.default("lora_lr_scale"),
        description="'norm-rms': per-layer LoRA step matched to the folded norm (RoLoRAConfig.lora_lr_scale)",
    )

    @field_validator("rotation", "monitor", "qat", mode="before")
    @classmethod
    def _build_section(cls, value: Any, info):
        """Dicts go through the dataclass's ``from_dict`` (lists valid fields, runs its checks)."""
        section = _SECTIONS[info.field_name]
        if value is None:
            return section()
        if isinstance(value, dict):
            try:
                return section.from_dict(dict(value))
            except (TypeError, ValueError) as e:
                raise ValueError(f"rolora.{info.field_name}: {e}") from None
        if not isinstance(value, section):
            raise ValueError(f"rolora.{info.field_name} must be a mapping of {section.__name__} fields, got {value!r}")
        return value

    def to_rolora_config(self) -> RoLoRAConfig:
        """The :class:`RoLoRAConfig` of the callback (the merged export is done by the plugin, from disk)."""
        export = ExportConfig(save_rotation_record=self.export.save_rotation_record, merged_output_dir=None, overwrite=self.export.overwrite)
        return RoLoRAConfig(rotation=self.rotation, monitor=self.monitor, qat=self.qat, export=export, lora_lr_scale=self.lora_lr_scale)


class RoLoRAArgs(BaseModel):
    """Axolotl input args: the ``rolora:`` section (absent: the plugin does nothing)."""

    rolora: Optional[RoLoRAOptions] = Field(
        default=None, description="RoLoRA: rotate before LoRA, train in the outlier-free basis, export merged"
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_quantized_base(cls, data: Any):
        """Rotation edits full-precision weights: QLoRA / 8-bit bases cannot be rotated (checked on the full config)."""
        if isinstance(data, dict) and data.get("rolora") is not None:
            quantized = [k for k in ("load_in_4bit", "load_in_8bit") if data.get(k)]
            if quantized:
                raise ValueError(
                    f"rolora: {'/'.join(quantized)} loads quantized weights, which cannot be rotated exactly. Remove "
                    f"{' and '.join(quantized)} (use adapter: lora on a full-precision base), or rotate and export the "
                    "model first (rolora rotate) and quantize that."
                )
        return data
