"""The rotation record's files: ``rolora_rotation.json`` (+ learned matrices in ``rolora/``) read and written
atomically, and an export's seal — a sampled fingerprint of its weight files and a digest of its config.json in the
record (:func:`seal_export`), verified before anything is loaded (:func:`verify_export_integrity`).

Below :mod:`rolora_plugin.io.export` and :mod:`rolora_plugin.io.streaming`, which both write exports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from ..errors import CheckpointError, RotationError
from ..hadamard.transform import OrthogonalTransform
from ..rotate.learned import (
    LEARNED_FILE,
    LEGACY_LEARNED_FILE,
    ORTHOGONALITY_TOL,
    attach_learned,
    learned_names,
    learned_transform,
    matrix_sha256,
    orthogonality_error,
    resolve_learned,
)
from ..rotate.rotation import RECORD_KEY, RotationRecord
from .integrity import checkpoint_integrity, verify_integrity
from .loading import _config_json
from .publish import atomic_write_bytes, atomic_write_text

__all__ = ["RECORD_FILE", "load_learned", "read_rotation_record", "save_learned", "seal_export", "verify_export_integrity", "write_rotation_record"]

logger = logging.getLogger(__name__)
RECORD_FILE = "rolora_rotation.json"


def write_rotation_record(directory: str | os.PathLike, record: RotationRecord) -> Path:
    """Write ``record`` as ``<directory>/rolora_rotation.json`` atomically; returns the path.

    A record with learned rotations (:mod:`rolora_plugin.rotate.learned`) also gets their matrices beside it, in
    ``rolora/learned_rotations.safetensors`` (the record holds each matrix's sha256).
    """
    path = Path(directory) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_learned(directory, record)
    atomic_write_text(path, json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_rotation_record(directory: str | os.PathLike) -> RotationRecord | None:
    """The record in ``<directory>/rolora_rotation.json``, or None if the file does not exist.

    A record with learned rotations comes with their matrices (``record.learned``), read from
    ``rolora/learned_rotations.safetensors`` beside it and verified (:func:`rolora_plugin.io.records.load_learned`
    refuses a missing, altered or non-orthogonal file)."""
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError, RecursionError) as e:  # RecursionError: JSON nested deeper than the parser's stack
        raise RotationError(f"{path} is not valid JSON ({str(e)[:200]}); it should hold the dict written by rotate_model_") from None
    if not isinstance(data, dict):
        raise RotationError(f"{path} holds a {type(data).__name__}, not the dict written by rotate_model_")
    record = RotationRecord.from_dict(data)
    load_learned(directory, record)  # learned matrices beside it, verified against the record (none: nothing read)
    return record


def seal_export(directory: str | os.PathLike, record: RotationRecord) -> RotationRecord:
    """Record what an export folder holds: ``record`` with ``integrity`` (a sampled fingerprint of the weight files and
    a digest of config.json, :func:`rolora_plugin.io.integrity.checkpoint_integrity`) written into config.json's
    record and ``rolora_rotation.json``; :func:`load_rotated` verifies it. Call last, once every file is written."""
    directory = Path(directory)
    sealed = dataclasses.replace(record, integrity=checkpoint_integrity(directory))
    config_path = directory / "config.json"
    data = json.loads(config_path.read_text())
    data[RECORD_KEY] = sealed.to_dict()
    atomic_write_text(config_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    write_rotation_record(directory, sealed)
    return sealed


_WARNED_UNSEALED: set[str] = set()


def verify_export_integrity(path: Path, file_record: RotationRecord | None) -> None:
    """The export's weights and config.json against the ``integrity`` of its record (before anything is loaded)."""
    data = _config_json(path / "config.json").get(RECORD_KEY)
    config_record = RotationRecord.from_dict(data) if isinstance(data, dict) and data else None
    found = config_record.integrity if config_record is not None else None
    if file_record is not None and config_record is not None and file_record.integrity != found:
        raise CheckpointError(
            f"{path}/config.json and {path}/{RECORD_FILE} hold different integrity records ({found} vs "
            f"{file_record.integrity}): one of them was replaced. Copy the complete export folder again, or re-export"
        )
    if found is None:
        if config_record is not None and str(path) not in _WARNED_UNSEALED:
            _WARNED_UNSEALED.add(str(path))
            logger.warning(
                "%s was exported by an older rolora-plugin: its record holds no weights fingerprint or config digest, so "
                "a replaced weight file or an edited config.json cannot be detected. Re-export it to add them.", path
            )
        return
    verify_integrity(path, found)


# ---------------------------------------------------------------------------------------------- learned matrices


def save_learned(directory: str | os.PathLike, record) -> Path | None:
    """Write the learned matrices of ``record`` as ``<directory>/rolora/learned_rotations.safetensors`` (atomic).

    Returns the path, or None when nothing in the record was learned (no file is written then).
    """
    names = learned_names(record)
    if not names:
        return None
    tensors = {n: t.dense.contiguous() for n, t in resolve_learned(record, {}).items() if n in names}
    path = Path(directory) / LEARNED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, save(tensors, metadata={"format": "rolora-learned-rotations"}))


def load_learned(directory: str | os.PathLike, record, model: nn.Module | None = None) -> dict:
    """Read and verify ``<directory>/rolora/learned_rotations.safetensors`` (older exports: ``rolora_learned_rotations.safetensors``)
    against ``record``; ``record.learned`` then holds them.

    Refuses (:class:`RotationError`) a missing file, a matrix whose sha256 differs from the record (tampered), a
    non-orthogonal matrix (``max|RᵀR − I| > 1e-10``) or one whose transform checksum differs. Returns
    ``{name: OrthogonalTransform}`` (empty when nothing was learned) and attaches them to ``model`` when given.
    """
    names = learned_names(record)
    if not names:
        return {}
    path = Path(directory) / LEARNED_FILE
    if not path.is_file() and (Path(directory) / LEGACY_LEARNED_FILE).is_file():
        path = Path(directory) / LEGACY_LEARNED_FILE
    if not path.is_file():
        raise RotationError(f"{path} is missing: the rotation record says {names} were learned and their matrices live in that file; copy it along with the checkpoint")
    try:
        tensors = load(path.read_bytes())
    except SafetensorError as e:
        raise RotationError(f"{path} is not a readable safetensors file ({e}); re-export the model") from None
    out = {n: _verified(path, n, tensors.get(n), record.rotations[n]) for n in names}
    record.learned.update(out)
    if model is not None:
        attach_learned(model, out, names)
    return out


def _verified(path: Path, name: str, m, entry: dict) -> OrthogonalTransform:
    if m is None:
        raise RotationError(f"{path} holds no matrix {name!r} but the rotation record says it was learned; re-export the model")
    if m.dtype != torch.float64 or m.shape != (entry["width"], entry["width"]):
        raise RotationError(f"{path}: {name} is {m.dtype} {tuple(m.shape)}, expected float64 ({entry['width']}, {entry['width']})")
    if matrix_sha256(m) != entry.get("sha256"):
        raise RotationError(f"{path}: {name}'s sha256 differs from the rotation record's: the file was altered (tampered or corrupted); re-export the model")
    err = orthogonality_error(m)
    if err > ORTHOGONALITY_TOL:
        raise RotationError(f"{path}: {name} is not orthogonal (max|RᵀR − I| = {err:.3g} > {ORTHOGONALITY_TOL:g}); re-export the model")
    t = learned_transform(m, entry["description"])
    if t.checksum() != entry["checksum"]:
        raise RotationError(f"{path}: {name}'s checksum {t.checksum()} differs from the record's {entry['checksum']}; re-export the model")
    return t
