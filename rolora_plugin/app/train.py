"""``rolora train``: a small :class:`TrainConfig` (YAML/JSON) → LoRA or RoLoRA fine-tune → adapter, merged export
and training log, published atomically; and the one fine-tune harness: :class:`FinetuneSettings` → :func:`finetune`
(:func:`build_trainer`: peft LoRA, ``TrainingArguments``, ``transformers.Trainer``), which ``rolora train``, the
demo, ``benchmarks/finetune_table.py`` and ``examples/hf_trainer_rolora.py`` share.

RoLoRA = the plain LoRA run plus :class:`rolora_plugin.RoLoRACallback`, which rotates the PeftModel (LoRA A/B with
it) in ``on_init_end``, before the optimizer exists.

Where things go (see :func:`run_training`):

* **Checkpoints** (every ``save_steps`` steps and at the last step, the two newest kept) go to
  ``checkpoint_dir`` (default ``<output_dir>.checkpoints``), *outside* the staging folder, so a killed run keeps
  them; ``run_training(cfg, resume=True)`` (``rolora train CONFIG --resume``) continues from the newest complete
  one, with the same config (only ``max_steps``, ``save_steps``, ``logging_steps`` may change). Without
  ``resume``, leftover checkpoints are an error that says so. Once the output is published the clean-up removes
  only what the run created there (its ``checkpoint-N`` folders and the ``rolora_train_config.json`` marking the
  folder as ours), then the folder if that left it empty; anything else in it is kept and named in a warning.
  A ``checkpoint_dir`` equal to ``output_dir``, inside it, or containing it is refused up front (the clean-up
  would otherwise reach the published output).
* **The output** (``adapter/``, ``merged/``, ``train_log.json``) is staged with
  :func:`rolora_plugin.io.publish.atomic_output_dir` (create-exclusive): an interrupted or failed run leaves nothing
  at ``output_dir``, and a folder that appears there meanwhile is never replaced (the checkpoints stay: resume
  with another ``--output-dir`` and the same ``checkpoint_dir``).
* Nothing is published from a run whose LoRA weights are not finite (training diverged).

Example::

    cfg = TrainConfig.from_file("examples/train_config.yaml", overrides={"max_steps": 10})
    summary = run_training(cfg)        # {"steps", "examples", "final_loss", "final_loss_steps", "merged_dir", "output_dir"}
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..rotate.config import RotationConfig
from ..io.publish import OutputExistsError, atomic_output_dir, atomic_write_text
from ..config import Config, is_number, spec
from ..lora.config import LR_SCALES, QATConfig
from .assets import pad_collate, tokenize_pairs
from .runtime import filtered_logs
from .train_config import SEED_LIMIT, TrainConfig, TrainInputError, _overlap, check_checkpoint_dir, checkpoint_root  # noqa: F401 (re-exported)

__all__ = [
    "OPTIMIZERS",
    "FinetuneSettings",
    "TrainConfig",
    "TrainInputError",
    "attach_lora",
    "build_trainer",
    "check_checkpoint_dir",
    "checkpoint_root",
    "cosine_warmup",
    "data_collator",
    "finetune",
    "finetune_settings",
    "latest_checkpoint",
    "load_base_model",
    "load_pairs",
    "loss_curve",
    "pad_id",
    "remove_checkpoints",
    "run_training",
    "settings_callbacks",
    "smoothed_loss",
    "training_arguments",
]

logger = logging.getLogger(__name__)
BUILTIN_DATASETS = ("sciq", "gsm8k")
RUN_CONFIG_FILE = "rolora_train_config.json"  # in checkpoint_dir: marks it as ours and holds the run's config
RESUMABLE_CHANGES = ("max_steps", "save_steps", "logging_steps", "output_dir", "checkpoint_dir")


# ---------------------------------------------------------------------------------------------- data


def pad_id(tok) -> int:
    """The tokenizer's pad id, else its EOS id (SmolLM2 has no pad token)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def load_pairs(dataset: str, n: int | None, seed: int) -> list[dict]:
    """Instruction pairs from ``"sciq"``/``"gsm8k"`` (:func:`~.assets.instruction_pairs`) or a json/jsonl file.

    Raises :class:`TrainInputError` for a file that is not JSON / JSON lines or does not hold prompt/response pairs.
    """
    from .assets import instruction_pairs

    if dataset in BUILTIN_DATASETS:
        try:
            return instruction_pairs(dataset, n, seed)
        except ValueError as e:
            raise TrainInputError(f"dataset {dataset!r}: {e} (n_examples)") from None
    path = Path(dataset)
    if not path.is_file():
        raise TrainInputError(f"dataset {dataset!r} is neither 'sciq', 'gsm8k' nor an existing .json/.jsonl file")
    rows = _read_rows(path)
    if not isinstance(rows, list) or not rows or not all(_is_pair(r) for r in rows):
        raise TrainInputError(f"dataset {path} must hold a non-empty list of {{'prompt': str, 'response': str}} objects")
    return rows[:n] if n else rows


