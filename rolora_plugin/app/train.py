"""``rolora train``: a small :class:`TrainConfig` (YAML/JSON) → LoRA or RoLoRA fine-tune → adapter, merged export
and training log, published atomically; and :func:`finetune`, the Trainer run the demo shares.

RoLoRA = the plain LoRA run plus :class:`rolora_plugin.RoLoRACallback`, which rotates the PeftModel (LoRA A/B with
it) in ``on_init_end``, before the optimizer exists. The output folder is staged with
:func:`rolora_plugin.publish.atomic_output_dir` (create-exclusive): an interrupted or failed run leaves nothing
at ``output_dir``, and a folder that appears there meanwhile is never replaced.

Example::

    cfg = TrainConfig.from_file("examples/train_config.yaml", overrides={"max_steps": 10})
    summary = run_training(cfg)        # {"steps", "final_loss", "merged_dir", "output_dir"}
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ConfigMixin, RotationConfig
from ..publish import OutputExistsError, atomic_output_dir, atomic_write_text
from .assets import pad_collate, tokenize_pairs

__all__ = ["TrainConfig", "finetune", "load_base_model", "load_pairs", "loss_curve", "pad_id", "run_training"]

BUILTIN_DATASETS = ("sciq", "gsm8k")


@dataclass
class TrainConfig(ConfigMixin):
    """``rolora train``: a LoRA (``rotate: false``) or RoLoRA fine-tune with ``transformers.Trainer``.

    Args:
        model: ``"smollm2"`` (the embedded default) or a local model directory.
        dataset: ``"sciq"``, ``"gsm8k"`` or a ``.json``/``.jsonl`` file of ``{"prompt": ..., "response": ...}``.
        output_dir: written atomically: ``adapter/``, ``merged/`` (if ``save_merged``), ``train_log.json``.
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
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    rotate: bool = True
    rotation: dict = field(default_factory=dict)
    qat: dict = field(default_factory=dict)
    save_merged: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        for name in ("seq_len", "max_steps", "batch_size", "grad_accum", "logging_steps", "lora_r"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.rotate, bool) or not isinstance(self.save_merged, bool):
            raise ValueError("TrainConfig.rotate and TrainConfig.save_merged must be true or false")
        if not isinstance(self.lora_targets, (list, str)) or not self.lora_targets:
            raise ValueError(f"TrainConfig.lora_targets must be a list of module names or 'all-linear', got {self.lora_targets!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        self.rotation_config()
        self.qat_config()

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
        """Read a YAML or JSON mapping (JSON is YAML); unknown keys are an error that lists the valid ones."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of TrainConfig fields, got {type(data).__name__}")
        return cls.from_dict({**data, **(overrides or {})})


# ---------------------------------------------------------------------------------------------- data


def pad_id(tok) -> int:
    """The tokenizer's pad id, else its EOS id (SmolLM2 has no pad token)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def load_pairs(dataset: str, n: int | None, seed: int) -> list[dict]:
    """Instruction pairs from ``"sciq"``/``"gsm8k"`` (:func:`~.assets.instruction_pairs`) or a json/jsonl file."""
    from .assets import instruction_pairs

    if dataset in BUILTIN_DATASETS:
        return instruction_pairs(dataset, n, seed)
    path = Path(dataset)
    if not path.is_file():
        raise ValueError(f"dataset {dataset!r} is neither 'sciq', 'gsm8k' nor an existing .json/.jsonl file")
    text = path.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"prompt", "response"} <= set(r) for r in rows):
        raise ValueError(f"{path} must hold a list of {{'prompt': ..., 'response': ...}} objects")
    return rows[:n] if n else rows


