"""Reading a (sharded) safetensors checkpoint one tensor at a time, for :mod:`rolora_plugin.streaming`.

Shapes, dtypes and byte ranges come from the safetensors headers; tensors are read with ``pread(2)`` where the
installed safetensors supports it, so the input is never mapped as a whole and its pages do not accumulate in
the process's resident set.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from .errors import RotationError

__all__ = ["SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def _pread_available() -> bool:
    """safetensors ≥ 0.8 reads tensors with ``pread(2)`` (``backend="pread"``): no mapping of the input at all."""
    from safetensors import __version__

    major, minor = (int(x) for x in __version__.split(".")[:2])
    return (major, minor) >= (0, 8)


class _Checkpoint:
    """Tensor names, shapes and dtypes of a safetensors checkpoint folder; reads one tensor at a time."""

    def __init__(self, folder: Path, dtype: torch.dtype | None):
        self.folder, self.dtype = folder, dtype
        self.files = _weight_map(folder)  # name -> shard path
        self.ranges, self.shapes, self.dtypes = {}, {}, {}  # from the headers: nothing else is read here
        for path in sorted(set(self.files.values())):
            for name, entry in _header(path).items():
                self.ranges[name], self.shapes[name], self.dtypes[name] = entry
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, int] = {}

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in anonymous memory (writable, freed with it), cast to ``dtype`` if floating."""
        from safetensors import safe_open

        path = self.files[name]
        if _pread_available():
            if path not in self._handles:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt", backend="pread"))
            t = self._handles[path].get_tensor(name)
        else:  # a short-lived mapping per tensor, copied out so no mapped page outlives this call
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(name).clone()
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def prefetch(self, names) -> None:
        """Ask the kernel to start reading ``names`` into the page cache (``POSIX_FADV_WILLNEED``, asynchronous),
        so their reads overlap the work on the tensors before them. No-op where unsupported."""
        if not hasattr(os, "posix_fadvise"):
            return
        for name in names:
            path = self.files[name]
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            start, stop = self.ranges[name]
            os.posix_fadvise(self._fds[path], start, stop - start, os.POSIX_FADV_WILLNEED)

    def out_itemsize(self, name: str) -> int:
        src = self.dtypes[name]
        if src is None:  # a buffer of a dtype torch cannot name: as stored
            start, stop = self.ranges[name]
            return (stop - start) // max(1, _numel(self.shapes[name]))
        return (self.dtype if self.dtype is not None and src.is_floating_point else src).itemsize

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# safetensors dtype names (the format's header) -> torch dtypes; a name missing here reads as None (refused)
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}  # fmt: skip


def _header(path: Path) -> dict[str, tuple[tuple[int, int], tuple[int, ...], torch.dtype | None]]:
    """``{name: ((start, stop) byte range, shape, dtype)}`` of a safetensors file, from its header alone.

    The format: an 8-byte little-endian header length, a JSON header (``dtype``, ``shape``, ``data_offsets``
    relative to the end of the header), then the data.
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RotationError(f"{path} is not a safetensors file (unreadable header: {e})") from None
    base, out = 8 + size, {}
    for name, v in header.items():
        if name != "__metadata__":
            start, stop = v["data_offsets"]
            out[name] = ((base + start, base + stop), tuple(v["shape"]), getattr(torch, _DTYPES.get(v["dtype"], ""), None))
    return out


def _weight_map(folder: Path) -> dict[str, Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RotationError(f"{index} is not a safetensors index (no weight_map: {e!r})") from None
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
            return {name: folder / SINGLE_FILE for name in f.keys()}
    raise RotationError(
        f"{folder} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); streaming rotation reads safetensors "
        "only: re-save the model with save_pretrained (safe_serialization is the default)"
    )


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
