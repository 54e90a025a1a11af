"""The one place that knows about distributed training state: ZeRO-3 partitioning, gathering, world size.

Core code edits weights through :func:`gather_params`, which gathers DeepSpeed ZeRO-3 partitioned parameters
(each rank holds a slice; DeepSpeed marks them with ``ds_id``) inside ``deepspeed.zero.GatheredParameters`` and
does nothing for ordinary tensors, so the same code runs single-process, under DDP/ZeRO-2 and under ZeRO-3.
``deepspeed`` is imported only when partitioned parameters are actually met; ``torch.distributed`` only when it
is initialised. The host glue for DeepSpeed launches (rank agreement, ZeRO-3 export) is in
:mod:`rolora_plugin.integrations.deepspeed`.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

__all__ = ["gather_params", "is_partitioned", "is_zero3_partitioned", "world_size", "rank"]


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter (this rank holds a slice, the tensor itself is empty)."""
    return hasattr(param, "ds_id")


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when ``model``'s parameters are DeepSpeed ZeRO-3 partitions."""
    return any(is_partitioned(p) for p in model.parameters())


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
