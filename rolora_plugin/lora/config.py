"""Configuration of :class:`rolora_plugin.RoLoRACallback`: rotation, monitor, QAT and export options.

Every config is a dataclass validated in ``__post_init__`` that round-trips through dict / JSON
(``RoLoRAConfig.from_dict(cfg.to_dict()) == cfg``).

The monitor's fake-quant evaluation and QAT *hold* a :class:`~rolora_plugin.quant.QuantConfig` (``quant=``, torchao
style) instead of copying its fields. Their flat keys (``w_bits``, ``a_bits``, ``w_group_size``; for QAT also
``w_sym``, ``a_sym``, ``a_clip_ratio``) stay accepted as aliases, as keyword arguments and as dict / YAML keys
(``qat: {w_bits: 4, a_bits: 8}``): they fill the held config, whose other fields keep the fake-quant defaults
(RTN, per channel, symmetric, no clip search, nothing skipped). The same names read back as properties
(``qat.w_bits == qat.quant.w_bits``). ``to_dict`` writes the nested form.

Both sections also take ``preset=`` (a :data:`~rolora_plugin.quant.QUANT_PRESETS` name; YAML ``qat: {enabled: true,
preset: nvfp4}``): the held config is then :func:`fake_quant_preset` of it — the preset's *formats* (NVFP4, MXFP4,
the int grid, bits, symmetry, group sizes), rounded to nearest as the fake-quant forward does. GPTQ and the clip
searches of a preset are post-training steps: QAT trains for the format, ``quantize_model_`` with the full preset
runs them after merge. A PTQ preset given as ``quant=QuantConfig.preset("nvfp4")`` is refused with that advice (the
fake-quant forward would silently skip its GPTQ).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field, fields

from ..config import ConfigMixin, RotationConfig, short_repr, unknown_keys
from ..quant.config import QUANT_PRESETS, QuantConfig
from ..quant.primitives import OFF_BITS

LR_SCALES = ("none", "norm-rms")  # RoLoRAConfig.lora_lr_scale (rolora_plugin.lora.adapters.scale_lora_lr_)

__all__ = ["RoLoRAConfig", "MonitorConfig", "QATConfig", "ExportConfig", "fake_quant_config", "fake_quant_preset"]

_TARGETS = ("all-linear", "lora")
_QAT_ALIASES = ("w_bits", "a_bits", "w_group_size", "w_sym", "a_sym", "a_clip_ratio")
_MONITOR_ALIASES = ("w_bits", "a_bits", "w_group_size")


def fake_quant_config(**fields_) -> QuantConfig:
    """The :class:`QuantConfig` of a fake-quant forward: W4A4 RTN per channel, symmetric, nothing skipped,
    with ``fields_`` (QuantConfig field names) overriding those defaults."""
    return QuantConfig(**{"w_bits": 4, "a_bits": 4, "skip": (), **fields_})


# the QuantConfig fields the fake-quant forward implements (quant.qat): what a preset's fake-quant form keeps;
# kv_bits / a_bits_for are kept too, so that a preset using them is refused by name rather than silently dropped
_FAKE_QUANT_FIELDS = ("w_bits", "a_bits", "w_group_size", "w_sym", "a_sym", "a_clip_ratio", "w_format", "a_format",
                      "int_grid", "a_group_size", "kv_bits", "a_bits_for")  # fmt: skip


def fake_quant_preset(name: str, **fields_) -> QuantConfig:
    """The fake-quant form of ``QuantConfig.preset(name)`` (what ``QATConfig(preset=name)`` trains with).

    Keeps what the fake-quant forward computes — formats (``"nvfp4"``, ``"mxfp4"``, int with its grid), bits,
    symmetry, group sizes, a fixed activation clip ratio — and leaves the rest at :func:`fake_quant_config`'s
    defaults: weights rounded to nearest, scaled by their max (no GPTQ, no clip search; those are post-training
    steps, run on the merged model by ``quantize_model_`` with the full preset), nothing skipped. ``fields_``
    override the result, e.g. ``fake_quant_preset("w4a4-int", a_bits=8)``. NVFP4 activations take a dynamic
    per-tensor global scale (``448·6 / max|x|`` of each input tensor) where ``quantize_model_`` calibrates a static
    one per linear.

    Example::

        >>> fake_quant_preset("nvfp4") == QuantConfig(w_format="nvfp4", a_format="nvfp4", skip=())
        True
    """
    if not isinstance(name, str) or name not in QUANT_PRESETS:
        raise ValueError(f"unknown preset {short_repr(name)}; choose one of {sorted(QUANT_PRESETS)} (QuantConfig.preset names)")
    preset = QuantConfig.preset(name)
    return fake_quant_config(**{**{k: getattr(preset, k) for k in _FAKE_QUANT_FIELDS}, **fields_})


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {short_repr(value)}")


def _check_targets(owner: str, targets):
    if isinstance(targets, str):
        if targets not in _TARGETS:
            raise ValueError(f"{owner}.targets must be 'all-linear', 'lora' or a list of leaf names, got {short_repr(targets)}")
        return targets
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{owner}.targets must be 'all-linear', 'lora' or a non-empty list of leaf names, got {short_repr(targets)}")
    return list(targets)


def _held_quant(owner: str, quant, aliases: dict, preset=None) -> QuantConfig:
    """The section's QuantConfig: ``quant`` (a QuantConfig or its dict), or one built from ``preset``
    (:func:`fake_quant_preset`) and / or the flat aliases (which override the preset's fields)."""
    given = {k: v for k, v in aliases.items() if v is not None}
    _check_aliases(owner, given)
    if preset is not None and quant is not None:
        raise ValueError(f"{owner}: give either quant=QuantConfig(...) or preset={preset!r}, not both")
    try:
        if preset is not None:
            quant = fake_quant_preset(preset, **given)
        elif isinstance(quant, dict):
            quant = QuantConfig.from_dict(quant)
        elif quant is None:
            quant = fake_quant_config(**given)
    except ValueError as e:
        if preset is not None:
            with_keys = f" with {', '.join(f'{k}={short_repr(v)}' for k, v in given.items())}" if given else ""
            raise ValueError(f"{owner}: preset={preset!r}{with_keys}: {e}") from None
        raise ValueError(f"{owner}.quant: {e}") from None
    if not isinstance(quant, QuantConfig):
        raise ValueError(f"{owner}.quant must be a QuantConfig or a dict of its fields, got {type(quant).__name__}")
    conflicts = sorted(k for k, v in given.items() if getattr(quant, k) != v)  # equal values: e.g. dataclasses.replace
    if conflicts:
        raise ValueError(f"{owner}: give either quant=QuantConfig(...) or the flat keys {conflicts}, not both")
    _check_fake_quant(owner, quant, preset)
    return quant


def _check_aliases(owner: str, given: dict) -> None:
    """Errors on the flat keys name the key the user wrote (``QATConfig.a_clip_ratio``), not the held config's."""
    for name, value in given.items():
        if name in ("w_bits", "a_bits") and (not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= OFF_BITS):
            raise ValueError(f"{owner}.{name} must be an int in 2..16 (16 = off), got {short_repr(value)}")
        if name == "w_group_size":
            _check_int(owner, name, value, 1)
        if name in ("w_sym", "a_sym") and not isinstance(value, bool):
            raise ValueError(f"{owner}.{name} must be True or False, got {short_repr(value)}")
        if name == "a_clip_ratio" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0):
            raise ValueError(f"{owner}.a_clip_ratio must be in (0, 1], got {short_repr(value)}")
    if given.get("w_bits") == given.get("a_bits") == OFF_BITS:
        raise ValueError(f"{owner}: w_bits = a_bits = 16 quantizes nothing; lower the bits")


