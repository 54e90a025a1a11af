"""``RoLoRAPlugin``: RoLoRA in Axolotl from one YAML section. Imported by Axolotl only (it imports axolotl).

Axolotl >= 0.21 loads it by itself: ``rolora-plugin`` registers the ``axolotl.plugins`` entry point
``rolora = "rolora.plugin:RoLoRAPlugin"``, so ``pip install rolora-plugin`` and a ``rolora:`` section are enough
(without a ``rolora:`` section the plugin stays inactive). Axolotl 0.19 (and 0.21 too) loads it with
``plugins: [rolora.RoLoRAPlugin]``. Axolotl's loader splits the name at its last dot into module
and class (``module_name, class_name = plugin_name.rsplit(".", 1)`` in ``axolotl.integrations.base.load_plugin``),
so a bare ``rolora`` cannot load in any released Axolotl (there is nothing to split: ``ValueError: not enough
values to unpack``); the tiny top-level ``rolora`` package exists so that ``rolora.RoLoRAPlugin`` works. With
both (0.21: the entry point, registered as ``rolora.plugin.RoLoRAPlugin``, plus a ``plugins:`` line naming
``rolora.RoLoRAPlugin``) Axolotl creates two instances; the first one created is the active one, the second
logs that it is a duplicate and does nothing (else the model would get two callbacks: QAT twice, two exports).

Hook order (Axolotl 0.19 and 0.21) and what each hook does here:

* ``register(cfg)`` (raw config, before validation): with a ``rolora:`` section, sets Axolotl's fused LoRA
  kernels (``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel``) to false, logging why: they compute the
  MLP / attention without calling the module forwards, so RoLoRA's online Hadamard before ``down_proj`` (R4) and
  on q/k (R3) would be skipped. Axolotl would otherwise switch them on when unset.
* ``post_model_build(cfg, model)``: :func:`~rolora_plugin.rotate.rotation.ensure_rotated` on the bare model (before
  LoRA; under ZeRO-3 the weights are gathered one layer at a time): rotates it unless it is rotated already
  (then ``rolora.rotation`` must match its record), and checks that every rank applied the same rotation.
* ``pre_lora_load`` / ``post_lora_load``: maps ``lora_target_modules`` onto the family's rotated linears (e.g.
  ``q_proj`` → Phi-3's fused ``qkv_proj``), restores the user's value afterwards, and checks that the online
  rotations survived peft's wrapping.
* ``add_callbacks_pre_trainer``: adds :class:`~rolora_plugin.integrations.hf_trainer.RoLoRACallback` (monitor, QAT —
  int W4A4 by default, NVFP4 / MXFP4 with ``qat: {enabled: true, preset: nvfp4}`` — and ``rolora_rotation.json``
  next to every checkpoint); the model is already rotated, so it does not rotate again.
* ``post_train`` (called twice by Axolotl: after ``trainer.train()`` and after the final save) and
  ``post_train_unload``: once the final model is saved in ``output_dir``, rank 0 exports the merged model with
  its rotation record to ``<output_dir>/rolora-merged`` — exactly once (idempotent). The export reads the saved
  adapter from disk (under ZeRO-3 the live weights are partitioned), re-rotates the base from the record and
  verifies it before merging.
* ``post_lora_merge(cfg, adapter_path, output_path)`` (Axolotl >= 0.21; called by ``axolotl merge-lora``
  after it saved its merge): Axolotl's default merge (``merge_method: memory_efficient``) adds the adapter to
  the *unrotated* base weights read shard by shard from ``base_model``, which is wrong for an adapter trained in
  the rotated basis, and neither merge method writes the rotation record or keeps the online rotations. So the
  plugin replaces ``output_path`` with :func:`~rolora_plugin.io.export.merge_and_export` of the adapter (base
  re-rotated from the adapter's record, checksums verified; tokenizer kept) — load it with ``load_rotated``.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from pathlib import Path

from axolotl.integrations.base import BasePlugin

from ..._peft import lora_layer_names
from ...errors import RotationError
from ...io.export import merge_and_export, read_rotation_record, write_rotation_record
from ...lora.adapters import map_target_modules
from ...rotate.rotation import check_online_rotations, ensure_rotated, get_rotation_record
from ..deepspeed import check_rank_agreement, zero3_init_disabled
from .args import MERGED_SUBDIR, RoLoRAOptions

__all__ = ["RoLoRAPlugin", "FUSED_LORA_KERNELS"]

# under "axolotl.": Axolotl shows INFO only for its own logger tree (other loggers: WARNING and up)
LOG = logging.getLogger("axolotl.integrations.rolora")
FUSED_LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
_SAVED_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
_UNSET = object()


class RoLoRAPlugin(BasePlugin):
    """Axolotl plugin for RoLoRA; configured by the ``rolora:`` section (see :mod:`.args`)."""

    # weak reference to the live instance that does the work: a second registration of the same plugin while it is
    # alive stays inactive; once it is gone (a later run in the same process, a test), the next instance takes over
    _primary = None

    def __init__(self):
        super().__init__()
        self._claim()
        self.record = None
        self._dtype = None
        self._started = None
        self._exported = False
        self._user_targets = _UNSET

    def get_input_args(self) -> str | None:
        # a second registration must not add the `rolora:` schema again (pydantic: "duplicate base class")
        return None if self._duplicate() else "rolora_plugin.integrations.axolotl.args.RoLoRAArgs"

    # -- config --------------------------------------------------------------------------------------------------
    def _claim(self) -> "RoLoRAPlugin":
        """The live primary instance, this one if there is none (a weak reference: never kept alive by the class)."""
        primary = RoLoRAPlugin._primary() if RoLoRAPlugin._primary is not None else None
        if primary is None:
            RoLoRAPlugin._primary, primary = weakref.ref(self), self
        return primary

    def _duplicate(self) -> bool:
        return self._claim() is not self

    def _options(self, cfg) -> RoLoRAOptions | None:
        return None if self._duplicate() else _options(cfg)

    def register(self, cfg):
        if self._duplicate():
            LOG.info("RoLoRAPlugin registered a second time (the axolotl.plugins entry point and the `plugins:` list): "
                     "this copy stays inactive, the first one does the work")
            return
        if "rolora" not in cfg:
            LOG.info("RoLoRAPlugin loaded but the config has no `rolora:` section: RoLoRA stays off")
            return
        if cfg["rolora"] is None:  # an empty `rolora:` section means "on, with defaults"
            cfg["rolora"] = {}
        _disable_fused_lora_kernels(cfg)

    def pre_model_load(self, cfg):
        if self._options(cfg) is None:
            return
        _disable_fused_lora_kernels(cfg)  # again after validation, in case something switched them back on
        self._started = time.time()

    # -- model ---------------------------------------------------------------------------------------------------
    def post_model_build(self, cfg, model):
        options = self._options(cfg)
        if options is None:
            return
        rotated = get_rotation_record(model) is not None
        try:
            record = ensure_rotated(model, options.rotation)
        except RotationError as e:
            if not rotated:
                raise
            raise RotationError(f"base_model: {e} (in the Axolotl config: set rolora.rotation to that rotation)") from None
        check_rank_agreement(record)
        self.record, self._dtype = record, model.dtype

    def pre_lora_load(self, cfg, model):
        targets = cfg.get("lora_target_modules")
        if self._options(cfg) is None or not isinstance(targets, (list, tuple)):
            return
        mapped = map_target_modules(model, list(targets))
        if sorted(mapped) != sorted(targets):
            LOG.info("rolora: lora_target_modules %s mapped to %s for this model family", list(targets), mapped)
            self._user_targets, cfg["lora_target_modules"] = targets, mapped

    def post_lora_load(self, cfg, model):
        if self._options(cfg) is None:
            return
        if self._user_targets is not _UNSET:  # undo the mapping: the config is the user's again
            cfg["lora_target_modules"], self._user_targets = self._user_targets, _UNSET
        check_online_rotations(model)
        LOG.info("rolora: LoRA on %d rotated linears; online rotations in place", len(lora_layer_names(model)))

    def add_callbacks_pre_trainer(self, cfg, model):
        options = self._options(cfg)
        if options is None:
            return []
        from ..hf_trainer import RoLoRACallback  # imports transformers: only once Axolotl builds the trainer

        qat = options.qat
        if qat.enabled:
            LOG.info("rolora: QAT in %s from step %d on %s%s", qat.quant.label(), qat.start_step, qat.targets,
                     f" (preset {qat.preset}: quantize the merged export with that preset)" if qat.preset else "")
        return [RoLoRACallback(options.to_rolora_config())]

    # -- after training ------------------------------------------------------------------------------------------
    def post_train(self, cfg, model):
        self._export_once(cfg)

    def post_train_unload(self, cfg):
        self._export_once(cfg)

    def post_lora_merge(self, cfg, adapter_path, output_path):
        """``axolotl merge-lora`` (Axolotl >= 0.21): replace Axolotl's merge with the merge in the rotated basis."""
        options = self._options(cfg)
        if options is None or int(os.environ.get("RANK", "0")) != 0:
            return
        adapter = Path(adapter_path)
        record = read_rotation_record(adapter)
        if record is None:
            raise RotationError(
                f"axolotl merge-lora: {adapter} has no rolora_rotation.json, so the rotation its adapter was trained in "
                "is unknown and Axolotl's merge (into the unrotated base) cannot be corrected. Point lora_model_dir at "
                "the output_dir of the RoLoRA training run."
            )
        with zero3_init_disabled():
            # tokenizer: the adapter folder's (Axolotl saves it with the adapter), else the base model's
            merge_and_export(str(adapter), str(output_path), base_model=cfg.base_model, overwrite=True, dtype=self._dtype)
        LOG.info("rolora: replaced Axolotl's LoRA merge in %s by the merge in the rotated basis (rotation record "
                 "written; load it with rolora_plugin.io.export.load_rotated)", output_path)

    def _export_once(self, cfg) -> None:
        """Export when the final model has been saved in this run; a no-op before that and after the first export."""
        options = self._options(cfg)
        if options is None or self._exported or int(os.environ.get("RANK", "0")) != 0:
            return
        out = Path(cfg.output_dir)
        if not _saved_since(out, self._started):
            LOG.debug("rolora: %s holds no model saved by this run yet; exporting later", out)
            return
        if options.export.save_rotation_record and read_rotation_record(out) is None and self.record is not None:
            write_rotation_record(out, self.record)
        if options.export.merge:
            target = options.export.merged_output_dir or str(out / MERGED_SUBDIR)
            with zero3_init_disabled():
                merge_and_export(str(out), target, base_model=cfg.base_model, overwrite=options.export.overwrite, dtype=self._dtype)
            LOG.info("rolora: merged model with its rotation record exported to %s", target)
        self._exported = True


def _options(cfg) -> RoLoRAOptions | None:
    section = cfg.get("rolora") if cfg is not None else None
    if section is None:
        return None
    return section if isinstance(section, RoLoRAOptions) else RoLoRAOptions.model_validate(dict(section))


def _disable_fused_lora_kernels(cfg) -> None:
    switched = [k for k in FUSED_LORA_KERNELS if cfg.get(k)]
    if switched:
        LOG.warning("rolora: overriding %s: true -> false (incompatible with RoLoRA, see below)", ", ".join(switched))
    for key in FUSED_LORA_KERNELS:
        cfg[key] = False
    LOG.info(
        "rolora: %s set to false: Axolotl's fused LoRA kernels compute the MLP and attention without calling the "
        "module forwards, which would skip RoLoRA's online Hadamard rotations (R4 before down_proj, R3 on q/k)",
        ", ".join(FUSED_LORA_KERNELS),
    )


def _saved_since(directory: Path, started: float | None) -> bool:
    stamps = [(directory / f).stat().st_mtime for f in _SAVED_WEIGHTS if (directory / f).is_file()]
    return bool(stamps) and (started is None or max(stamps) >= started)
