"""``RoLoRACallback``: RoLoRA for ``transformers.Trainer`` (+ peft) without changing the training script.

What it does, and when (facts verified with transformers 5.23, see DESIGN.md):

* ``on_init_end`` (end of ``Trainer.__init__``, before the optimizer exists; the optimizer, DeepSpeed init and
  checkpoint resume all happen *before* ``on_train_begin``): rotates the model with
  :func:`rolora_plugin.rotate_model_` unless ``model.config.rolora`` says it is rotated already — a bare model or
  a ``PeftModel`` (LoRA A/B are rotated with it). An already rotated model only gets its online modules
  re-installed if they are missing. Never rotates twice. It also wraps the model's ``save_pretrained`` (an
  instance attribute; ``remove_save_hook`` undoes it) so every save — ``trainer.save_model()``, checkpoints,
  adapters — writes ``rolora_rotation.json`` next to the weights.
* ``on_train_begin``: when resuming (``state.global_step > 0``) the checkpoint's ``rolora_rotation.json`` must
  match the model's rotation, or training stops with :class:`rolora_plugin.RotationError`.
* ``on_step_begin``: switches QAT on from ``qat.start_step`` (:func:`rolora_plugin.lora.enable_fake_quant_`).
* ``on_step_end`` every ``monitor.every_n_steps``: activation kurtosis / max-abs summaries and the eval loss in
  full precision and fake-quantized (default W4A4), then asks the Trainer to log; ``on_log`` adds them to that
  log entry (``state.log_history`` and the ``logs`` dict that reporters receive).
* ``on_save``: writes ``rolora_rotation.json`` into ``<output_dir>/checkpoint-<step>`` (atomically).
* ``on_train_end``: removes the QAT forwards and the batch-capture hook; optionally merges and exports.

Reporters and ordering: the Trainer runs its reporting callbacks (TensorBoard, W&B, ...) before user callbacks,
so a callback passed as ``callbacks=[...]`` adds its metrics to ``state.log_history`` and to the logs seen by
later callbacks only. :func:`add_rolora_callback` puts it first, so every reporter receives the metrics.

Monitor data, in order of preference: ``eval_batches`` given to the callback (or set as an attribute later,
e.g. ``cb.eval_batches = trainer.get_eval_dataloader()``), the Trainer's ``eval_dataloader`` if it exists at the
first measurement, else the first ``monitor.num_batches`` *training* batches (captured from the first forward
calls; a warning says so).

``import rolora_plugin.callbacks`` does not import transformers: ``RoLoRACallback`` (the
``transformers.TrainerCallback`` subclass, defined in :mod:`rolora_plugin.integrations.hf_trainer`) is imported
on first access of ``rolora_plugin.callbacks.RoLoRACallback``.

Example::

    from rolora_plugin.callbacks import RoLoRACallback
    from rolora_plugin.training_config import RoLoRAConfig, QATConfig
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[RoLoRACallback(RoLoRAConfig(qat=QATConfig(enabled=True, start_step=100)))])
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from pathlib import Path

import torch
from torch import nn

from .config import RotationConfig
from .export import merge_and_export, read_rotation_record, write_rotation_record
from .lora import enable_fake_quant_, fake_quantized
from .rotation import missing_online_rotations
from ._peft import unwrap_peft as _unwrap_peft
from .rotation import RotationError, get_rotation_record, install_online_rotations, rotate_model_
from .training_config import RoLoRAConfig

__all__ = ["RoLoRACallback", "RoLoRACallbackMixin", "add_rolora_callback", "install_save_hook", "remove_save_hook", "quant_config"]

logger = logging.getLogger(__name__)
_SAVE_HOOK_FLAG = "_rolora_save_hook"


def quant_config(w_bits: int, a_bits: int, w_group_size=None, w_sym=True, a_sym=True, a_clip_ratio=1.0):
    """A :class:`rolora_plugin.quant.QuantConfig` (RTN, no KV quant, nothing skipped) for fake-quant forwards."""
    from .quant import QuantConfig

    return QuantConfig(
        w_bits=w_bits, a_bits=a_bits, w_group_size=w_group_size, w_sym=w_sym, a_sym=a_sym, a_clip_ratio=a_clip_ratio, skip=()
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- save hook


def _save_pretrained_with_record(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of the class, then ``rolora_rotation.json`` next to what it wrote."""
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    record = get_rotation_record(_unwrap_peft(self))
    if record is not None and kwargs.get("is_main_process", True):
        write_rotation_record(save_directory, record)
    return out