def _check_fake_quant(owner: str, quant: QuantConfig, preset=None) -> None:
    """Refuse settings the fake-quant forward would silently ignore (it rounds weights to nearest, max-scaled)."""
    ignored = [
        msg for bad, msg in (
            (quant.method != "rtn", f"method={quant.method!r} (fake quant rounds to nearest)"),
            (quant.w_clip_search, "w_clip_search=True (weights are scaled by their max)"),
            (quant.kv_bits < OFF_BITS, f"kv_bits={quant.kv_bits} (the KV cache is not fake-quantized)"),
            (quant.a_clip_search, "a_clip_search=True (activation clips are calibrated by quantize_model_ only)"),
            (bool(quant.a_bits_for), "a_bits_for (per-linear activation bits)"),
            (quant.gptq_quantized_inputs, "gptq_quantized_inputs=True (a GPTQ option)"),
        ) if bad
    ]  # fmt: skip
    if not ignored:
        return
    if preset is not None:
        raise ValueError(f"{owner}: preset={preset!r} needs what the fake-quant forward does not do: {'; '.join(ignored)}; "
                         f"choose a preset without it (e.g. {', '.join(_QAT_PRESETS)})")
    named = _preset_of(quant)
    hint = (f"; to train for this preset's format pass preset={named!r} instead of quant= (QAT trains the format, "
            f"then run quantize_model_ with QuantConfig.preset({named!r}) on the merged model)" if named else
            f"; to train for a preset's format pass preset=<name> (e.g. {', '.join(_QAT_PRESETS)})")
    raise ValueError(f"{owner}.quant: the fake-quant forward does not support {'; '.join(ignored)}; use quantize_model_ "
                     f"for those{hint}")


