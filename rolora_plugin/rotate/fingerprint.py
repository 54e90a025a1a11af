"""A cheap fingerprint of a model's weights, stored in the rotation record to identify the *base* an adapter was
trained on.

The rotation record says which rotation was applied, not to which weights: an adapter merged into another base of
the same shape would load and run and be silently wrong. :func:`weights_fingerprint` hashes, for every parameter of
the unrotated model (LoRA factors excluded, peft's ``.base_layer`` removed from names, tied weights once): its
name, its shape, and 64 evenly spaced elements rounded to bfloat16. Rounding to bfloat16 makes the fingerprint the
same whether the base is loaded in float32 or bfloat16 (round-to-nearest from float32 gives the same bfloat16
either way); float16 loading of a float32 checkpoint double-rounds and may differ. Names are hashed in sorted
order, so a checkpoint's tensors give the same value without building the model (streaming rotation). Cost: 64
values per tensor (milliseconds for a 7B model).

:class:`Fingerprinter` is the same computation split in two: :meth:`Fingerprinter.take` samples a tensor when it is
at hand (in any order; the sample is a copy, so the tensor may be edited in place afterwards) and
:meth:`Fingerprinter.hexdigest` hashes the samples in sorted name order. Streaming rotation uses it to fingerprint
each weight in the read that feeds the rotation. :func:`fingerprint_tensors` is built on it, so both give the same
value for the same ``(name, tensor)`` pairs.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .._peft import bare_name, is_lora_factor_name, unwrap_peft
from ..distributed import gather_params

__all__ = ["weights_fingerprint", "fingerprint_tensors", "Fingerprinter", "SAMPLES_PER_TENSOR"]

SAMPLES_PER_TENSOR = 64


def _canonical_name(name: str) -> str | None:
    if is_lora_factor_name(name) or ".rolora_" in name:
        return None  # adapter factors and our own online modules are not part of the base
    return bare_name(name)


def _sample(p: torch.Tensor) -> bytes:
    flat = p.detach().reshape(-1)
    n = flat.numel()
    k = min(n, SAMPLES_PER_TENSOR)
    # integer arithmetic: float32 linspace cannot address elements beyond 2**24 (a 28M-entry embedding)
    idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
    values = flat[idx.to(flat.device)].to(torch.float32).to(torch.bfloat16).cpu()
    return values.view(torch.int16).numpy().tobytes()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) over names, shapes and sampled values of ``model``'s base weights.

    ``model`` may be a bare transformers model or a peft ``PeftModel``; ZeRO-3 partitions are gathered one at a
    time (collective: every rank must call it).
    """
    params = {}
    for name, p in unwrap_peft(model).named_parameters():  # named_parameters yields a tied weight once
        canonical = _canonical_name(name)
        if canonical is not None:
            params[canonical] = p
    return fingerprint_tensors(params.items(), gather=True)


def fingerprint_tensors(named_tensors, *, gather: bool = False) -> str:
    """The fingerprint of ``(name, tensor)`` pairs, hashed in sorted name order (so a checkpoint's keys, read in
    any order, give the same value as the model's parameters). ``gather``: gather ZeRO-3 partitions."""
    fingerprinter = Fingerprinter()
    for name, p in sorted(named_tensors, key=lambda item: item[0]):  # sorted: every rank gathers in one order
        with gather_params([p] if gather else [], modifier_rank=None):
            fingerprinter.take(name, p)
    return fingerprinter.hexdigest()


class Fingerprinter:
    """:func:`fingerprint_tensors` taken one tensor at a time, in any order, as the tensors are at hand.

    ``take(name, tensor)`` keeps the name, the shape and a copy of the 64 sampled values (so the tensor may be
    edited in place right after); ``hexdigest()`` hashes them in sorted name order: the same value as
    ``fingerprint_tensors`` over the same pairs, whatever order they were taken in.
    """

    def __init__(self):
        self._entries: list[tuple[str, tuple[int, ...], bytes]] = []
        self._names: set[str] = set()

    def take(self, name: str, tensor: torch.Tensor) -> None:
        self._entries.append((name, tuple(tensor.shape), _sample(tensor)))
        self._names.add(name)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._entries)

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for name, shape, values in sorted(self._entries, key=lambda entry: entry[0]):  # stable, like sorted() above
            h.update(f"{name}:{shape}:".encode())
            h.update(values)
        return h.hexdigest()[:16]
