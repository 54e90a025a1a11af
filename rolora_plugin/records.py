"""The rotation record's files: ``rolora_rotation.json`` (+ learned matrices in ``rolora/``) read and written
atomically, and an export's seal — a sampled fingerprint of its weight files and a digest of its config.json in the
record (:func:`seal_export`), verified before anything is loaded (:func:`verify_export_integrity`).

Below :mod:`rolora_plugin.export` and :mod:`rolora_plugin.streaming`, which both write exports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from .errors import CheckpointError, RotationError
from .fingerprint import checkpoint_integrity, verify_integrity
from .learned import load_learned, save_learned
from .loading import _config_json
from .publish import atomic_write_text
from .rotation import RECORD_KEY, RotationRecord

__all__ = ["RECORD_FILE", "read_rotation_record", "seal_export", "verify_export_integrity", "write_rotation_record"]

logger = logging.getLogger(__name__)
RECORD_FILE = "rolora_rotation.json"


def write_rotation_record(directory: str | os.PathLike, record: RotationRecord) -> Path:
    """Write ``record`` as ``<directory>/rolora_rotation.json`` atomically; returns the path.

    A record with learned rotations (:mod:`rolora_plugin.learned`) also gets their matrices beside it, in
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
    ``rolora/learned_rotations.safetensors`` beside it and verified (:func:`rolora_plugin.learned.load_learned`
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
    a digest of config.json, :func:`rolora_plugin.fingerprint.checkpoint_integrity`) written into config.json's
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
