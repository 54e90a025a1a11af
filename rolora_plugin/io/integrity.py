"""The integrity of an exported folder: a fingerprint of its weight files and a digest of its config.json,
written into its rotation record at export and checked before it is loaded (:mod:`rolora_plugin.io.records`).

:func:`files_fingerprint` reads the same samples :func:`rolora_plugin.rotate.fingerprint.fingerprint_tensors` takes of a
model (``pread`` at their byte offsets), so a folder is fingerprinted without loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..rotate.fingerprint import SAMPLES_PER_TENSOR
from .safetensors_reader import _Checkpoint, weight_files

__all__ = ["CONFIG_VOLATILE_KEYS", "files_fingerprint", "config_digest", "checkpoint_integrity", "verify_integrity"]

# config.json fields the config digest leaves out: those verified on their own (the rotation record, by its
# checksums; the quantization record and the compressed-tensors block, against rolora_quantization.json by
# rolora_plugin.io.compressed, and an FP export carrying a quantization record is refused by load_rotated) and those that
# legitimately differ in a faithful copy (the transformers version that saved it, the dtype it is loaded in)
CONFIG_VOLATILE_KEYS = ("rolora", "rolora_quant", "quantization_config", "transformers_version", "dtype", "torch_dtype",
                        "_name_or_path", "_commit_hash")  # fmt: skip


def files_fingerprint(folder) -> str | None:
    """:func:`fingerprint_tensors` of a folder's safetensors weights read from the files (not a model): per tensor its
    name, shape and 64 evenly spaced values (``pread`` at their byte offsets; floats rounded to bfloat16 as for bases,
    other dtypes as stored bytes). Independent of sharding and of the dtype a model is later loaded in; reads a few
    KiB whatever the model's size. None when the folder holds no safetensors weights."""
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
    data = json.loads(Path(config_path).read_text())
    kept = {k: v for k, v in data.items() if k not in CONFIG_VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def checkpoint_integrity(folder) -> dict:
    """``{"weights": files_fingerprint, "config": config_digest}`` of an exported folder (the record's ``integrity``)."""
    return {"weights": files_fingerprint(folder), "config": config_digest(Path(folder) / "config.json")}


def verify_integrity(folder, expected: dict) -> None:
    """Raise :class:`rolora_plugin.errors.CheckpointError` when the folder's weights or config.json differ from the
    ``integrity`` its rotation record holds (written at export). Cheap: headers, 64 values per tensor, config.json."""
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
