"""DeepSpeed / multi-process glue: every rank applied the same rotation; merged export under ZeRO-3.

The rotation itself is DeepSpeed-aware in the core: :func:`rolora_plugin.distributed.gather_params` gathers
ZeRO-3 partitioned weights one layer at a time inside ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``
and is a no-op otherwise (:func:`~rolora_plugin.distributed.is_zero3_partitioned` and
:func:`~rolora_plugin.distributed.world_size` are re-exported here). Every rank must nevertheless run
:func:`rolora_plugin.rotate_model_` with the same config: under ZeRO-2 (and plain DDP) parameters are ordinary
tensors, so ``GatheredParameters`` does nothing and an edit made on rank 0 only would leave the ranks different
after the engine's initial broadcast (DeepSpeed 0.19.8). The rotation is deterministic (seeded
``torch.Generator``, CPU maths), so rotating on every rank gives bit-identical results;
:func:`check_rank_agreement` verifies that loudly.

Merged export under ZeRO-3 (:func:`export_merged_zero3`): each rank holds a slice of every weight, so all ranks
gather the (small) trainable adapter, and the main process merges it into the base model reloaded unpartitioned
(:func:`zero3_init_disabled`) and re-rotated from the record.

Nothing here imports ``deepspeed`` at module level (only ``torch.distributed``); ``transformers`` is imported
inside :func:`zero3_init_disabled` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..distributed import full_tensor, gather_params, is_zero3_partitioned, world_size
from ..io.export import merge_and_export, write_rotation_record
from ..io.publish import check_writable_parent

__all__ = [
    "RankDisagreementError",
    "check_rank_agreement",
    "export_adapter_state",
    "export_merged_zero3",
    "gather_trainable",
    "is_zero3_partitioned",
    "parameter_digests",
    "record_digest",
    "world_size",
    "zero3_init_disabled",
]

logger = logging.getLogger(__name__)


class RankDisagreementError(RuntimeError):
    """Processes of one distributed job hold different rotations or different weights."""


def record_digest(record) -> str:
    """sha256 (16 hex) of a :class:`~rolora_plugin.rotate.rotation.RotationRecord` (or its dict): seed, config, dims and
    the checksums of every rotation matrix."""
    data = record.to_dict() if hasattr(record, "to_dict") else record
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def parameter_digests(model: nn.Module) -> dict[str, str]:
    """``{name: sha256 of the full parameter's bytes}``; ZeRO-3 partitions and FSDP2 DTensors are gathered
    (read-only) one at a time.

    Collective under ZeRO-3 / FSDP2: every rank must call it.
    """
    out = {}
    for name, p in model.named_parameters():
        with gather_params([p], modifier_rank=None):
            full = full_tensor(p.detach())
            out[name] = hashlib.sha256(full.cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()[:16]
    return out


def check_rank_agreement(record, model: nn.Module | None = None) -> None:
    """Raise :class:`RankDisagreementError` unless every rank holds the same rotation (and, with ``model``, the
    same weights, bit for bit). A no-op outside ``torch.distributed`` or with one process.

    Collective: call it on every rank (as :func:`rolora_plugin.rotate_model_` does after rotating). Weights are
    compared only when ``model`` is given: before the engine's initial broadcast, freshly initialised LoRA
    matrices may legitimately differ between ranks, so compare weights after training or after that broadcast.
    """
    if world_size() == 1:
        return
    mine = {"record": record_digest(record) if record is not None else None}
    if model is not None:
        mine["params"] = parameter_digests(model)
    everyone = [None] * world_size()
    torch.distributed.all_gather_object(everyone, mine)
    _raise_on_disagreement(everyone)
    logger.info("rotation agrees on all %d ranks (record %s)", len(everyone), mine["record"])


def _raise_on_disagreement(everyone: list[dict]) -> None:
    ref = everyone[0]
    for rank, other in enumerate(everyone[1:], start=1):
        if other["record"] != ref["record"]:
            raise RankDisagreementError(
                f"rank {rank} applied a different rotation than rank 0 (record digest {other['record']} vs "
                f"{ref['record']}). Give every rank the same RotationConfig (same seed) and rotate on every rank."
            )
        differing = sorted(k for k in ref.get("params", {}) if other["params"].get(k) != ref["params"][k])
        if differing:
            raise RankDisagreementError(
                f"rank {rank} holds different weights than rank 0 in {len(differing)} parameter(s), e.g. "
                f"{differing[:5]}. Rotate on every rank (under ZeRO-2/DDP an edit on rank 0 only is not broadcast) "
                "and load the same checkpoint everywhere."
            )


@contextlib.contextmanager
def zero3_init_disabled():
    """Load models unpartitioned inside the block (e.g. rank 0 loading a base model to export a merge).

    Under a ZeRO-3 launch transformers keeps a global DeepSpeed config that makes ``from_pretrained`` build the
    model inside ``deepspeed.zero.Init`` (partitioned across ranks). This hides that config for the block and
    restores it afterwards. A no-op when transformers has no such config.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    active = ref() if ref is not None else None
    if active is not None:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


# ---------------------------------------------------------------------------------------------- ZeRO-3 export


def gather_trainable(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """``{name: full CPU tensor}`` of the trainable (adapter) parameters (``{}`` where ``keep`` is False).

    Collective for ZeRO-3 partitions and FSDP2 DTensors (every rank must call it; each parameter is gathered
    read-only, one at a time); plain tensors are copied.
    """
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with gather_params([p], modifier_rank=None):
                full = full_tensor(p.detach())
                if keep:
                    out[name] = full.cpu().clone()
    return out


def export_adapter_state(model: nn.Module, adapter: dict, record, out_dir: Path, tokenizer=None, overwrite: bool = False) -> None:
    """Merge-export ``adapter`` (from :func:`gather_trainable` of the peft ``model``) to ``out_dir``.

    The adapter is written as a peft adapter folder with its rotation ``record`` to a scratch folder next to
    ``out_dir`` (deleted afterwards), then :func:`~rolora_plugin.io.export.merge_and_export` loads the base model
    named in its ``adapter_config.json`` unpartitioned, re-rotates it from the record (checksums verified),
    merges and publishes ``out_dir`` atomically. Runs on one process (the main one).
    """
    out_dir = Path(out_dir)
    check_writable_parent(out_dir)
    dtype = next(model.parameters()).dtype  # the base weights' dtype (ZeRO-3 params keep theirs)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.adapter-") as staging:
        type(model).save_pretrained(model, staging, state_dict=adapter)  # the class's: no record hook
        write_rotation_record(staging, record)
        with zero3_init_disabled():  # load the base unpartitioned, on this process only
            merge_and_export(staging, out_dir, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype)


def export_merged_zero3(model: nn.Module, record, out_dir, *, is_main: bool, tokenizer=None, overwrite: bool = False) -> None:
    """Collective merged export of a sharded peft ``model`` (DeepSpeed ZeRO-3 partitions or FSDP2 DTensors: no
    rank holds the full weights): every rank gathers the adapter, the main process (``is_main``) exports it with
    :func:`export_adapter_state`."""
    adapter = gather_trainable(model, keep=is_main)
    if is_main:
        export_adapter_state(model, adapter, record, Path(out_dir), tokenizer, overwrite)
