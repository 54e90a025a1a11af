"""Reading a (sharded) safetensors checkpoint one tensor at a time, for :mod:`rolora_plugin.io.streaming`.

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

from ..errors import CheckpointError, RotationError

__all__ = ["SINGLE_FILE", "INDEX_FILE", "weight_files", "header_shapes"]

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
PREFETCH_CHUNK = 1 << 20  # bytes per WILLNEED request: at most a usual device read-ahead cap (see _Checkpoint.prefetch)
_BIN_FILE, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def weight_files(folder: Path) -> Path | None:
    """The weights of a model folder by the one rule every loader here applies (in memory and streaming): the
    safetensors index if there is one, else ``model.safetensors``; None when the folder has no safetensors weights.

    A folder holding **both** ``model.safetensors`` and ``model.safetensors.index.json`` (+ shards) is refused
    (:class:`rolora_plugin.io.loading.CheckpointError`): they are two sets of weights (one usually a stale copy of
    an earlier save), transformers reads the single file and an index-first reader the shards, so the same folder
    would give two different models. The same holds for ``pytorch_model.bin`` beside its own index.
    """
    folder = Path(folder)
    for single, index in ((SINGLE_FILE, INDEX_FILE), (_BIN_FILE, _BIN_INDEX)):
        if (folder / single).is_file() and (folder / index).is_file():
            raise CheckpointError(
                f"{folder} holds both {single} and {index} (+ shards): two sets of weights, and which one a loader "
                f"reads differs (transformers takes {single}), so the model would depend on the tool. Keep the one "
                "you mean and move the other (usually a stale copy of an earlier save) out of the folder"
            )
    if (folder / INDEX_FILE).is_file():
        return folder / INDEX_FILE
    if (folder / SINGLE_FILE).is_file():
        return folder / SINGLE_FILE
    return None


def header_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a folder's safetensors weights, from the headers alone ({} without safetensors)."""
    if weight_files(folder) is None:
        return {}
    ckpt = _Checkpoint(Path(folder), None)  # refuses an index naming a shard that lacks the tensor, a missing shard
    ckpt.close()
    return {name: ckpt.shapes[name] for name in ckpt.files}


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
            header = _header(path)
            wrong = sorted(name for name, file in self.files.items() if file == path and name not in header)
            if wrong:
                raise CheckpointError(
                    f"{folder / INDEX_FILE} maps {len(wrong)} tensor(s) (e.g. {wrong[0]}) to {path.name}, whose header has "
                    "no such tensor: the index does not describe the shards (stale or edited). Re-save the model, or "
                    "restore the index that came with the shards"
                )
            for name, entry in header.items():
                self.ranges[name], self.shapes[name], self.dtypes[name] = entry
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, int] = {}

    def read(self, name: str, cast: bool = True) -> torch.Tensor:
        """The tensor ``name`` in anonymous memory (writable, freed with it), cast to ``dtype`` if floating (and ``cast``)."""
        from safetensors import safe_open

        path = self.files[name]
        if _pread_available():
            if path not in self._handles:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt", backend="pread"))
            t = self._handles[path].get_tensor(name)
        else:  # a short-lived mapping per tensor, copied out so no mapped page outlives this call
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(name).clone()
        return self.cast(t) if cast else t

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the checkpoint is loaded: cast to ``dtype`` if floating (``from_pretrained(dtype=...)``'s rule)."""
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def prefetch(self, names) -> None:
        """Ask the kernel to start reading ``names`` into the page cache (``POSIX_FADV_WILLNEED``, asynchronous),
        so their reads overlap the work on the tensors before them. No-op where unsupported.

        One request per :data:`PREFETCH_CHUNK` bytes: Linux caps each ``WILLNEED`` at the device's read-ahead size
        (``max(read_ahead_kb, max_sectors_kb)``), so one request per tensor brings in only its first few MiB
        (measured on the 7B benchmark's box: 24 of 258 MiB in the page cache 4 s later; with 1 MiB requests a whole
        7B decoder layer, 386 MiB, within 3 s, the requests themselves taking 0.07 s)."""
        if not hasattr(os, "posix_fadvise"):
            return
        for name in names:
            path = self.files[name]
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            start, stop = self.ranges[name]
            for offset in range(start, stop, PREFETCH_CHUNK):
                os.posix_fadvise(self._fds[path], offset, min(PREFETCH_CHUNK, stop - offset), os.POSIX_FADV_WILLNEED)

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
    try:
        total = os.path.getsize(path)
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > total - 8:  # a lying length would make us read (allocate) whatever it claims
                raise ValueError(f"header length {size} exceeds the file's {total} bytes")
            header = json.loads(f.read(size))
        out, base = {}, 8 + size
        for name, v in header.items():
            if name != "__metadata__":
                start, stop = (int(x) for x in v["data_offsets"])
                shape, dtype = tuple(int(d) for d in v["shape"]), getattr(torch, _DTYPES.get(v["dtype"], ""), None)
                if not 0 <= start <= stop <= total - base or (dtype is not None and stop - start != _numel(shape) * dtype.itemsize):
                    raise ValueError(f"tensor {name}: shape {list(shape)} and byte range {start}..{stop} disagree or lie outside the file")
                out[name] = ((base + start, base + stop), shape, dtype)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist but the weight index names it; copy the complete model folder") from None
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise RotationError(f"{path} is not a safetensors file (unreadable header: {str(e)[:200]}); re-save or copy the model again") from None
    return out


def _weight_map(folder: Path) -> dict[str, Path]:
    found = weight_files(folder)
    if found is not None and found.name == INDEX_FILE:
        try:
            weight_map = json.loads(found.read_text())["weight_map"]
            out = {str(name): folder / str(file) for name, file in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise RotationError(f"{found} is not a safetensors index (no weight_map: {e!r})") from None
        return out
    if found is not None:
        return {name: found for name in _header(found)}
    raise RotationError(
        f"{folder} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); streaming rotation reads safetensors "
        "only: re-save the model with save_pretrained (safe_serialization is the default)"
    )


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