def install_save_hook(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` also write the rotation record (a per-instance bound method)."""
    if not model.__dict__.get(_SAVE_HOOK_FLAG):
        model.save_pretrained = types.MethodType(_save_pretrained_with_record, model)
        model.__dict__[_SAVE_HOOK_FLAG] = True


def remove_save_hook(model: nn.Module) -> None:
    """Undo :func:`install_save_hook`."""
    if model.__dict__.pop(_SAVE_HOOK_FLAG, False):
        model.__dict__.pop("save_pretrained", None)


# ---------------------------------------------------------------------------------------------- monitor


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}


def _mean_loss(model: nn.Module, batches: list[dict]) -> float:
    losses = []
    for batch in batches:
        if "labels" not in batch:
            batch = {**batch, "labels": batch["input_ids"]}
        losses.append(model(**batch, use_cache=False).loss.item())
    return sum(losses) / len(losses)


def _stat_kinds(model: nn.Module) -> tuple[list[str], tuple[str, ...]]:
    """Leaf names measured (one per distinct linear input) and the name fragments excluded from the stats."""
    from .architectures import get_architecture

    spec = get_architecture(_unwrap_peft(model))
    kinds = [p.rsplit(".", 1)[-1] for p in (spec.attention_inputs()[0], spec.o_proj, spec.mlp_inputs()[0], spec.down_proj)]
    skip = tuple("." + leaf for leaf in spec.linear_names() if leaf not in kinds)
    return kinds, ("lm_head",) + skip


def activation_metrics(model: nn.Module, batches: list[dict], layers=()) -> dict[str, float]:
    """Kurtosis / max-abs of the linear inputs, summarised per kind (mean/max over layers) plus chosen layers."""
    from .kurtosis import activation_stats, layer_index

    kinds, exclude = _stat_kinds(model)
    with fake_quantized(model, None):  # full-precision forwards even while QAT is on
        stats = activation_stats(model, batches, exclude=exclude, progress=False)
    per_kind: dict[str, list] = {k: [] for k in kinds}
    out = {}
    for name, s in stats.items():
        leaf, idx = name.rsplit(".", 1)[-1], layer_index(name)
        if leaf not in per_kind or math.isnan(s["kurtosis"]):
            continue
        per_kind[leaf].append((s["kurtosis"], s["max_abs"]))
        if idx in layers:
            out[f"rolora/kurtosis/layer{idx}/{leaf}_in"] = s["kurtosis"]
            out[f"rolora/max_abs/layer{idx}/{leaf}_in"] = s["max_abs"]
    for leaf, vals in per_kind.items():
        if vals:
            out[f"rolora/kurtosis/{leaf}_in/mean"] = sum(k for k, _ in vals) / len(vals)
            out[f"rolora/kurtosis/{leaf}_in/max"] = max(k for k, _ in vals)
            out[f"rolora/max_abs/{leaf}_in/max"] = max(m for _, m in vals)
    return out


def fake_quant_eval_metrics(model: nn.Module, batches: list[dict], monitor) -> dict[str, float]:
    """Eval loss in full precision and fake-quantized (what merge + RTN ``quantize_model_`` would give)."""
    qcfg = quant_config(monitor.w_bits, monitor.a_bits, monitor.w_group_size)
    with fake_quantized(model, None):
        fp = _mean_loss(model, batches)
    with fake_quantized(model, qcfg):
        q = _mean_loss(model, batches)
    return {"rolora/eval_loss_fp": fp, f"rolora/eval_loss_w{monitor.w_bits}a{monitor.a_bits}": q}


class _BatchCapture:
    """Forward-pre-hook (with kwargs) that keeps copies of the first ``n`` batches the model is called with."""

    def __init__(self, model: nn.Module, n: int):
        self.batches: list[dict] = []
        self.n = n
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if len(self.batches) < self.n and "input_ids" in kwargs:
            keep = ("input_ids", "attention_mask", "labels")
            self.batches.append({k: kwargs[k].detach().clone() for k in keep if isinstance(kwargs.get(k), torch.Tensor)})
        if len(self.batches) >= self.n:
            self.remove()

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


# ---------------------------------------------------------------------------------------------- the callback


class RoLoRACallbackMixin:
    """The host-independent logic of :class:`RoLoRACallback` (method names are TrainerCallback events).

    Args:
        config: :class:`rolora_plugin.training_config.RoLoRAConfig` (or its dict); default ``RoLoRAConfig()``.
        eval_batches: batches for the monitor: an iterable of dicts (``input_ids``, optionally ``labels``,
            ``attention_mask``) or of ``input_ids`` tensors, e.g. a DataLoader; the first ``num_batches`` are used.
    """

    def __init__(self, config: RoLoRAConfig | dict | None = None, eval_batches=None):
        if isinstance(config, dict):
            config = RoLoRAConfig.from_dict(config)
        self.config = config or RoLoRAConfig()
        self.eval_batches = eval_batches
        self.record = None
        self._qat = None
        self._pending: dict[str, float] = {}
        self._capture: _BatchCapture | None = None
        self._monitor_batches: list[dict] | None = None

    # -- rotation ------------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module):
        """Rotate ``model`` unless it is rotated; re-install missing online modules; install the save hook."""
        inner = _unwrap_peft(model)
        record = get_rotation_record(inner)
        wanted = self.config.rotation
        if record is None:
            record = rotate_model_(model, wanted or RotationConfig())
        elif wanted is not None and record.config != wanted:
            raise RotationError(
                f"the model is already rotated with {record.config}, but RoLoRAConfig.rotation asks for {wanted}; "
                "load the original weights, or set RoLoRAConfig(rotation=None) to accept the existing rotation"
            )
        elif missing_online_rotations(model):
            logger.info("model is rotated but its online rotations are missing: re-installing them from the record")
            install_online_rotations(inner, record)
        else:
            logger.info("model already rotated (%s); not rotating again", record.config)
        if self.config.export.save_rotation_record:
            install_save_hook(model)
        self.record = record
        self._check_exportable(model)
        return record

    def _check_exportable(self, model: nn.Module) -> None:
        from .export import _check_out_dir
        from .integrations.deepspeed import is_zero3_partitioned

        out = self.config.export.merged_output_dir
        if not out:
            return
        _check_out_dir(Path(out), self.config.export.overwrite)  # fail now, not after training
        if is_zero3_partitioned(model) and not hasattr(model, "peft_config"):
            raise ValueError(
                "RoLoRAConfig.export.merged_output_dir under ZeRO-3 needs a peft model: the callback gathers only the "
                "adapter and merges it into a freshly loaded, re-rotated base. For a full fine-tune, save with "
                "trainer.save_model(DIR) and run rolora_plugin.merge_and_export(DIR, OUT) after training."
            )

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.prepare_model(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .integrations.deepspeed import check_rank_agreement, world_size

        if self.record is None:  # attached after Trainer.__init__
            self.prepare_model(model)
        if world_size() > 1:  # collective: every rank runs the callback
            check_rank_agreement(self.record)
        if state.global_step > 0:
            self._check_resumed(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        if self.config.monitor.enabled and self.eval_batches is None and self._monitor_batches is None:
            self._capture = _BatchCapture(model, self.config.monitor.num_batches)

    def _check_resumed(self, checkpoint: Path) -> None:
        saved = read_rotation_record(checkpoint)
        if saved is None:
            logger.warning("resuming from %s, which has no rolora_rotation.json: cannot verify the rotation", checkpoint)
        elif saved != self.record:
            raise RotationError(
                f"resuming from {checkpoint}, whose rotation (seed {saved.config.seed}, {saved.rotations}) differs from "
                f"the model's (seed {self.record.config.seed}, {self.record.rotations}); the adapter would be applied in "
                "the wrong basis. Use the RotationConfig of the original run."
            )
        else:
            logger.info("resumed from %s: rotation record matches, not rotating again", checkpoint)

    # -- QAT -------------------------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        qat = self.config.qat
        if qat.enabled and self._qat is None and state.global_step >= qat.start_step:
            qcfg = quant_config(qat.w_bits, qat.a_bits, qat.w_group_size, qat.w_sym, qat.a_sym, qat.a_clip_ratio)
            self._qat = enable_fake_quant_(model, qcfg, qat.targets)
            logger.info("QAT on from step %d: W%dA%d on %d linears", state.global_step, qat.w_bits, qat.a_bits, len(self._qat.modules))

    @property
    def qat_active(self) -> bool:
        return self._qat is not None

    # -- monitor ---------------------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        monitor = self.config.monitor
        if not monitor.enabled or state.global_step % monitor.every_n_steps:
            return
        batches = self._batches_for_monitor(model, eval_dataloader)
        if not batches:
            return
        metrics = {}
        with _eval_no_grad(model):
            if monitor.activation_stats:
                metrics.update(activation_metrics(model, batches, monitor.layers))
            if monitor.fake_quant_eval:
                metrics.update(fake_quant_eval_metrics(model, batches, monitor))
        self._pending.update(metrics)
        control.should_log = True

    def _batches_for_monitor(self, model: nn.Module, eval_dataloader) -> list[dict]:
        if self._monitor_batches is None:
            source = self.eval_batches if self.eval_batches is not None else eval_dataloader
            if source is not None:
                n = self.config.monitor.num_batches
                self._monitor_batches = [b for b, _ in zip(source, range(n))]
            elif self._capture is not None and self._capture.batches:
                logger.warning("RoLoRA monitor: no eval batches given; measuring on the first training batches")
                self._monitor_batches = self._capture.batches
            else:
                return []
        device = next(model.parameters()).device
        return [_to_device(b, device) for b in self._monitor_batches]

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
        """:func:`~rolora_plugin.export.merge_and_export` the trained model to ``out_dir`` (main process writes).

        Collective under DeepSpeed ZeRO-3, where each rank holds only a slice of every weight: all ranks gather
        the adapter (small), the main process writes it to a staging directory and merges it into the base model
        named in its ``adapter_config.json``, loaded unpartitioned and re-rotated from the record (whose
        checksums are verified). Otherwise the main process merges a copy of the live model.
        """
        from .integrations.deepspeed import is_zero3_partitioned

        overwrite = self.config.export.overwrite
        if not is_zero3_partitioned(model):
            if is_main:
                merge_and_export(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
            return
        adapter = _gather_trainable(model, keep=is_main)
        if is_main:
            _export_adapter_state(model, adapter, self.record, Path(out_dir), tokenizer, overwrite)


def _gather_trainable(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """``{name: full CPU tensor}`` of the trainable (adapter) parameters; collective for ZeRO-3 partitions."""
    from .distributed import gather_params

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with gather_params([p], modifier_rank=None):
                if keep:
                    out[name] = p.detach().cpu().clone()
    return out


def _export_adapter_state(model, adapter: dict, record, out_dir: Path, tokenizer, overwrite: bool) -> None:
    """Write ``adapter`` as a peft adapter directory (+ record) next to ``out_dir``, merge-export it, clean up."""
    import shutil
    import uuid

    from .integrations.deepspeed import zero3_init_disabled

    staging = out_dir.parent / f".{out_dir.name}.adapter-{uuid.uuid4().hex[:8]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype  # the base weights' dtype (ZeRO-3 params keep theirs)
    try:
        type(model).save_pretrained(model, str(staging), state_dict=adapter)
        write_rotation_record(staging, record)
        with zero3_init_disabled():  # load the base unpartitioned, on this process only
            merge_and_export(str(staging), out_dir, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def __getattr__(name: str):
    # the TrainerCallback subclass lives with the host glue; importing it pulls in transformers
    if name in ("RoLoRACallback", "add_rolora_callback"):
        from .integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
