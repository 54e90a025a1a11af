"""Configuration of :class:`rolora_plugin.RoLoRACallback`: rotation, monitor, QAT and export options.

Every config is a :class:`rolora_plugin.config.Config` dataclass: its fields are declared with their checks
(:func:`~rolora_plugin.config.spec`), the sections are typed (``RoLoRAConfig(qat={...})`` builds a ``QATConfig``), and
it round-trips through dict / JSON (``RoLoRAConfig.from_dict(cfg.to_dict()) == cfg``).

The monitor's fake-quant evaluation and QAT *hold* a :class:`~rolora_plugin.quant.QuantConfig` (``quant=``, torchao
style) instead of copying its fields. Their flat keys (``w_bits``, ``a_bits``, ``w_group_size``; for QAT also
``w_sym``, ``a_sym``, ``a_clip_ratio``) stay accepted as aliases, as keyword arguments and as dict / YAML keys
(``qat: {w_bits: 4, a_bits: 8}``): they fill the held config, whose other fields keep the fake-quant defaults
(RTN, per channel, symmetric, no clip search, nothing skipped). They are declared in each class's ``FLAT_KEYS``
(the base folds them into ``quant`` before the dataclass is built) and read back as read-only properties
(``qat.w_bits == qat.quant.w_bits``). ``to_dict`` writes the nested form.

Both sections also take ``preset=`` (a :data:`~rolora_plugin.quant.QUANT_PRESETS` name; YAML ``qat: {enabled: true,
preset: nvfp4}``): the held config is then :func:`fake_quant_preset` of it — the preset's *formats* (NVFP4, MXFP4,
the int grid, bits, symmetry, group sizes), rounded to nearest as the fake-quant forward does. GPTQ and the clip
searches of a preset are post-training steps: QAT trains for the format, ``quantize_model_`` with the full preset
runs them after merge. A PTQ preset given as ``quant=QuantConfig.preset("nvfp4")`` is refused with that advice (the
fake-quant forward would silently skip its GPTQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import Config, FieldSpec, short_repr, spec
from ..quant.config import QUANT_PRESETS, QuantConfig
from ..quant.primitives import OFF_BITS
from ..rotate.config import RotationConfig

LR_SCALES = ("none", "norm-rms")  # RoLoRAConfig.lora_lr_scale (rolora_plugin.lora.adapters.scale_lora_lr_)

__all__ = ["RoLoRAConfig", "MonitorConfig", "QATConfig", "ExportConfig", "fake_quant_config", "fake_quant_preset"]

_TARGETS = ("all-linear", "lora")


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


def _valid_targets(targets) -> bool:
    if isinstance(targets, str):
        return targets in _TARGETS
    return isinstance(targets, list) and bool(targets) and all(isinstance(t, str) for t in targets)


_BITS = FieldSpec(kind=int, min=2, max=OFF_BITS, what="an int in 2..16 (16 = off)")
# the flat keys (QATConfig(w_bits=4), YAML qat: {w_bits: 4}): checked under the name the user wrote
_FLAT_SPECS = {
    "w_bits": _BITS,
    "a_bits": _BITS,
    "w_group_size": FieldSpec(kind=int, min=1),
    "w_sym": FieldSpec(kind=bool),
    "a_sym": FieldSpec(kind=bool),
    "a_clip_ratio": FieldSpec(kind=float, gt=0, max=1, what="in (0, 1]"),
    "preset": FieldSpec(choices=tuple(sorted(QUANT_PRESETS)), optional=True,
                        what=f"one of {sorted(QUANT_PRESETS)} (QuantConfig.preset names)"),
}  # fmt: skip


def _held_quant(owner: str, quant, flat: dict) -> QuantConfig:
    """The section's QuantConfig from its flat keys: ``quant`` (a QuantConfig or its dict), or one built from
    ``preset`` (:func:`fake_quant_preset`) and / or the flat aliases (which override the preset's fields)."""
    given = {k: _FLAT_SPECS[k].validate(owner, k, v) for k, v in flat.items() if v is not None}
    preset = given.pop("preset", None)
    if given.get("w_bits") == given.get("a_bits") == OFF_BITS:
        raise ValueError(f"{owner}: w_bits = a_bits = 16 quantizes nothing; lower the bits")
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


def _preset_of(quant: QuantConfig, build=QuantConfig.preset) -> str | None:
    """The preset name ``quant`` is — ``build(name, skip=quant.skip)`` exactly: ``QuantConfig.preset`` (default) or
    :func:`fake_quant_preset` (the fake-quant form) — or None."""
    for name in QUANT_PRESETS:
        if quant == build(name, skip=quant.skip):
            return name
    return None


class _HoldsQuant(Config):
    """A section holding a fake-quant :class:`QuantConfig` (``quant``) that also takes the flat keys listed in
    ``FLAT_KEYS`` (and ``preset``) as constructor and dict keys: they build ``quant``, and read back from it."""

    def _check(self) -> None:
        if self.quant is None:
            self.quant = fake_quant_config()
        _check_fake_quant(type(self).__name__, self.quant)

    @classmethod
    def _fold_flat_keys(cls, kwargs: dict, flat: dict) -> dict:
        return {**kwargs, "quant": _held_quant(cls.__name__, kwargs.get("quant"), flat)}

    @property
    def preset(self) -> str | None:
        """The preset whose fake-quant form ``quant`` is (read-only), or None."""
        return _preset_of(self.quant, fake_quant_preset)

    def __init_subclass__(cls, **kwargs):
        """Each flat key but ``preset`` reads back from the held config: ``qat.w_bits == qat.quant.w_bits``."""
        super().__init_subclass__(**kwargs)
        for key in cls.FLAT_KEYS:
            if key != "preset":
                setattr(cls, key, property(lambda self, k=key: getattr(self.quant, k), doc=f"``quant.{key}`` (read-only)"))


@dataclass
class MonitorConfig(_HoldsQuant):
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

    FLAT_KEYS: ClassVar[tuple] = ("w_bits", "a_bits", "w_group_size", "preset")

    every_n_steps: int = spec(50, kind=int, min=0)
    activation_stats: bool = spec(True, kind=bool)
    layers: list = spec(factory=list, kind=list, items=FieldSpec(kind=int, min=0), what="a list of decoder-layer indices")
    fake_quant_eval: bool = spec(True, kind=bool)
    quant: QuantConfig | None = spec(None, kind=QuantConfig, optional=True)
    num_batches: int = spec(2, kind=int, min=1)

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0 and (self.activation_stats or self.fake_quant_eval)


@dataclass
class QATConfig(_HoldsQuant):
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

    FLAT_KEYS: ClassVar[tuple] = ("w_bits", "a_bits", "w_group_size", "w_sym", "a_sym", "a_clip_ratio", "preset")

    enabled: bool = spec(False, kind=bool)
    start_step: int = spec(0, kind=int, min=0)
    quant: QuantConfig | None = spec(None, kind=QuantConfig, optional=True)
    targets: str | list = spec("all-linear", parse=lambda t: list(t) if isinstance(t, tuple) else t, check=_valid_targets,
                               what="'all-linear', 'lora' or a non-empty list of leaf names")  # fmt: skip


@dataclass
class ExportConfig(Config):
    """What the callback writes.

    Args:
        save_rotation_record: write ``rolora_rotation.json`` next to every checkpoint and saved model/adapter.
        merged_output_dir: at the end of training, also :func:`rolora_plugin.io.export.merge_and_export` the model
            there (None = don't).
        overwrite: allow ``merged_output_dir`` to replace a non-empty directory.
    """

    save_rotation_record: bool = spec(True, kind=bool)
    merged_output_dir: str | None = spec(None, kind=str, optional=True)
    overwrite: bool = spec(False, kind=bool)


@dataclass
class RoLoRAConfig(Config):
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

    KEY_NAMES: ClassVar[tuple] = ("section", "sections")

    rotation: RotationConfig | None = spec(None, kind=RotationConfig, optional=True)
    monitor: MonitorConfig = spec(factory=MonitorConfig, kind=MonitorConfig)
    qat: QATConfig = spec(factory=QATConfig, kind=QATConfig)
    export: ExportConfig = spec(factory=ExportConfig, kind=ExportConfig)
    lora_lr_scale: str = spec("none", choices=LR_SCALES)
