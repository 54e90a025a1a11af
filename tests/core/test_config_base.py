"""The one config base (rolora_plugin.config): declarative field checks, sections, unknown keys, flat keys, and the
library's config classes built on it (every field declared, bool never an int, the same defaults in Axolotl's args).
No model, no tensor: fast."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import ClassVar

import pytest

from rolora_plugin import ExportConfig, MonitorConfig, QATConfig, QuantConfig, RoLoRAConfig, RotationConfig
from rolora_plugin.app.demo import DemoConfig
from rolora_plugin.app.train_config import TrainConfig
from rolora_plugin.config import Config, ConfigMixin, FieldSpec, spec
from rolora_plugin.lora.config import LR_SCALES, fake_quant_config

ROOT = Path(__file__).resolve().parents[2]
LIBRARY_CONFIGS = (RotationConfig, QuantConfig, MonitorConfig, QATConfig, ExportConfig, RoLoRAConfig, TrainConfig, DemoConfig)


@dataclasses.dataclass
class Inner(Config):
    steps: int = spec(3, kind=int, min=1)
    names: tuple = spec(("a",), kind=tuple, items=str)


@dataclasses.dataclass
class Outer(Config):
    KEY_NAMES: ClassVar[tuple] = ("section", "sections")

    mode: str = spec("fast", choices=("fast", "exact"))
    level: str = spec("low", choices=("low", "mid", "high"))
    count: int = spec(0, kind=int, min=0, max=9)
    ratio: float = spec(1, kind=float, gt=0, max=1)
    limit: int | None = spec(None, kind=int, min=1, optional=True)
    on: bool = spec(True, kind=bool)
    inner: Inner = spec(factory=Inner, kind=Inner)
    spare: Inner | None = spec(None, kind=Inner, optional=True)
    tag: str = spec("x", kind=str, nonempty=True, what="a short tag such as 'x'")
    bits: dict = spec(factory=dict, kind=dict, must="map names to bits")

    def _check(self) -> None:
        if self.mode == "exact" and self.count == 0:
            raise ValueError("Outer: mode='exact' needs count >= 1")


# ---------------------------------------------------------------------------------------------- the declarative checks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="slow"), r"Outer.mode must be 'fast' or 'exact', got 'slow'"),
        (dict(level="top"), r"Outer.level must be one of \['low', 'mid', 'high'\], got 'top'"),
        (dict(count=10), r"Outer.count must be an int in 0\.\.9, got 10"),
        (dict(count="3"), r"Outer.count must be an int in 0\.\.9, got '3'"),
        (dict(ratio=0), r"Outer.ratio must be a number in \(0, 1\], got 0"),
        (dict(ratio="1"), r"Outer.ratio must be a number in \(0, 1\]"),
        (dict(limit=0), r"Outer.limit must be an int >= 1 or None, got 0"),
        (dict(on=1), r"Outer.on must be True or False, got 1"),
        (dict(inner=3), r"Outer.inner must be an Inner or a dict of its fields, got 3"),
        (dict(inner={"steps": 0}), r"Outer.inner: Inner.steps must be an int >= 1, got 0"),
        (dict(inner={"names": ["a", 2]}), r"Outer.inner: Inner.names entries must be a string, got 2"),
        (dict(tag=""), r"Outer.tag must be a short tag such as 'x', got ''"),
        (dict(bits=[1]), r"Outer.bits must map names to bits, got \[1\]"),
        (dict(mode="exact"), r"Outer: mode='exact' needs count >= 1"),
    ],
)
def test_field_checks_name_the_field_what_it_takes_and_the_value(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        Outer(**kwargs)


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_never_an_int_or_a_number(value):
    for name in ("count", "limit", "ratio"):
        with pytest.raises(ValueError, match=f"Outer.{name} must be"):
            Outer(**{name: value})


def test_values_are_normalised_and_none_is_taken_only_where_optional():
    cfg = Outer(ratio=1, limit=None, spare={"steps": 2}, inner=Inner(names=["b"]))
    assert cfg.ratio == 1.0 and isinstance(cfg.ratio, float)  # a float field stores a float
    assert cfg.spare == Inner(steps=2) and cfg.inner.names == ("b",)  # a mapping is built, a list becomes the tuple
    with pytest.raises(ValueError, match="Outer.count must be an int in 0..9, got None"):
        Outer(count=None)


def test_unknown_keys_are_refused_with_the_valid_names():
    with pytest.raises(ValueError, match=r"^Outer: unknown section\(s\) \['cont'\]; valid sections are \['bits', 'count', "):
        Outer.from_dict({"cont": 1})
    with pytest.raises(ValueError, match=r"^Outer.inner: Inner: unknown field\(s\) \['1', 'step'\]; valid fields are \['names', 'steps'\]"):
        Outer.from_dict({"inner": {"step": 1, 1: 2}})  # YAML keys may be numbers
    with pytest.raises(ValueError, match=r"^Inner needs a mapping of its fields, got list \[1\]"):
        Inner.from_dict([1])


def test_nested_sections_round_trip_as_plain_mappings():
    cfg = Outer(mode="exact", count=2, inner={"steps": 5, "names": ["p", "q"]}, spare=Inner(), bits={"q": 4})
    data = cfg.to_dict()
    assert data["inner"] == {"steps": 5, "names": ["p", "q"]} and data["spare"] == {"steps": 3, "names": ["a"]}
    assert Outer.from_dict(data) == Outer.from_json(cfg.to_json()) == cfg
    assert Outer.default("inner") == Inner() and Outer.default("limit") is None
    with pytest.raises(KeyError):
        Outer.default("nope")


def test_config_mixin_is_the_base_and_a_spec_is_a_field():
    assert ConfigMixin is Config
    meta = next(f for f in dataclasses.fields(Outer) if f.name == "count").metadata
    assert isinstance(next(iter(meta.values())), FieldSpec)


# ---------------------------------------------------------------------------------------------- the library's configs


@pytest.mark.parametrize("cls", LIBRARY_CONFIGS, ids=lambda c: c.__name__)
def test_every_library_config_declares_each_field(cls):
    assert issubclass(cls, Config)
    bare = [f.name for f in dataclasses.fields(cls) if not any(isinstance(v, FieldSpec) for v in f.metadata.values())]
    assert bare == [], f"{cls.__name__}: fields without spec(...): {bare}"


def _int_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) for s in f.metadata.values() if isinstance(s, FieldSpec) and s.kind in (int, float)]


@pytest.mark.parametrize("cls", [c for c in LIBRARY_CONFIGS if _int_fields(c)], ids=lambda c: c.__name__)
def test_no_library_config_takes_a_bool_for_a_number(cls):
    for name in _int_fields(cls):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} must"):
            cls(**{name: True})


@pytest.mark.parametrize("cls", LIBRARY_CONFIGS, ids=lambda c: c.__name__)
def test_library_configs_round_trip_and_list_valid_keys(cls):
    cfg = cls()
    assert cls.from_dict(cfg.to_dict()) == cls.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=rf"{cls.__name__}: unknown (field|section)\(s\) \['bogus'\]; valid .* are \["):
        cls.from_dict({"bogus": 1})


def test_rotation_config_checks_learn_quant_when_built():
    with pytest.raises(ValueError, match=r"RotationConfig.learn_quant: unknown QuantConfig preset 'w3a3'; choose one of \[.*'nvfp4'"):
        RotationConfig(learn_quant="w3a3")
    assert RotationConfig(learn=["r1"], learn_quant="nvfp4").learn == ("r1",)


def test_qat_and_monitor_flat_keys_are_explicit():
    assert QATConfig.FLAT_KEYS == ("w_bits", "a_bits", "w_group_size", "w_sym", "a_sym", "a_clip_ratio", "preset")
    assert MonitorConfig.FLAT_KEYS == ("w_bits", "a_bits", "w_group_size", "preset")
    assert QATConfig(w_bits=4, a_bits=4) == QATConfig() and QATConfig(a_bits=8).quant == fake_quant_config(a_bits=8)
    assert QATConfig(preset="nvfp4").preset == "nvfp4" and QATConfig(preset=None) == QATConfig()
    assert "w_bits" not in QATConfig().to_dict() and QATConfig.from_dict({"a_bits": 8}).a_bits == 8
    params = inspect.signature(QATConfig).parameters  # help() shows the fields, then the flat keys
    assert list(params)[:4] == ["enabled", "start_step", "quant", "targets"] and params["w_bits"].kind is params["w_bits"].KEYWORD_ONLY
    with pytest.raises(AttributeError):
        QATConfig().a_bits = 8
    assert dataclasses.replace(QATConfig(a_bits=8), enabled=True).quant.a_bits == 8


def test_rolora_config_sections_are_typed():
    cfg = RoLoRAConfig.from_dict({"rotation": {"r2": True}, "qat": {"enabled": True}, "export": {"overwrite": True}})
    assert cfg.rotation == RotationConfig(r2=True) and cfg.qat.enabled and cfg.export.overwrite
    assert RoLoRAConfig.from_dict(cfg.to_dict()) == cfg and RoLoRAConfig().rotation is None
    with pytest.raises(ValueError, match=r"^RoLoRAConfig.monitor: MonitorConfig.every_n_steps must be an int >= 0, got -1"):
        RoLoRAConfig(monitor={"every_n_steps": -1})


def test_train_config_sections_are_typed_and_take_the_run_seed(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), seed=7, rotation={"r2": True}, qat={"enabled": True, "a_bits": 8})
    assert cfg.rotation == RotationConfig(seed=7, r2=True) and cfg.rotation_config() is cfg.rotation
    assert cfg.qat == QATConfig(enabled=True, a_bits=8) and cfg.qat_config() is cfg.qat
    assert TrainConfig(output_dir=str(tmp_path / "run"), seed=5).rotation == RotationConfig(seed=5)
    assert TrainConfig(output_dir=str(tmp_path / "run"), seed=5, rotation={"seed": 1}).rotation.seed == 1
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    example = TrainConfig.from_file(ROOT / "examples" / "train_config.yaml")
    assert isinstance(example.rotation, RotationConfig) and isinstance(example.qat, QATConfig)
    with pytest.raises(ValueError, match=r"TrainConfig.qat: QATConfig: unknown field\(s\) \['bits'\]"):
        TrainConfig(output_dir=str(tmp_path / "run"), qat={"bits": 4})
    assert TrainConfig(output_dir=str(tmp_path / "run"), learning_rate="1e-4").learning_rate == 1e-4  # YAML's string


def test_the_foundation_config_imports_nothing_from_the_package():
    tree = ast.parse((ROOT / "rolora_plugin" / "config.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("rolora_plugin"))]
    assert imports == []


@pytest.mark.parametrize("path", ["rolora_plugin/config.py", "rolora_plugin/rotate/config.py", "rolora_plugin/quant/config.py",
                                  "rolora_plugin/lora/config.py", "rolora_plugin/app/train_config.py"])  # fmt: skip
def test_config_docstrings_hold_no_measured_numbers(path):
    """Measured figures live in benchmarks/RESULTS.md; the config docstrings point there instead of drifting."""
    text = (ROOT / path).read_text()
    assert not re.findall(r"\d\.\d+×", text), f"{path}: a measured ratio; move it to benchmarks/RESULTS.md"


# ---------------------------------------------------------------------------------------------- Axolotl's args


def test_axolotl_args_take_the_library_defaults():
    pytest.importorskip("pydantic")  # a dependency of Axolotl, not of rolora-plugin
    from rolora_plugin.integrations.axolotl.args import RoLoRAExportArgs, RoLoRAOptions

    export = RoLoRAExportArgs()
    for name in ("overwrite", "save_rotation_record", "merged_output_dir"):
        assert getattr(export, name) == ExportConfig.default(name), name
    assert export.overwrite is False  # the safe default: an existing export is not replaced unless asked
    options = RoLoRAOptions()
    assert options.lora_lr_scale == RoLoRAConfig.default("lora_lr_scale")
    assert options.rotation == RotationConfig() and options.monitor == MonitorConfig() and options.qat == QATConfig()
    assert set(RoLoRAOptions.model_fields["lora_lr_scale"].annotation.__args__) == set(LR_SCALES)
    cfg = RoLoRAOptions(export={"overwrite": True}).to_rolora_config()
    assert cfg.export.overwrite is True and cfg.export.merged_output_dir is None
