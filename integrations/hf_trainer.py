"""``RoLoRACallback``: RoLoRA for ``transformers.Trainer`` (+ peft) without changing the training script.

What it does, and when (verified with transformers 5.23):

* ``on_init_end`` (end of ``Trainer.__init__``, before the optimizer exists; the optimizer, DeepSpeed init and
  checkpoint resume all happen *before* ``on_train_begin``): :func:`rolora_plugin.rotate.rotation.ensure_rotated` —
  rotates the model (a bare model or a ``PeftModel``, whose LoRA A/B are rotated with it) unless
  ``model.config.rolora`` says it is rotated already, re-installs missing online modules, never rotates twice.
  It also wraps the model's ``save_pretrained`` (an instance attribute, see "Undo" below) so every save —
  ``trainer.save_model()``, checkpoints, adapters — writes ``rolora_rotation.json`` next to the weights.
* ``on_train_begin``: all ranks agree on the rotation (:func:`~rolora_plugin.integrations.deepspeed.check_rank_agreement`).
  When resuming, the ``rolora_rotation.json`` of the checkpoint actually resumed (:func:`resumed_checkpoint`)
  must match the model's rotation, else :class:`rolora_plugin.RotationError`; a checkpoint without the file is
  refused too unless ``allow_unverified_resume=True``.
* ``on_step_begin``: switches QAT on from ``qat.start_step`` (:func:`rolora_plugin.quant.enable_fake_quant_`), in
  the format ``qat.quant`` names: int (default W4A4), or NVFP4 / MXFP4 with ``QATConfig(preset="nvfp4")``; the
  FP4 group sizes are checked against every target's width in ``on_train_begin``.
* ``on_step_end`` every ``monitor.every_n_steps``: :func:`rolora_plugin.lora.monitor.monitor_metrics` (activation
  kurtosis / max-abs summaries, eval loss in full precision and fake-quantized, default W4A4), then asks the
  Trainer to log; ``on_log`` adds them to that log entry (``state.log_history`` and the ``logs`` dict that
  reporters receive).
* ``on_save``: writes ``rolora_rotation.json`` into ``<output_dir>/checkpoint-<step>`` (atomically).
* ``on_train_end``: removes the QAT forwards and the batch-capture hook; optionally merges and exports
  (collective under ZeRO-3: :func:`~rolora_plugin.integrations.deepspeed.export_merged_zero3`).

Undo: the save hook is the one patch that outlives ``train()``, on purpose. The Trainer calls ``on_train_end``
inside ``train()`` (``_finalize_training``), before it returns, and the usual ``trainer.save_model(DIR)`` after
``train()`` must still write the record next to the adapter (the DeepSpeed example and the tests rely on it).
:func:`remove_save_hook` undoes it; a callback with ``ExportConfig(save_rotation_record=False)`` removes a hook
an earlier run left on the model.

Reporters and ordering: the Trainer runs its reporting callbacks (TensorBoard, W&B, ...) before user callbacks,
so a callback passed as ``callbacks=[...]`` adds its metrics to ``state.log_history`` and to the logs seen by
later callbacks only. :func:`add_rolora_callback` puts it first, so every reporter receives the metrics.

Monitor data, in order of preference: ``eval_batches`` given to the callback (or set as an attribute later,
e.g. ``cb.eval_batches = trainer.get_eval_dataloader()``), the Trainer's ``eval_dataloader`` if it exists at the
first measurement, else the first ``monitor.num_batches`` *training* batches (captured from the first forward
calls; a warning says so).

This module imports transformers; ``import rolora_plugin`` does not (``rolora_plugin.RoLoRACallback`` resolves
here lazily). Example::

    from rolora_plugin import RoLoRACallback
    from rolora_plugin.lora.config import RoLoRAConfig, QATConfig
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[RoLoRACallback(RoLoRAConfig(qat=QATConfig(enabled=True, start_step=100)))])

    # NVFP4 QAT (the format Blackwell serves); after training: quantize_model_(merged, QuantConfig.preset("nvfp4"), ...)
    RoLoRACallback(RoLoRAConfig(qat=QATConfig(enabled=True, preset="nvfp4")))
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import types
from pathlib import Path

from torch import nn
from transformers import Trainer, TrainerCallback

from .._peft import base_layer, is_peft_model, unwrap_peft
from ..distributed import is_sharded, is_zero3_partitioned, world_size
from ..errors import RotationError
from ..io.export import RECORD_FILE, _check_out_dir, merge_and_export, read_rotation_record, write_rotation_record
from ..lora.adapters import scale_lora_lr_
from ..lora.config import RoLoRAConfig
from ..lora.monitor import BatchCapture, monitor_metrics
from ..quant import ALL_LINEAR, enable_fake_quant_, fused_expert_modules
from ..quant.qat import _fake_quant_targets as fake_quant_targets
from ..rotate.rotation import ensure_rotated, get_rotation_record
from .deepspeed import check_rank_agreement, export_merged_zero3

__all__ = ["RoLoRACallback", "add_rolora_callback", "install_save_hook", "remove_save_hook", "resumed_checkpoint"]

logger = logging.getLogger(__name__)
_SAVE_HOOK_FLAG = "_rolora_save_hook"


# ---------------------------------------------------------------------------------------------- save hook


def _save_pretrained_with_record(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of the class, then ``rolora_rotation.json`` next to what it wrote."""
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    record = get_rotation_record(unwrap_peft(self))
    if record is not None and kwargs.get("is_main_process", True):
        write_rotation_record(save_directory, record)
    return out


