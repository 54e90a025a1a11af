"""The one place that knows about distributed training state: ZeRO-3 / FSDP2 sharding, gathering, world size.

Core code edits weights through :func:`gather_params`, which gathers DeepSpeed ZeRO-3 partitioned parameters
(each rank holds a slice; DeepSpeed marks them with ``ds_id``) inside ``deepspeed.zero.GatheredParameters`` and
does nothing for ordinary tensors, so the same code runs single-process, under DDP/ZeRO-2 and under ZeRO-3.
``deepspeed`` is imported only when partitioned parameters are actually met; ``torch.distributed`` only when it
is initialised. The host glue for DeepSpeed launches (rank agreement, ZeRO-3 export) is in
:mod:`rolora_plugin.integrations.deepspeed`.

PyTorch FSDP2 (``fully_shard``, e.g. through accelerate with ``fsdp_version: 2``) shards each parameter as a
``DTensor`` (each rank holds a slice along dim 0). RoLoRA rotates *before* sharding (the Trainer callback's
``on_init_end``; accelerate shards in ``train()``), so the rotation never sees one; after training,
:func:`full_tensor` all-gathers one (collective) for the rank check and the merged export.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

__all__ = ["full_tensor", "gather_params", "is_dtensor", "is_fsdp2_sharded", "is_partitioned", "is_sharded",
           "is_zero3_partitioned", "world_size", "rank"]


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter (this rank holds a slice, the tensor itself is empty)."""
    return hasattr(param, "ds_id")


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when ``model``'s parameters are DeepSpeed ZeRO-3 partitions."""
    return any(is_partitioned(p) for p in model.parameters())


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2-sharded parameter is one)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_fsdp2_sharded(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP2 (``fully_shard``) DTensors."""
    return any(is_dtensor(p) for p in model.parameters())


def is_sharded(model: nn.Module) -> bool:
    """True when no rank holds ``model``'s full weights: DeepSpeed ZeRO-3 partitions or FSDP2 DTensors."""
    return is_zero3_partitioned(model) or is_fsdp2_sharded(model)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full (unsharded) value of ``t`` as a plain tensor: ``DTensor.full_tensor()`` for a DTensor — collective,
    every rank of its mesh must call it — else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


@contextlib.contextmanager
def gather_params(params: Iterable[nn.Parameter], modifier_rank: int | None = 0):
    """Gather ZeRO-3 partitioned parameters for reading (``modifier_rank=None``) or editing; no-op otherwise.

    With ``modifier_rank=0`` the edits made on rank 0 inside the block are broadcast and re-partitioned when it
    exits (``deepspeed.zero.GatheredParameters`` semantics).
    """
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        yield
        return
    import deepspeed  # only reached when parameters are ZeRO-3 partitioned

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=modifier_rank):
        yield


def world_size() -> int:
    """Number of processes in the default ``torch.distributed`` group (1 when not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when not initialised)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