_QAT_PRESETS = ("nvfp4", "mxfp4", "w4a4-int", "w4a8")  # presets whose fake-quant form QAT runs (the servable W4A*)


def _preset_of(quant: QuantConfig) -> str | None:
    """The preset name ``quant`` is (``QuantConfig.preset(name)`` exactly, up to ``skip``), or None."""
    for name in QUANT_PRESETS:
        if quant == QuantConfig.preset(name, skip=quant.skip):
            return name
    return None


def _from_dict(cls, data: dict, aliases: tuple[str, ...]):
    """``cls(**data)`` accepting the dataclass fields and the flat aliases; lists both on an unknown key."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} needs a mapping of its fields, got {type(data).__name__} {short_repr(data)}")
    known = {f.name for f in fields(cls)} | set(aliases)
    unknown = unknown_keys(data, known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
    return cls(**data)


def _alias_properties(cls, names: tuple[str, ...]):
    """Read-only ``cls.<name>`` → ``self.quant.<name>`` (set after the dataclass is built: the names are InitVars)."""
    for name in names:
        setattr(cls, name, property(lambda self, n=name: getattr(self.quant, n), doc=f"``quant.{name}`` (read-only alias)"))
    return cls


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
        quant: the fake-quant setting of that evaluation (default :func:`fake_quant_config`: W4A4 per channel).
        num_batches: how many eval batches each measurement uses.
        preset: a :data:`~rolora_plugin.quant.QUANT_PRESETS` name instead of ``quant``: its fake-quant form
            (:func:`fake_quant_preset`), e.g. ``"nvfp4"`` to watch the NVFP4 loss of an NVFP4 QAT run. The log key
            is named by the bits (``rolora/eval_loss_w4a4`` for NVFP4 and MXFP4 too).
        w_bits / a_bits / w_group_size: flat aliases filling ``quant`` (not together with ``quant``; with
            ``preset`` they override its fields).
    """

    every_n_steps: int = 50
    activation_stats: bool = True
    layers: list = field(default_factory=list)
    fake_quant_eval: bool = True
    quant: QuantConfig | None = None
    num_batches: int = 2
    w_bits: InitVar[int | None] = None
    a_bits: InitVar[int | None] = None
    w_group_size: InitVar[int | None] = None
    preset: InitVar[str | None] = None

    def __post_init__(self, w_bits, a_bits, w_group_size, preset):
        _check_int("MonitorConfig", "every_n_steps", self.every_n_steps, 0)
        _check_int("MonitorConfig", "num_batches", self.num_batches, 1)
        for i in self.layers:
            _check_int("MonitorConfig", "layers[]", i, 0)
        aliases = dict(w_bits=w_bits, a_bits=a_bits, w_group_size=w_group_size)
        self.quant = _held_quant("MonitorConfig", self.quant, aliases, _checked_preset("MonitorConfig", preset))
        self.layers = list(self.layers)

    @classmethod
    def from_dict(cls, data: dict) -> "MonitorConfig":
        return _from_dict(cls, data, _MONITOR_ALIASES + ("preset",))

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0 and (self.activation_stats or self.fake_quant_eval)