def load_base_model(model: str, cache_dir: str | None = None, dtype=torch.float32):
    """(model, tokenizer) for ``"smollm2"`` (the embedded default) or a local model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "smollm2":
        from .assets import load_smollm2

        return load_smollm2(dtype, cache_dir=cache_dir)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, local_files_only=True)
    return net, AutoTokenizer.from_pretrained(model, local_files_only=True)


# ---------------------------------------------------------------------------------------------- training


def finetune(model, tok, train: list[dict], *, rolora: bool, steps: int, lr: float, batch_size: int, seed: int,
             lora: dict, rotation: RotationConfig | None = None, qat: dict | None = None, grad_accum: int = 1,
             warmup_steps: int = 0, logging_steps: int = 1, output_dir: str | None = None):  # fmt: skip
    """LoRA (``rolora=False``) or RoLoRA fine-tune of ``model`` with ``transformers.Trainer``; returns the Trainer.

    ``train``: :func:`~.assets.tokenize_pairs` rows. ``lora``: r, lora_alpha, target_modules, lora_dropout. Both
    runs draw the same LoRA initialisation (``set_seed(seed)`` before ``get_peft_model``).
    """
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from .. import rolora_lora_config

    set_seed(seed)
    peft_model = get_peft_model(model, rolora_lora_config(model, **lora))
    callbacks = [_rolora_callback(rotation, qat)] if rolora else []
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="rolora-train-"), max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, warmup_steps=warmup_steps,
        logging_steps=logging_steps, save_strategy="no", report_to="none", use_cpu=True, seed=seed,
        weight_decay=0.0, lr_scheduler_type="constant_with_warmup", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=peft_model, args=args, train_dataset=train, callbacks=callbacks,
                      data_collator=lambda feats: pad_collate(feats, pad_id(tok)))  # fmt: skip
    _quiet_progress(trainer, "RoLoRA fine-tune" if rolora else "LoRA fine-tune")
    trainer.train()
    return trainer


def _quiet_progress(trainer, desc: str) -> None:
    """Replace the Trainer's progress printer (which writes every log dict) by one tqdm bar showing the loss."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _LossBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=desc, leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_LossBar())


def _rolora_callback(rotation: RotationConfig | None, qat: dict | None):
    from .. import RoLoRACallback, RoLoRAConfig

    return RoLoRACallback(RoLoRAConfig(rotation=rotation, monitor={"every_n_steps": 0}, qat=qat or {}))


def loss_curve(trainer) -> list[tuple[int, float]]:
    """``[(step, training loss), ...]`` from the Trainer's log history."""
    return [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]


# ---------------------------------------------------------------------------------------------- rolora train


def run_training(cfg: TrainConfig) -> dict:
    """``rolora train``: fine-tune per ``cfg``, publish ``output_dir`` atomically; returns a summary dict."""
    out = Path(cfg.output_dir)
    if out.exists():
        raise OutputExistsError(f"output_dir {str(out)!r} already exists; choose a new one")
    model, tok = load_base_model(cfg.model, cfg.cache_dir)
    train = tokenize_pairs(tok, load_pairs(cfg.dataset, cfg.n_examples, cfg.seed), cfg.seq_len)
    with atomic_output_dir(out) as tmp:
        trainer = finetune(model, tok, train, rolora=cfg.rotate, steps=cfg.max_steps, lr=cfg.learning_rate,
                           batch_size=cfg.batch_size, seed=cfg.seed, lora=cfg.lora_kwargs(), grad_accum=cfg.grad_accum,
                           rotation=cfg.rotation_config() if cfg.rotate else None, qat=cfg.qat,
                           warmup_steps=cfg.warmup_steps, logging_steps=cfg.logging_steps, output_dir=str(tmp / "trainer"))  # fmt: skip
        summary = _save_training(trainer, tok, cfg, tmp)
    return {**summary, "merged_dir": str(out / "merged") if cfg.save_merged else None, "output_dir": str(out)}


def _save_training(trainer, tok, cfg: TrainConfig, tmp: Path) -> dict:
    """adapter/ (+ rotation record), merged/ (if asked) and train_log.json inside the staging folder ``tmp``."""
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    trainer.model.save_pretrained(tmp / "adapter")  # RoLoRACallback's save hook adds rolora_rotation.json
    tok.save_pretrained(tmp / "adapter")
    if cfg.save_merged and cfg.rotate:
        from .. import merge_and_export

        merge_and_export(trainer.model, tmp / "merged", tokenizer=tok)
    elif cfg.save_merged:
        trainer.model.merge_and_unload().save_pretrained(tmp / "merged")
        tok.save_pretrained(tmp / "merged")
    curve = loss_curve(trainer)
    summary = {"steps": trainer.state.global_step, "final_loss": curve[-1][1] if curve else float("nan")}
    log = {"config": cfg.to_dict(), **summary, "log_history": trainer.state.log_history}
    atomic_write_text(tmp / "train_log.json", json.dumps(log, indent=2))
    return summary
