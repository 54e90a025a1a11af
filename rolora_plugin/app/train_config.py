"""The :class:`TrainConfig` of ``rolora train`` (YAML/JSON) and the checks it runs on its folders.

Split from :mod:`.train` (which runs the fine-tune) so that the config is read without the training code.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigMixin, RotationConfig

__all__ = ["SEED_LIMIT", "TrainConfig", "TrainInputError", "check_checkpoint_dir", "checkpoint_root"]

SEED_LIMIT = 2**32


class TrainInputError(ValueError):
    """The training inputs (config values, dataset, model, checkpoints) cannot be used; the message says why."""


def _as_number(value, name: str) -> float:
    """An int/float, or a numeric string (YAML reads ``1e-4`` as a string), as float."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"TrainConfig.{name} must be a number, got the string {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
    return float(value)


def _check_int(cfg, name: str, lo: int, hi: int | None = None) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        span = f"an int in {lo}..{hi}" if hi is not None else ("a positive int" if lo == 1 else f"an int >= {lo}")
        raise ValueError(f"TrainConfig.{name} must be {span}, got {value!r}")


@dataclass
class TrainConfig(ConfigMixin):
    """``rolora train``: a LoRA (``rotate: false``) or RoLoRA fine-tune with ``transformers.Trainer``.

    Args:
        model: ``"smollm2"`` (the embedded default) or a local model directory.
        dataset: ``"sciq"``, ``"gsm8k"`` or a ``.json``/``.jsonl`` file of ``{"prompt": ..., "response": ...}``.
        output_dir: written atomically: ``adapter/``, ``merged/`` (if ``save_merged``), ``train_log.json``.
        n_examples: use the first n pairs (None: all); at least 1.
        learning_rate, lora_dropout, lora_alpha: numbers (numeric strings such as ``"1e-4"`` are accepted).
        seed: in ``[0, 2**32)`` (numpy's range; ``transformers.set_seed`` seeds numpy).
        save_steps: checkpoint every n steps (and at the last step) into ``checkpoint_dir``; 0 = no checkpoints.
        checkpoint_dir: default ``<output_dir>.checkpoints``; removed once the output is published (only what the
            run wrote there). Must not equal, contain or lie inside ``output_dir``.
        rotation: :class:`RotationConfig` fields (seed, r1..r4, ...); qat: :class:`~rolora_plugin.QATConfig` fields.
    """

    model: str = "smollm2"
    dataset: str = "sciq"
    output_dir: str = "rolora-run"
    n_examples: int | None = 400
    seq_len: int = 256
    max_steps: int = 100
    learning_rate: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 5
    logging_steps: int = 5
    seed: int = 0
    lora_r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    rotate: bool = True
    rotation: dict = field(default_factory=dict)
    qat: dict = field(default_factory=dict)
    save_merged: bool = True
    cache_dir: str | None = None
    save_steps: int = 50
    checkpoint_dir: str | None = None

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "logging_steps", "lora_r"):
            _check_int(self, name, 1)
        _check_int(self, "seq_len", 2)
        _check_int(self, "warmup_steps", 0)
        _check_int(self, "save_steps", 0)
        _check_int(self, "seed", 0, SEED_LIMIT - 1)
        if self.n_examples is not None:
            _check_int(self, "n_examples", 1)
        self._check_numbers()
        for name in ("model", "dataset", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"TrainConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.rotate, bool) or not isinstance(self.save_merged, bool):
            raise ValueError("TrainConfig.rotate and TrainConfig.save_merged must be true or false")
        if not isinstance(self.lora_targets, (list, str)) or not self.lora_targets:
            raise ValueError(f"TrainConfig.lora_targets must be a list of module names or 'all-linear', got {self.lora_targets!r}")
        if not isinstance(self.rotation, dict) or not isinstance(self.qat, dict):
            raise ValueError("TrainConfig.rotation and TrainConfig.qat must be mappings of their config fields")
        self.rotation_config()
        self.qat_config()
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise ValueError(f"TrainConfig.checkpoint_dir must be a non-empty path or null, got {self.checkpoint_dir!r}")
        check_checkpoint_dir(self)

    def _check_numbers(self) -> None:
        self.learning_rate = _as_number(self.learning_rate, "learning_rate")
        self.lora_dropout = _as_number(self.lora_dropout, "lora_dropout")
        self.lora_alpha = _as_number(self.lora_alpha, "lora_alpha")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"TrainConfig.lora_dropout is a probability: it must be in [0, 1), got {self.lora_dropout!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"TrainConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.lora_alpha.is_integer():
            self.lora_alpha = int(self.lora_alpha)

    def rotation_config(self) -> RotationConfig:
        return RotationConfig.from_dict({"seed": self.seed, **self.rotation})

    def qat_config(self):
        from .. import QATConfig

        return QATConfig.from_dict(self.qat)

    def lora_kwargs(self) -> dict:
        """Keyword arguments of :func:`rolora_plugin.rolora_lora_config` (besides the model)."""
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "target_modules": self.lora_targets, "lora_dropout": self.lora_dropout}

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict | None = None) -> "TrainConfig":
        """Read a YAML or JSON mapping (JSON is YAML) with the CLI's bounded parser (no YAML aliases, size and depth
        limits: :func:`.checks.load_config_file`); unknown keys are an error that lists the valid ones."""
        from .checks import CLIError, load_config_file

        try:
            data = load_config_file(path, "train config")
        except CLIError as e:
            raise ValueError(str(e)) from None
        return cls.from_dict({**data, **(overrides or {})})


# ---------------------------------------------------------------------------------------------- checkpoint folder


def checkpoint_root(cfg: TrainConfig) -> Path:
    """``cfg.checkpoint_dir``, else ``<output_dir>.checkpoints`` beside the output."""
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir)
    out = Path(cfg.output_dir)
    if not out.name:  # "." or "/": name the folder after the absolute path
        out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".checkpoints") if out.name else out / ".checkpoints"


def _overlap(a: Path, b: Path) -> str | None:
    """How the folders ``a`` and ``b`` overlap ("is", "is inside", "contains"), None if they do not."""
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))  # symlinks and ``..`` resolved
    if ra == rb:
        return "is"
    if rb in ra.parents:
        return "is inside"
    if ra in rb.parents:
        return "contains"
    return None


def check_checkpoint_dir(cfg: TrainConfig) -> None:
    """Refuse a checkpoint folder that equals, contains or lies inside ``output_dir``: its clean-up after publishing
    would reach the published output (and checkpoints inside the output would stop it from being published)."""
    root, out = checkpoint_root(cfg), Path(cfg.output_dir)
    how = _overlap(root, out)
    if how:
        raise TrainInputError(f"checkpoint_dir {str(root)!r} {how} output_dir {str(out)!r}; checkpoints are removed "
                              "after publishing, so give them a folder of their own, e.g. the default "
                              f"{str(out.with_name(out.name + '.checkpoints'))!r} (leave checkpoint_dir unset)")  # fmt: skip