@dataclass
class QATConfig(ConfigMixin):
    """Quantization-aware training: fake-quantized weights and activations in the forward (STE).

    Args:
        enabled: switch QAT on.
        start_step: global step from which the forward is fake-quantized (0 = from the start).
        quant: the fake-quant setting (default :func:`fake_quant_config`: W4A4 RTN per channel, symmetric). Used:
            ``w_bits`` / ``w_group_size`` / ``w_sym`` of the effective weights ``W + sBA`` (scaled by their max, no
            clip), ``a_bits`` / ``a_sym`` / ``a_clip_ratio`` of the per-token activations.
        targets: ``"all-linear"`` (every decoder-layer linear, as a W4A4 deployment), ``"lora"`` or leaf names.
        preset: a :data:`~rolora_plugin.quant.QUANT_PRESETS` name instead of ``quant`` — train for the format that
            preset deploys: ``"nvfp4"`` (E2M1 in groups of 16, FP8 group scales, per-tensor global scale; dynamic
            for activations during QAT), ``"mxfp4"`` (groups of 32, power-of-two scales), ``"w4a4-int"`` (int4 on
            the 16-level grid), ... Held as :func:`fake_quant_preset` (rounded to nearest; the preset's GPTQ and
            clip searches run after merge: ``quantize_model_(merged, QuantConfig.preset(name), calibration=...)``).
            Reads back as the preset name whose fake-quant form ``quant`` is (None for other settings).
        w_bits / a_bits / w_group_size / w_sym / a_sym / a_clip_ratio: flat aliases filling ``quant`` (with
            ``preset``: overriding its fields).

    Example::

        >>> QATConfig(enabled=True, quant=QuantConfig(w_bits=4, a_bits=8, skip=())) == QATConfig(enabled=True, a_bits=8)
        True
        >>> QATConfig(enabled=True, preset="nvfp4").quant.label()
        'NVFP4 W4A4'
    """

    enabled: bool = False
    start_step: int = 0
    quant: QuantConfig | None = None
    targets: str | list = "all-linear"
    w_bits: InitVar[int | None] = None
    a_bits: InitVar[int | None] = None
    w_group_size: InitVar[int | None] = None
    w_sym: InitVar[bool | None] = None
    a_sym: InitVar[bool | None] = None
    a_clip_ratio: InitVar[float | None] = None
    preset: InitVar[str | None] = None

    def __post_init__(self, w_bits, a_bits, w_group_size, w_sym, a_sym, a_clip_ratio, preset):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"QATConfig.enabled must be True or False, got {short_repr(self.enabled)}")
        _check_int("QATConfig", "start_step", self.start_step, 0)
        aliases = dict(w_bits=w_bits, a_bits=a_bits, w_group_size=w_group_size, w_sym=w_sym, a_sym=a_sym, a_clip_ratio=a_clip_ratio)
        self.quant = _held_quant("QATConfig", self.quant, aliases, _checked_preset("QATConfig", preset))
        self.targets = _check_targets("QATConfig", self.targets)

    @classmethod
    def from_dict(cls, data: dict) -> "QATConfig":
        return _from_dict(cls, data, _QAT_ALIASES + ("preset",))


