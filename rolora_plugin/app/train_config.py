"""The :class:`TrainConfig` of ``rolora train`` (YAML/JSON) and the checks it runs on its folders.

Split from :mod:`.train` (which runs the fine-tune) so that the config is read without the training code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, spec
from ..lora.config import QATConfig
from ..rotate.config import RotationConfig

__all__ = ["SEED_LIMIT", "TrainConfig", "TrainInputError", "check_checkpoint_dir", "checkpoint_root"]

SEED_LIMIT = 2**32


class TrainInputError(ValueError):
    """The training inputs (config values, dataset, model, checkpoints) cannot be used; the message says why."""


def _numeric_string(value):
    """YAML reads ``1e-4`` as a string: a numeric string becomes its float (anything else is left to the checks)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _targets(value) -> bool:
    return isinstance(value, (list, str)) and bool(value)


@dataclass
class TrainConfig(Config):
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
        rotation: a :class:`RotationConfig` or a mapping of its fields (seed, r1..r4, ...); without ``seed`` the
            rotation takes ``seed``. qat: a :class:`~rolora_plugin.QATConfig` or a mapping of its fields.
    """

    model: str = spec("smollm2", kind=str, nonempty=True)
    dataset: str = spec("sciq", kind=str, nonempty=True)
    output_dir: str = spec("rolora-run", kind=str, nonempty=True)
    n_examples: int | None = spec(400, kind=int, min=1, optional=True)
    seq_len: int = spec(256, kind=int, min=2)
    max_steps: int = spec(100, kind=int, min=1)
    learning_rate: float = spec(2e-4, kind=float, gt=0, parse=_numeric_string)
    batch_size: int = spec(4, kind=int, min=1)
    grad_accum: int = spec(1, kind=int, min=1)
    warmup_steps: int = spec(5, kind=int, min=0)
    logging_steps: int = spec(5, kind=int, min=1)
    seed: int = spec(0, kind=int, min=0, max=SEED_LIMIT - 1)
    lora_r: int = spec(16, kind=int, min=1)
    lora_alpha: float = spec(16, kind=float, gt=0, parse=_numeric_string)
    lora_dropout: float = spec(0.0, kind=float, min=0, lt=1, parse=_numeric_string, what="a probability in [0, 1)")
    lora_targets: list = spec(factory=lambda: ["q_proj", "v_proj"], check=_targets, what="a list of module names or 'all-linear'")
    rotate: bool = spec(True, kind=bool)
    # a mapping (YAML) without "seed" takes the run's seed (__post_init__); the default {} is RotationConfig(seed=seed)
    rotation: RotationConfig = spec(factory=dict, kind=RotationConfig)
    qat: QATConfig = spec(factory=QATConfig, kind=QATConfig)
    save_merged: bool = spec(True, kind=bool)
    cache_dir: str | None = spec(None, kind=str, nonempty=True, optional=True)
    save_steps: int = spec(50, kind=int, min=0)
    checkpoint_dir: str | None = spec(None, kind=str, nonempty=True, optional=True, what="a non-empty path or null")

    def __post_init__(self):
        if isinstance(self.rotation, Mapping) and "seed" not in self.rotation:
            self.rotation = {"seed": self.seed, **self.rotation}  # the seed is checked first (its field comes first)
        super().__post_init__()

    def _check(self) -> None:
        if self.lora_alpha.is_integer():
            self.lora_alpha = int(self.lora_alpha)
        check_checkpoint_dir(self)

    def rotation_config(self) -> RotationConfig:
        return self.rotation

    def qat_config(self) -> QATConfig:
        return self.qat

    def lora_kwargs(self) -> dict:
        """Keyword arguments of :func:`rolora_plugin.rolora_lora_config` (besides the model)."""
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "target_modules": self.lora_targets, "lora_dropout": self.lora_dropout}

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
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