def _read_rows(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        kind = "JSON lines (one object per line)" if path.suffix == ".jsonl" else "JSON"
        raise TrainInputError(f"dataset {path} is not valid {kind}: {str(e).splitlines()[0]}") from None


def _is_pair(row) -> bool:
    return isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)


def tokenize_dataset(tok, pairs: list[dict], seq_len: int) -> list[dict]:
    """:func:`~.assets.tokenize_pairs`, with a message naming ``seq_len`` when no response fits."""
    try:
        return tokenize_pairs(tok, pairs, seq_len)
    except ValueError:
        raise TrainInputError(f"seq_len {seq_len} is too short: no example keeps a response token within its first "
                              f"{seq_len} tokens; raise seq_len") from None  # fmt: skip


def load_base_model(model: str, cache_dir: str | None = None, dtype=torch.float32):
    """(model, tokenizer) for ``"smollm2"`` (the embedded default) or a local model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "smollm2":
        from .assets import load_smollm2

        return load_smollm2(dtype, cache_dir=cache_dir)
    from ..io.loading import load_causal_lm

    net = load_causal_lm(model, dtype, model_cls=AutoModelForCausalLM, what="base model")  # refuses missing/extra tensors
    return net, AutoTokenizer.from_pretrained(model, local_files_only=True)


# ---------------------------------------------------------------------------------------------- training


OPTIMIZERS = {"adamw": {}, "sgd": {"optim": "sgd", "optim_args": "momentum=0.9"}}  # name -> TrainingArguments fields


@dataclass
class FinetuneSettings(Config):
    """What turns a model and tokenized rows into a trained PeftModel: the one fine-tune harness behind ``rolora
    train``, ``rolora demo``, ``benchmarks/finetune_table.py`` and ``examples/hf_trainer_rolora.py``.

    Args:
        steps, lr, batch_size: optimizer steps, peak learning rate, rows per device step.
        seed: ``set_seed(seed)`` right before ``get_peft_model`` (runs at one seed draw the same LoRA
            initialisation, LoRA or RoLoRA) and the Trainer's seed.
        lora: keyword arguments of :func:`rolora_plugin.rolora_lora_config` (r, lora_alpha, target_modules, ...).
        rotation: None = plain LoRA; a :class:`RotationConfig` = RoLoRA: :func:`build_trainer` adds a
            :class:`~rolora_plugin.RoLoRACallback` with it (monitor off), which rotates before the optimizer exists.
        qat: a :class:`~rolora_plugin.QATConfig` (a mapping of its fields is built into one). RoLoRA hands it to the
            callback; a plain LoRA run with ``enabled`` gets the same fake-quant forward from its first step.
        lora_lr_scale: ``RoLoRAConfig.lora_lr_scale`` of a RoLoRA run.
        schedule: the Trainer's ``lr_scheduler_type`` after ``warmup_steps`` (:func:`cosine_warmup`: cosine).
        optimizer: a key of :data:`OPTIMIZERS` (``"adamw"``: the Trainer's default AdamW; ``"sgd"``: momentum 0.9).
        data_seed: the Trainer's ``data_seed`` (None: the data order follows ``seed``).
        save_steps: checkpoint every n steps and at the last step (two kept); 0 = no checkpoints.
    """

    steps: int = spec(kind=int, min=1)
    lr: float = spec(kind=float, gt=0)
    batch_size: int = spec(kind=int, min=1)
    seed: int = spec(kind=int, min=0)
    lora: dict = spec(kind=dict)
    rotation: RotationConfig | None = spec(None, kind=RotationConfig, optional=True)
    qat: QATConfig | None = spec(None, kind=QATConfig, optional=True)
    lora_lr_scale: str = spec("none", choices=LR_SCALES)
    grad_accum: int = spec(1, kind=int, min=1)
    warmup_steps: int = spec(0, kind=int, min=0)
    logging_steps: int = spec(1, kind=int, min=1)
    schedule: str = spec("constant_with_warmup", kind=str, nonempty=True)
    optimizer: str = spec("adamw", choices=tuple(OPTIMIZERS))
    data_seed: int | None = spec(None, kind=int, min=0, optional=True)
    save_steps: int = spec(0, kind=int, min=0)


def cosine_warmup(steps: int) -> dict:
    """The schedule of the example and the benchmark: cosine decay after ``min(10, steps // 10)`` warm-up steps
    (``FinetuneSettings(..., **cosine_warmup(steps))``)."""
    return {"schedule": "cosine", "warmup_steps": min(10, steps // 10)}


def finetune_settings(cfg: TrainConfig) -> FinetuneSettings:
    """The fine-tune of ``rolora train``: constant learning rate after the warm-up, data order from ``seed``."""
    return FinetuneSettings(steps=cfg.max_steps, lr=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed,
                            lora=cfg.lora_kwargs(), rotation=cfg.rotation_config() if cfg.rotate else None, qat=cfg.qat,
                            grad_accum=cfg.grad_accum, warmup_steps=cfg.warmup_steps, logging_steps=cfg.logging_steps,
                            save_steps=cfg.save_steps)  # fmt: skip


def finetune(model, tok, train: list[dict], settings: FinetuneSettings, *, callbacks=(), output_dir: str | None = None,
             resume_from: str | None = None):  # fmt: skip
    """LoRA or RoLoRA fine-tune of ``model`` per ``settings`` (:func:`build_trainer`, one tqdm bar showing the
    loss); returns the trained Trainer. ``train``: :func:`~.assets.tokenize_pairs` rows. ``callbacks``: more
    Trainer callbacks, after the settings' own. ``output_dir``: the Trainer's folder (checkpoints); None = a
    temporary one. ``resume_from``: a checkpoint folder to continue from (optimizer, scheduler, RNG and data
    position restored by the Trainer).
    """
    with contextlib.ExitStack() as stack:
        if output_dir is None:
            output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rolora-train-"))
        trainer = build_trainer(model, tok, train, settings, output_dir, callbacks)
        _quiet_progress(trainer, "LoRA fine-tune" if settings.rotation is None else "RoLoRA fine-tune")
        trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def build_trainer(model, tok, train: list[dict], settings: FinetuneSettings, output_dir: str, callbacks=()):
    """The ``transformers.Trainer`` of a fine-tune, not yet trained: :func:`attach_lora`, :func:`training_arguments`,
    :func:`data_collator`; callbacks: a RoLoRA run's :class:`~rolora_plugin.RoLoRACallback` (or a LoRA run's QAT),
    then ``callbacks``, then (``save_steps``) one that checkpoints the last step too."""
    from transformers import Trainer

    peft_model = attach_lora(model, settings)
    callbacks = [*settings_callbacks(settings), *callbacks, *([_save_last_step()] if settings.save_steps else [])]
    return Trainer(model=peft_model, args=training_arguments(settings, output_dir), train_dataset=train,
                   data_collator=data_collator(tok), callbacks=callbacks)  # fmt: skip


def attach_lora(model, settings: FinetuneSettings):
    """``get_peft_model(model, rolora_lora_config(model, **settings.lora))`` right after ``set_seed(settings.seed)``;
    unusable LoRA settings raise :class:`TrainInputError`."""
    from peft import get_peft_model
    from transformers import set_seed

    from .. import rolora_lora_config

    set_seed(settings.seed)
    try:
        return get_peft_model(model, rolora_lora_config(model, **settings.lora))
    except ValueError as e:  # unknown target names, invalid LoRA settings
        raise TrainInputError(f"LoRA settings (lora_targets, lora_r, lora_alpha, lora_dropout): {e}") from None


def training_arguments(settings: FinetuneSettings, output_dir: str):
    """``TrainingArguments`` of a fine-tune on the CPU: no weight decay, no reporting, no tqdm (the Trainer
    prints its logs; :func:`finetune` shows one bar instead)."""
    from transformers import TrainingArguments

    s = settings
    saving = {"save_strategy": "steps", "save_steps": s.save_steps, "save_total_limit": 2} if s.save_steps else {"save_strategy": "no"}
    return TrainingArguments(
        output_dir=output_dir, max_steps=s.steps, learning_rate=s.lr, per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, warmup_steps=s.warmup_steps, logging_steps=s.logging_steps,
        lr_scheduler_type=s.schedule, weight_decay=0.0, seed=s.seed, data_seed=s.data_seed, report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, **OPTIMIZERS[s.optimizer], **saving,
    )  # fmt: skip


def data_collator(tok):
    """:func:`~.assets.pad_collate` with the tokenizer's pad id (:func:`pad_id`)."""
    return partial(pad_collate, pad_id=pad_id(tok))


def _save_last_step():
    from transformers import TrainerCallback

    class SaveLastStep(TrainerCallback):
        """Checkpoint the last step too, so a failure after training (export, publish) loses no work."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = True

    return SaveLastStep()


def _quiet_progress(trainer, desc: str) -> None:
    """Replace the Trainer's progress printer (which writes every log dict) by one tqdm bar showing the loss."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _LossBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc, leave=False)

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


def settings_callbacks(settings: FinetuneSettings) -> list:
    """A RoLoRA run: its RoLoRACallback (monitor off). A LoRA run: the fake-quant forward if QAT is enabled."""
    from .. import RoLoRACallback, RoLoRAConfig

    if settings.rotation is not None:
        config = RoLoRAConfig(rotation=settings.rotation, monitor={"every_n_steps": 0}, qat=settings.qat or {},
                              lora_lr_scale=settings.lora_lr_scale)  # fmt: skip
        return [RoLoRACallback(config)]
    return [_plain_qat(settings.qat)] if settings.qat is not None and settings.qat.enabled else []


def _plain_qat(qat):
    """QAT of an unrotated LoRA run: the fake-quant forward RoLoRACallback installs, from ``qat.start_step`` on."""
    from transformers import TrainerCallback

    from ..quant import enable_fake_quant_

    class PlainQAT(TrainerCallback):
        handle = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if self.handle is None and state.global_step >= qat.start_step:
                self.handle = enable_fake_quant_(model, qat.quant, qat.targets)

        def on_train_end(self, args, state, control, **kwargs):
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    return PlainQAT()


def loss_curve(trainer) -> list[tuple[int, float]]:
    """``[(step, training loss), ...]`` from the Trainer's log history."""
    return [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]


def smoothed_loss(log_history: list[dict]) -> tuple[float | None, list[int] | None]:
    """The training loss to report: the mean of the logged losses over the last quarter of the log entries (one
    step is one noisy batch), else the Trainer's mean over the whole run (``train_loss``, logged at the end).

    Returns ``(loss, [first step, last step])`` of the window, or ``(None, None)`` when nothing finite was logged.
    """
    curve = [(row["step"], row["loss"]) for row in log_history if is_number(row.get("loss"))]
    if curve:
        window = curve[-max(1, len(curve) // 4) :]
        return sum(v for _, v in window) / len(window), [window[0][0], window[-1][0]]
    end = next((row for row in reversed(log_history) if is_number(row.get("train_loss"))), None)
    return (end["train_loss"], [1, end["step"]]) if end else (None, None)


def _strict_json(value):
    """``value`` with every non-finite float replaced by None (``NaN`` is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- checkpoints


def remove_checkpoints(root: Path, output_dir: Path) -> list[Path]:
    """After publishing: delete what the run wrote in ``root`` (its ``checkpoint-N`` folders, then the config file
    that marks ``root`` as ours), then ``root`` itself if that left it empty. Never anything else: a ``root``
    without the marker, or overlapping ``output_dir``, is not touched at all; other content is kept and named in a
    warning. The marker goes after the checkpoints, so a clean-up cut short leaves checkpoints only in a folder
    still recognised as this run's. Returns what is left in ``root`` (empty: ``root`` is gone or empty).
    """
    root = Path(root)
    if not (root / RUN_CONFIG_FILE).is_file():
        return sorted(root.iterdir()) if root.is_dir() else []
    if _overlap(root, output_dir):
        logger.warning("kept the checkpoints in %s: that folder overlaps the output %s", root, output_dir)
        return sorted(root.iterdir())
    for _, path in _checkpoints(root):
        shutil.rmtree(path, ignore_errors=True)
    for part in root.glob(f".{RUN_CONFIG_FILE}.*.tmp"):  # a write of the marker cut short (atomic_write_text)
        part.unlink(missing_ok=True)
    if _checkpoints(root):  # a checkpoint could not be deleted: keep the marker with it
        left = sorted(root.iterdir())
        logger.warning("kept %s after publishing %s: could not delete %s", root, output_dir, ", ".join(p.name for p in left))
        return left
    (root / RUN_CONFIG_FILE).unlink(missing_ok=True)
    left = sorted(root.iterdir())
    if left:
        names = ", ".join(p.name for p in left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        logger.warning("kept %s after publishing %s: it holds %s, which rolora train did not create (delete the "
                       "folder once you no longer need it)", root, output_dir, names)  # fmt: skip
        return left
    with contextlib.suppress(OSError):
        root.rmdir()  # fails if something appeared since the listing: then it is kept
    return sorted(root.iterdir()) if root.is_dir() else []


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def _complete(step: int, path: Path, need_record: bool) -> bool:
    """Trainer state parses and names this step, adapter weights present, rotation record present if needed."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    adapter = any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin"))
    return state.get("global_step") == step and adapter and (not need_record or (path / "rolora_rotation.json").is_file())


def latest_checkpoint(root: Path, need_record: bool) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``root`` (a checkpoint cut short by a kill is skipped)."""
    complete = [path for step, path in _checkpoints(root) if _complete(step, path, need_record)]
    return complete[-1] if complete else None


def _resume_point(cfg: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to continue from (None: start at step 0); refuses leftovers without ``resume``."""
    root = checkpoint_root(cfg)
    if not root.exists() or (root.is_dir() and not root.is_symlink() and not any(root.iterdir())):  # empty: nothing to lose
        if resume:
            logger.info("--resume: no checkpoints in %s yet; starting at step 0", root)
        return None
    saved = _saved_config(root)
    latest = latest_checkpoint(root, need_record=cfg.rotate)
    if not resume:
        at = f" (newest complete: {latest.name})" if latest else ""
        raise TrainInputError(f"{root} holds checkpoints of an unfinished run{at}; pass --resume to continue it, or "
                              "remove that folder to start over")  # fmt: skip
    _check_same_run(saved, cfg, root)
    for step, path in _checkpoints(root):
        if latest is None or step > int(latest.name.removeprefix("checkpoint-")):
            logger.info("removing %s: cut short when the run was stopped", path)
            shutil.rmtree(path, ignore_errors=True)
    if latest is None:
        logger.info("--resume: no complete checkpoint in %s; starting at step 0", root)
    return latest


def _saved_config(root: Path) -> dict:
    try:
        return json.loads((root / RUN_CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise TrainInputError(f"checkpoint_dir {str(root)!r} exists but was not made by rolora train (no {RUN_CONFIG_FILE}); "
                              "choose another checkpoint_dir or output_dir") from None  # fmt: skip
    except (OSError, ValueError) as e:
        raise TrainInputError(f"cannot read {root / RUN_CONFIG_FILE} ({e}); remove {root} to start over") from None


def _check_same_run(saved: dict, cfg: TrainConfig, root: Path) -> None:
    now = cfg.to_dict()
    try:  # a run config written by an earlier version (rotation / qat as bare override mappings): as written today
        saved = TrainConfig.from_dict(saved).to_dict()
    except (ValueError, TypeError):
        pass  # compared as stored: every difference is named below
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        raise TrainInputError(f"the checkpoints in {root} were made with other settings ({', '.join(changed)}); resume with "
                              f"the same config (only {', '.join(RESUMABLE_CHANGES[:3])} may change) or remove {root}")  # fmt: skip


# ---------------------------------------------------------------------------------------------- rolora train


def run_training(cfg: TrainConfig, resume: bool = False) -> dict:
    """``rolora train``: fine-tune per ``cfg`` (checkpoints outside the output, see the module doc), publish
    ``output_dir`` atomically; returns a summary dict. ``resume``: continue from the newest complete checkpoint."""
    out, root = Path(cfg.output_dir), checkpoint_root(cfg)
    check_checkpoint_dir(cfg)
    if out.exists():
        raise OutputExistsError(f"output_dir {str(out)!r} already exists; choose a new one")
    start = _resume_point(cfg, resume)
    pairs = load_pairs(cfg.dataset, cfg.n_examples, cfg.seed)
    model, tok = load_base_model(cfg.model, cfg.cache_dir)
    train = tokenize_dataset(tok, pairs, cfg.seq_len)
    if cfg.save_steps:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / RUN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    trainer = finetune(model, tok, train, finetune_settings(cfg), output_dir=str(root) if cfg.save_steps else None,
                       resume_from=str(start) if start else None)  # fmt: skip
    _check_finite(trainer, root if cfg.save_steps else None)
    with atomic_output_dir(out) as tmp, _hide_staging_paths(tmp):
        summary = _save_training(trainer, tok, cfg, tmp, resumed_from=start, examples=len(train))
    logger.info("published %s (adapter/%s, train_log.json)", out, ", merged/" if cfg.save_merged else "")
    if cfg.save_steps:
        remove_checkpoints(root, out)  # the output holds everything now
    return {**summary, "merged_dir": str(out / "merged") if cfg.save_merged else None, "output_dir": str(out)}


def _check_finite(trainer, root: Path | None) -> None:
    """Refuse to publish LoRA weights with NaN/Inf (a diverged run); say where the checkpoints are."""
    bad = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        where = f"; its checkpoints stay in {root}" if root else ""
        raise TrainInputError(f"training diverged: {bad[0]} (and {len(bad) - 1} more) holds NaN/Inf after step "
                              f"{trainer.state.global_step}, nothing was published{where}; lower learning_rate")  # fmt: skip


@contextlib.contextmanager
def _hide_staging_paths(tmp: Path):
    """Drop export log lines that name the staging folder (the published path is logged once it exists)."""
    with filtered_logs((("rolora_plugin.io.export", rf".*{re.escape(str(tmp))}"),)):
        yield


def _save_training(trainer, tok, cfg: TrainConfig, tmp: Path, *, resumed_from: Path | None, examples: int) -> dict:
    """adapter/ (+ rotation record), merged/ (if asked) and train_log.json inside the staging folder ``tmp``."""
    trainer.model.save_pretrained(tmp / "adapter")  # RoLoRACallback's save hook adds rolora_rotation.json
    tok.save_pretrained(tmp / "adapter")
    if cfg.save_merged and cfg.rotate:
        from .. import merge_and_export

        merge_and_export(trainer.model, tmp / "merged", tokenizer=tok)
    elif cfg.save_merged:
        trainer.model.merge_and_unload().save_pretrained(tmp / "merged")
        tok.save_pretrained(tmp / "merged")
    loss, window = smoothed_loss(trainer.state.log_history)
    summary = {"steps": trainer.state.global_step, "examples": examples, "final_loss": loss, "final_loss_steps": window,
               "resumed_from": resumed_from.name if resumed_from else None}  # fmt: skip
    log = _strict_json({"config": cfg.to_dict(), **summary, "log_history": trainer.state.log_history})
    atomic_write_text(tmp / "train_log.json", json.dumps(log, indent=2, allow_nan=False))
    return summary