def install_save_hook(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` also write the rotation record (a per-instance bound method)."""
    if not model.__dict__.get(_SAVE_HOOK_FLAG):
        model.save_pretrained = types.MethodType(_save_pretrained_with_record, model)
        model.__dict__[_SAVE_HOOK_FLAG] = True


def remove_save_hook(model: nn.Module) -> None:
    """Undo :func:`install_save_hook` (``model.save_pretrained`` is the class's again); a no-op without a hook."""
    if model.__dict__.pop(_SAVE_HOOK_FLAG, False):
        model.__dict__.pop("save_pretrained", None)


# ---------------------------------------------------------------------------------------------- resume


def resumed_checkpoint(args, state) -> Path | None:
    """The checkpoint folder the running ``Trainer.train`` resumed from; None when not resuming or unknown.

    transformers 5.23 does not hand it to callbacks: ``train(resume_from_checkpoint=...)`` (a path, or True for
    ``get_last_checkpoint(output_dir)``) passes the resolved path to ``_inner_training_loop``, which loads
    ``<checkpoint>/trainer_state.json`` into ``state`` and then calls ``on_train_begin``;
    ``args.resume_from_checkpoint`` is a field for scripts that the Trainer never reads or sets. So the path is
    read from the nearest calling frame that belongs to a ``Trainer`` (a subclass such as Axolotl's too) and has
    a ``resume_from_checkpoint`` local (the argument of ``train`` and ``_inner_training_loop`` since
    transformers 4.21). Outside such a frame, ``<output_dir>/checkpoint-<global_step>`` is taken only if its
    ``trainer_state.json`` holds this very state (same global step and log history).
    """
    if state.global_step == 0:
        return None
    found = _trainer_resume_argument()
    if found is not None:
        return Path(found)
    return _checkpoint_holding(state, Path(args.output_dir))


def _trainer_resume_argument():
    frame = inspect.currentframe()
    try:
        while frame is not None:
            local = frame.f_locals
            if isinstance(local.get("self"), Trainer) and "resume_from_checkpoint" in local:
                value = local["resume_from_checkpoint"]
                return value if isinstance(value, (str, os.PathLike)) else None
            frame = frame.f_back
    finally:
        del frame
    return None


def _checkpoint_holding(state, output_dir: Path) -> Path | None:
    candidate = output_dir / f"checkpoint-{state.global_step}"
    saved = candidate / "trainer_state.json"
    if not saved.is_file():
        return None
    data = json.loads(saved.read_text())
    same = data.get("global_step") == state.global_step and data.get("log_history") == state.log_history
    return candidate if same else None


# ---------------------------------------------------------------------------------------------- the callback


class RoLoRACallback(TrainerCallback):
    """RoLoRA in a ``transformers.Trainer``: rotation, resume check, records, QAT, monitor, merged export.

    Args:
        config: :class:`rolora_plugin.lora.config.RoLoRAConfig` (or its dict); default ``RoLoRAConfig()``.
        eval_batches: batches for the monitor: an iterable of dicts (``input_ids``, optionally ``labels``,
            ``attention_mask``) or of ``input_ids`` tensors, e.g. a DataLoader; the first ``num_batches`` are used.
        allow_unverified_resume: resume from a checkpoint without ``rolora_rotation.json`` (or one this callback
            cannot locate) with a warning instead of a :class:`~rolora_plugin.RotationError`. Only for
            checkpoints known to be trained in this very rotation: an adapter trained in another basis is wrong.
        calibration: ``input_ids`` tensors or dicts for a rotation config that learns rotations
            (``RotationConfig.preset("w4a4")``, ``learn=...``): the rotations are learned on them in ``on_init_end``,
            before the optimizer exists. Dropped once used. A resumed run learns again from the same data and seed
            (deterministic) and the checkpoint's record, learned matrices' checksums included, must match.
    """

    def __init__(self, config: RoLoRAConfig | dict | None = None, eval_batches=None, *, allow_unverified_resume: bool = False,
                 calibration=None):  # fmt: skip
        if isinstance(config, dict):
            config = RoLoRAConfig.from_dict(config)
        self.config = config or RoLoRAConfig()
        self.calibration = calibration
        self.eval_batches = eval_batches
        self.allow_unverified_resume = allow_unverified_resume
        self.record = None
        self._qat = None
        self._pending: dict[str, float] = {}
        self._capture: BatchCapture | None = None
        self._monitor_batches: list[dict] | None = None

    # -- rotation ------------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module):
        """Rotate ``model`` unless it is rotated (:func:`~rolora_plugin.rotate.rotation.ensure_rotated`); install or
        remove the save hook as ``config.export.save_rotation_record`` says; check the export target early."""
        record = ensure_rotated(model, self.config.rotation, calibration=self.calibration)
        self.calibration = None  # used (or not needed): do not keep it alive for the whole run
        if self.config.lora_lr_scale != "none":
            if not is_peft_model(model):
                raise ValueError(
                    f"RoLoRAConfig.lora_lr_scale={self.config.lora_lr_scale!r} scales LoRA layers, but the Trainer's model "
                    "is not a peft model; attach LoRA (get_peft_model) before the Trainer, or set lora_lr_scale='none'"
                )
            scale_lora_lr_(model, self.config.lora_lr_scale)  # before the Trainer builds its optimizer
        if self.config.export.save_rotation_record:
            install_save_hook(model)
        else:
            remove_save_hook(model)
        self.record = record
        self._check_exportable(model)
        return record

    def _check_exportable(self, model: nn.Module) -> None:
        out = self.config.export.merged_output_dir
        if not out:
            return
        _check_out_dir(Path(out), self.config.export.overwrite)  # fail now, not after training
        if is_zero3_partitioned(model) and not is_peft_model(model):
            raise ValueError(
                "RoLoRAConfig.export.merged_output_dir under ZeRO-3 needs a peft model: the callback gathers only the "
                "adapter and merges it into a freshly loaded, re-rotated base. For a full fine-tune, save with "
                "trainer.save_model(DIR) and run rolora_plugin.merge_and_export(DIR, OUT) after training."
            )

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.prepare_model(model)
        if _uses_fsdp(args) and self.config.export.merged_output_dir and not is_peft_model(model):
            raise ValueError(
                "RoLoRAConfig.export.merged_output_dir under FSDP needs a peft model: the callback gathers only the "
                "adapter and merges it into a freshly loaded, re-rotated base. For a full fine-tune, save with "
                "trainer.save_model(DIR) (fsdp_config state_dict_type FULL_STATE_DICT) and run "
                "rolora_plugin.merge_and_export(DIR, OUT) after training."
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.record is None:  # attached after Trainer.__init__
            if self.config.lora_lr_scale != "none" and getattr(args, "deepspeed", None):
                raise ValueError(
                    "RoLoRAConfig.lora_lr_scale edits the LoRA factors, which DeepSpeed has already copied into its "
                    "optimizer when a callback attached after Trainer(...) runs; pass RoLoRACallback in "
                    "Trainer(callbacks=[...]) so it runs in on_init_end, before DeepSpeed starts"
                )
            self.prepare_model(model)
        if world_size() > 1:  # collective: every rank runs the callback
            check_rank_agreement(self.record)
        if state.global_step > 0:
            self._check_resumed(resumed_checkpoint(args, state))
        if self.config.monitor.enabled and self.eval_batches is None and self._monitor_batches is None:
            self._capture = BatchCapture(model, self.config.monitor.num_batches)
        if self.config.qat.enabled and self.config.qat.targets == ALL_LINEAR and fused_expert_modules(model):
            raise ValueError(
                f"QAT (qat.enabled) fake-quantizes nn.Linear layers only; this MoE model's fused experts (e.g. "
                f"{fused_expert_modules(model)[0]}) would train in full precision under a {self.config.qat.quant.label()} "
                "label. Turn QAT off, or set qat.targets to attention leaves "
                "(e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']) for a partial, labelled QAT."
            )
        if self.config.qat.enabled:
            _check_group_widths(model, self.config.qat)

    def _check_resumed(self, checkpoint: Path | None) -> None:
        saved = read_rotation_record(checkpoint) if checkpoint is not None else None
        if saved is None:
            self._unverified_resume(checkpoint)
        elif saved != self.record:
            raise RotationError(
                f"resuming from {checkpoint}, whose rotation (seed {saved.config.seed}, {saved.rotations}) differs from "
                f"the model's (seed {self.record.config.seed}, {self.record.rotations}); the adapter would be applied in "
                "the wrong basis. Use the RotationConfig of the original run."
            )
        else:
            logger.info("resumed from %s: rotation record matches, not rotating again", checkpoint)

    def _unverified_resume(self, checkpoint: Path | None) -> None:
        where = f"{checkpoint}, which has no {RECORD_FILE}" if checkpoint is not None else "a checkpoint that cannot be located"
        if self.allow_unverified_resume:
            logger.warning("resuming from %s: cannot verify the rotation (allow_unverified_resume=True)", where)
            return
        raise RotationError(
            f"resuming from {where}, so its rotation cannot be checked against the model's (seed "
            f"{self.record.config.seed}, {self.record.rotations}); an adapter trained in another basis would be wrong. "
            f"Restore the checkpoint's {RECORD_FILE}, or, if it was trained with this very rotation, pass "
            "RoLoRACallback(..., allow_unverified_resume=True)."
        )

    # -- QAT -------------------------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        qat = self.config.qat
        if qat.enabled and self._qat is None and state.global_step >= qat.start_step:
            quant = qat.quant
            self._qat = enable_fake_quant_(model, quant, qat.targets)
            logger.info("QAT on from step %d: %s on %d linears", state.global_step, quant.label(), len(self._qat.modules))

    # -- monitor ---------------------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        monitor = self.config.monitor
        if not monitor.enabled or state.global_step % monitor.every_n_steps:
            return
        batches = self._batches_for_monitor(eval_dataloader)
        if batches:
            self._pending.update(monitor_metrics(model, batches, monitor))
            control.should_log = True

    def _batches_for_monitor(self, eval_dataloader) -> list:
        if self._monitor_batches is None:
            source = self.eval_batches if self.eval_batches is not None else eval_dataloader
            if source is not None:
                self._monitor_batches = [b for b, _ in zip(source, range(self.config.monitor.num_batches))]
            elif self._capture is not None and self._capture.batches:
                logger.warning("RoLoRA monitor: no eval batches given; measuring on the first training batches")
                self._monitor_batches = self._capture.batches
        return self._monitor_batches or []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending:
            return
        if logs is not None:
            logs.update(self._pending)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step:
            last.update(self._pending)
        else:
            state.log_history.append({**self._pending, "step": state.global_step})
        self._pending = {}

    # -- saving / end ----------------------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.config.export.save_rotation_record and state.is_world_process_zero and checkpoint.is_dir():
            write_rotation_record(checkpoint, self.record)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._qat is not None:
            self._qat.remove()
            self._qat = None
        if self._capture is not None:
            self._capture.remove()
        out = self.config.export.merged_output_dir
        if out:
            self.export_merged(model, out, is_main=state.is_world_process_zero, tokenizer=kwargs.get("processing_class"))

    def export_merged(self, model: nn.Module, out_dir, *, is_main: bool = True, tokenizer=None) -> None:
        """:func:`~rolora_plugin.io.export.merge_and_export` the trained model to ``out_dir`` (main process writes).

        Collective under DeepSpeed ZeRO-3 and FSDP2, where each rank holds only a slice of every weight
        (:func:`~rolora_plugin.integrations.deepspeed.export_merged_zero3`: the adapter is gathered, rank 0 merges
        it into the base reloaded and re-rotated from the record). Otherwise the main process merges a copy of the
        live model.
        """
        overwrite = self.config.export.overwrite
        if is_sharded(model):
            export_merged_zero3(model, self.record, out_dir, is_main=is_main, tokenizer=tokenizer, overwrite=overwrite)
        elif is_main:
            merge_and_export(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)


def _uses_fsdp(args) -> bool:
    """The Trainer will shard the model with FSDP (1 or 2) in ``train()``."""
    return bool(getattr(args, "fsdp", None)) or bool((getattr(args, "fsdp_config", None) or {}).get("fsdp_version"))


def _check_group_widths(model: nn.Module, qat) -> None:
    """Refuse, before the first step, a QAT group size (NVFP4: 16, MXFP4: 32, or ``w_group_size``) that does not
    divide the input width of a target linear (the fake-quant forward would fail at its first call)."""
    quant = qat.quant
    groups = {g for g in (quant.w_group_size, quant.a_group_size) if g}
    if not groups:
        return
    for name, module in fake_quant_targets(model, qat.targets).items():
        width = base_layer(module).in_features
        bad = sorted(g for g in groups if width % g)
        if bad:
            raise ValueError(
                f"QAT in {quant.label()} quantizes in groups of {bad[0]} input columns, which does not divide the "
                f"input width {width} of {name}; choose qat.targets without it (e.g. attention leaves), or "
                "a format whose groups fit (the int presets with per-channel weights, e.g. preset: w4a4-int)"
            )


def add_rolora_callback(trainer, callback: RoLoRACallback | None = None) -> RoLoRACallback:
    """Attach ``callback`` (default ``RoLoRACallback()``) to an existing Trainer as its *first* callback.

    First, so the Trainer's reporters (TensorBoard, W&B, ...), which it runs before user callbacks, receive the
    monitor metrics. Call it before ``trainer.train()``: it rotates the model right away, which must happen before
    the optimizer is created.
    """
    if trainer.optimizer is not None:
        raise RuntimeError("add_rolora_callback: the Trainer already has an optimizer; attach RoLoRA before it is created")
    callback = callback if callback is not None else RoLoRACallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    callback.on_init_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
    return callback
