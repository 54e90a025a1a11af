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

from ._peft import unwrap_peft
from .distributed import gather_params

__all__ = ["weights_fingerprint", "fingerprint_tensors", "Fingerprinter", "SAMPLES_PER_TENSOR"]

SAMPLES_PER_TENSOR = 64


def _canonical_name(name: str) -> str | None:
    if "lora_" in name or ".rolora_" in name:
        return None  # adapter factors and our own online modules are not part of the base
    return name.replace(".base_layer", "")


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


# ---------------------------------------------------------------------------------------------- exported checkpoints

# config.json fields the config digest leaves out: those verified on their own (the rotation record, by its
# checksums; the quantization record and the compressed-tensors block, against rolora_quantization.json by
# rolora_plugin.compressed, and an FP export carrying a quantization record is refused by load_rotated) and those that
# legitimately differ in a faithful copy (the transformers version that saved it, the dtype it is loaded in)
CONFIG_VOLATILE_KEYS = ("rolora", "rolora_quant", "quantization_config", "transformers_version", "dtype", "torch_dtype",
                        "_name_or_path", "_commit_hash")  # fmt: skip


def files_fingerprint(folder) -> str | None:
    """:func:`fingerprint_tensors` of a folder's safetensors weights read from the files (not a model): per tensor its
    name, shape and 64 evenly spaced values (``pread`` at their byte offsets; floats rounded to bfloat16 as for bases,
    other dtypes as stored bytes). Independent of sharding and of the dtype a model is later loaded in; reads a few
    KiB whatever the model's size. None when the folder holds no safetensors weights."""
    import os
    from pathlib import Path

    from .safetensors_reader import _Checkpoint, weight_files

    folder = Path(folder)
    if weight_files(folder) is None:
        return None
    ckpt = _Checkpoint(folder, None)  # headers only; refuses an index that names a tensor its shard lacks
    entries = {name: (path, (ckpt.ranges[name], ckpt.shapes[name], ckpt.dtypes[name])) for name, path in ckpt.files.items()}
    ckpt.close()
    h = hashlib.sha256()
    fds = {}
    try:
        for name in sorted(entries):
            path, ((start, stop), shape, dtype) = entries[name]
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            n = 1
            for s in shape:
                n *= s
            h.update(f"{name}:{tuple(shape)}:".encode())
            if not n:
                continue
            itemsize = (stop - start) // n
            k = min(n, SAMPLES_PER_TENSOR)
            raw = b"".join(os.pread(fd, itemsize, start + (i * (n - 1) // max(k - 1, 1)) * itemsize) for i in range(k))
            if dtype is not None and dtype.is_floating_point and dtype.itemsize == itemsize:
                values = torch.frombuffer(bytearray(raw), dtype=dtype).to(torch.float32).to(torch.bfloat16)
                raw = values.view(torch.int16).numpy().tobytes()
            h.update(raw)
    finally:
        for fd in fds.values():
            os.close(fd)
    return h.hexdigest()[:16]


def config_digest(config_path) -> str:
    """sha256 (16 hex digits) of ``config.json`` as canonical JSON, less :data:`CONFIG_VOLATILE_KEYS`."""
    import json
    from pathlib import Path

    data = json.loads(Path(config_path).read_text())
    kept = {k: v for k, v in data.items() if k not in CONFIG_VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def checkpoint_integrity(folder) -> dict:
    """``{"weights": files_fingerprint, "config": config_digest}`` of an exported folder (the record's ``integrity``)."""
    from pathlib import Path

    return {"weights": files_fingerprint(folder), "config": config_digest(Path(folder) / "config.json")}


def verify_integrity(folder, expected: dict) -> None:
    """Raise :class:`rolora_plugin.loading.CheckpointError` when the folder's weights or config.json differ from the
    ``integrity`` its rotation record holds (written at export). Cheap: headers, 64 values per tensor, config.json."""
    from pathlib import Path

    from .errors import CheckpointError

    folder = Path(folder)
    found = checkpoint_integrity(folder)
    if expected.get("weights") is not None and found["weights"] != expected["weights"]:
        raise CheckpointError(
            f"the weights in {folder} are not the ones exported with its rotation record (weights fingerprint {found['weights']}, "
            f"the record says {expected['weights']}): a weight file was replaced or edited. Re-export, or copy the "
            "complete export folder again"
        )
    if expected.get("config") is not None and found["config"] != expected["config"]:
        raise CheckpointError(
            f"{folder}/config.json was edited after export (digest {found['config']}, the record says {expected['config']}; "
            "a changed field such as rms_norm_eps or rope_theta gives another model). Restore the exported config.json, "
            "or re-export"
        )