def _checked_preset(owner: str, preset):
    """``preset`` as given (None, or a preset name), with an error listing the names otherwise."""
    if preset is None:
        return None
    if not isinstance(preset, str) or preset not in QUANT_PRESETS:
        raise ValueError(f"{owner}.preset must be one of {sorted(QUANT_PRESETS)} (QuantConfig.preset names), got {short_repr(preset)}")
    return preset


def _fake_preset_name(quant: QuantConfig) -> str | None:
    for name in QUANT_PRESETS:
        if fake_quant_preset(name, skip=quant.skip) == quant:
            return name
    return None


def _preset_property(cls):
    """Read-only ``cls.preset``: the preset whose fake-quant form the held ``quant`` is, else None."""
    cls.preset = property(lambda self: _fake_preset_name(self.quant), doc="the preset of ``quant`` (read-only), or None")
    return cls


_alias_properties(MonitorConfig, _MONITOR_ALIASES)
_alias_properties(QATConfig, _QAT_ALIASES)
_preset_property(MonitorConfig)
_preset_property(QATConfig)


@dataclass
class ExportConfig(ConfigMixin):
    """What the callback writes.

    Args:
        save_rotation_record: write ``rolora_rotation.json`` next to every checkpoint and saved model/adapter.
        merged_output_dir: at the end of training, also :func:`rolora_plugin.io.export.merge_and_export` the model
            there (None = don't).
        overwrite: allow ``merged_output_dir`` to replace a non-empty directory.
    """

    save_rotation_record: bool = True
    merged_output_dir: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        for name in ("save_rotation_record", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ExportConfig.{name} must be True or False, got {short_repr(getattr(self, name))}")


_SECTIONS = {"monitor": MonitorConfig, "qat": QATConfig, "export": ExportConfig}


@dataclass
class RoLoRAConfig:
    """Everything :class:`rolora_plugin.RoLoRACallback` does.

    Args:
        rotation: the rotation applied in ``on_init_end`` when the model is not rotated yet. None (default):
            ``RotationConfig()`` for an unrotated model, and any existing rotation is accepted; set explicitly, an
            already rotated model must carry this very config.
        monitor / qat / export: see :class:`MonitorConfig`, :class:`QATConfig`, :class:`ExportConfig`
            (dicts are accepted and converted).
        lora_lr_scale: ``"none"`` (default) or ``"norm-rms"``: after rotating, give each LoRA layer that reads a
            folded norm the step size it had before the fold, i.e. a per-layer learning rate ``rms(g) · lr`` under
            Adam-type optimizers (:func:`rolora_plugin.lora.adapters.scale_lora_lr_`; needs a peft model, R1, a dense
            family). Closes most of RoLoRA's full-precision gap to LoRA on general text (benchmarks/RESULTS.md).
    """

    rotation: RotationConfig | None = None
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    lora_lr_scale: str = "none"

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
        if self.lora_lr_scale not in LR_SCALES:
            raise ValueError(f"RoLoRAConfig.lora_lr_scale must be one of {LR_SCALES}, got {short_repr(self.lora_lr_scale)}")

    def to_dict(self) -> dict:
        out = {name: getattr(self, name).to_dict() for name in _SECTIONS}
        out["rotation"] = self.rotation.to_dict() if self.rotation is not None else None
        out["lora_lr_scale"] = self.lora_lr_scale
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RoLoRAConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"RoLoRAConfig needs a mapping of its sections, got {type(data).__name__} {short_repr(data)}")
        known = {f.name for f in fields(cls)}
        unknown = unknown_keys(data, known)
        if unknown:
            raise ValueError(f"RoLoRAConfig: unknown section(s) {unknown}; valid sections are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RoLoRAConfig":
        return cls.from_dict(json.loads(text))
