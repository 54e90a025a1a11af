"""QATConfig / MonitorConfig hold a QuantConfig: defaults, flat-key aliases, dict / JSON / YAML round trips, refusals."""

import dataclasses

import pytest
import yaml

from rolora_plugin import MonitorConfig, QATConfig, QuantConfig, RoLoRAConfig
from rolora_plugin.lora.config import fake_quant_config

QAT_FLAT = dict(w_bits=3, a_bits=8, w_group_size=16, w_sym=False, a_sym=False, a_clip_ratio=0.9)
MONITOR_FLAT = dict(w_bits=6, a_bits=6, w_group_size=32)


def test_defaults_are_the_old_fake_quant_setting():
    """W4A4 RTN per channel, symmetric, no clip search, no KV, nothing skipped (what callbacks.quant_config built)."""
    want = QuantConfig(w_bits=4, a_bits=4, w_group_size=None, w_sym=True, a_sym=True, a_clip_ratio=1.0, skip=())
    assert QATConfig().quant == MonitorConfig().quant == fake_quant_config() == want
    assert isinstance(QATConfig().quant, QuantConfig) and QATConfig().quant.skip == ()


@pytest.mark.parametrize("cls, flat", [(QATConfig, QAT_FLAT), (MonitorConfig, MONITOR_FLAT)])
def test_flat_keywords_fill_the_held_quant_config_and_read_back(cls, flat):
    cfg = cls(**flat)
    assert cfg == cls(quant=fake_quant_config(**flat))
    for name, value in flat.items():
        assert getattr(cfg, name) == getattr(cfg.quant, name) == value
    with pytest.raises(AttributeError):
        cfg.w_bits = 2  # the aliases are read-only views of cfg.quant


@pytest.mark.parametrize("cls, flat", [(QATConfig, QAT_FLAT), (MonitorConfig, MONITOR_FLAT)])
def test_dict_and_json_round_trip_with_nested_and_flat_keys(cls, flat):
    cfg = cls(**flat)
    nested = cfg.to_dict()
    assert set(flat).isdisjoint(nested) and nested["quant"]["w_bits"] == flat["w_bits"]
    assert cls.from_dict(nested) == cls.from_json(cfg.to_json()) == cls.from_dict(dict(flat)) == cfg
    changed = dataclasses.replace(cfg, **({"num_batches": 3} if cls is MonitorConfig else {"start_step": 3}))
    assert changed.quant == cfg.quant and changed != cfg


def test_rolora_config_accepts_flat_yaml_sections():
    """The Axolotl / ``rolora train`` YAML form: ``qat: {w_bits: 4, a_bits: 8}`` with flat keys."""
    data = yaml.safe_load("qat: {enabled: true, start_step: 2, w_bits: 4, a_bits: 8}\nmonitor: {every_n_steps: 3, w_bits: 6, a_bits: 6}\n")
    cfg = RoLoRAConfig.from_dict(data)
    assert cfg.qat == QATConfig(enabled=True, start_step=2, quant=fake_quant_config(a_bits=8))
    assert cfg.monitor.quant == fake_quant_config(w_bits=6, a_bits=6) and cfg.monitor.every_n_steps == 3
    assert RoLoRAConfig.from_json(cfg.to_json()) == cfg


def test_an_explicit_quant_config_is_held_as_given():
    quant = QuantConfig(w_bits=4, a_bits=8, w_group_size=64, skip=("lm_head",))
    cfg = QATConfig(enabled=True, quant=quant, targets="lora")
    assert cfg.quant is quant and cfg.a_bits == 8 and cfg.w_group_size == 64
    assert QATConfig(quant=quant.to_dict()).quant == quant  # a dict is converted
    assert QATConfig(quant=quant, a_bits=8) == QATConfig(quant=quant)  # an alias equal to the held value is fine


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quant=QuantConfig(), a_bits=8), r"either quant=QuantConfig\(...\) or the flat keys \['a_bits'\]"),
        (dict(w_bits=1), r"QATConfig.w_bits must be an int in 2\.\.16 \(16 = off\), got 1"),
        (dict(a_clip_ratio=1.5), r"QATConfig.a_clip_ratio must be in \(0, 1\], got 1.5"),
        (dict(w_group_size=0), r"QATConfig.w_group_size must be an int >= 1"),
        (dict(a_sym="no"), r"QATConfig.a_sym must be True or False"),
        (dict(quant=QuantConfig(a_clip_ratio=0.5), a_clip_ratio=0.0), r"QATConfig.a_clip_ratio must be in \(0, 1\]"),
        (dict(quant={"a_clip_ratio": 1.5}), r"QATConfig.quant: QuantConfig.a_clip_ratio must be a number in \(0, 1\]"),
        (dict(quant=QuantConfig(method="gptq")), "does not support method='gptq'"),
        (dict(quant=QuantConfig(w_clip_search=True)), "does not support w_clip_search=True"),
        (dict(quant=QuantConfig(kv_bits=4)), "does not support kv_bits=4"),
        (dict(quant={"bits": 4}), r"QATConfig.quant: QuantConfig: unknown field\(s\) \['bits'\]"),
        (dict(quant=4), "QATConfig.quant must be a QuantConfig or a dict"),
        (dict(w_bits=16, a_bits=16), "w_bits = a_bits = 16 quantizes nothing"),
        (dict(quant=QuantConfig(w_bits=16, a_bits=16, kv_bits=8)), "does not support kv_bits=8"),
    ],
)
def test_qat_config_refuses_bad_or_ignored_quant_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QATConfig(**kwargs)


def test_unknown_keys_list_the_fields_and_the_flat_aliases():
    with pytest.raises(ValueError, match=r"QATConfig: unknown field\(s\) \['bits'\]; valid fields are .*'a_clip_ratio'.*'quant'"):
        QATConfig.from_dict({"bits": 4})
    with pytest.raises(ValueError, match=r"MonitorConfig: unknown field\(s\) \['w_sym'\]"):
        MonitorConfig.from_dict({"w_sym": True})  # the monitor's aliases are w_bits / a_bits / w_group_size only
    with pytest.raises(ValueError, match=r"MonitorConfig.a_bits must be an int in 2\.\.16"):
        MonitorConfig(every_n_steps=3, layers=[1], num_batches=1, a_bits=20)


@pytest.mark.parametrize("field, value", [("a_clip_search", True), ("a_bits_for", {"gate_proj": 8}), ("gptq_quantized_inputs", True)])
def test_qat_refuses_settings_the_fake_quant_forward_ignores(field, value):
    from rolora_plugin.quant import QuantConfig
    from rolora_plugin.lora.config import MonitorConfig, QATConfig

    quant = QuantConfig(w_bits=4, a_bits=4, skip=(), **{field: value})
    for cls in (QATConfig, MonitorConfig):
        with pytest.raises(ValueError, match=field):
            cls(quant=quant)
