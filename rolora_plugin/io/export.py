"""Merge LoRA in the rotated basis and export a standard checkpoint; load it back with its online rotations.

RoLoRA's adapters are trained on rotated weights, so they only make sense merged into *the same* rotation. The
official implementation re-draws R1 at export without the training seed and merges into a different basis; here
every merge first verifies the rotation record (seed, sign vectors' checksums, which rotations, model dims):

* a live model: ``model.config.rolora`` (written by :func:`rolora_plugin.rotate_model_`);
* a peft adapter directory (``adapter_config.json``, also Trainer checkpoints of a ``PeftModel``): the
  ``rolora_rotation.json`` written next to it by :class:`rolora_plugin.integrations.hf_trainer.RoLoRACallback`. Its base model
  (``base_model=`` or ``adapter_config.base_model_name_or_path``) is either a rotated checkpoint whose record
  must be identical, or the original model, which is rotated again from the record (bit-identical by seed) and
  then checked against it;
* a full checkpoint directory: its ``config.json`` record, and ``rolora_rotation.json`` if present (must agree).

A missing or mismatched record raises :class:`rolora_plugin.RotationError` before anything is written. An
adapter's base is refused up front when it is quantized (an adapter merges into full-precision weights).

Every export is sealed last (:func:`seal_export`): its rotation record (config.json and ``rolora_rotation.json``)
gets ``integrity`` = a sampled fingerprint of the weight files and a digest of config.json, which
:func:`load_rotated` verifies. They give integrity (a replaced, mixed or edited folder is refused), not
authenticity: whoever can write the folder can rewrite the record too.

Output (written to a temporary directory next to ``out_dir`` and renamed into place, create-exclusive unless
``overwrite``), ``format="fp"`` (default): ``model.safetensors`` (+ shards), ``config.json`` carrying the record,
``generation_config.json``, the tokenizer when one is found, ``rolora_rotation.json`` and the online rotations as
a compressed-tensors ``transform_config`` (``transform_config.json``; see :mod:`rolora_plugin.io.compressed`).
:func:`load_rotated` reloads it with plain ``AutoModelForCausalLM.from_pretrained`` and re-installs the online
R4/R3 modules from the record. A quantized model is refused here (it would reload without its activation
quantizers).

``format="compressed-tensors"``: a model quantized with :func:`rolora_plugin.quant.quantize_model_` written as a
packed compressed-tensors checkpoint (int weights at their bit width + scales, ``quantization_config``,
``transform_config`` with exactly our R4/R3, ``rolora_quantization.json`` with checksums; layout in
:mod:`rolora_plugin.io.compressed`). :func:`load_rotated` verifies it, loads the exact dequantized weights and
re-installs the activation / KV quantizers and the online rotations: the fake-quant model of before the export.
:func:`quantize_and_export` does rotate (if needed) → quantize → export in one call.

Example::

    >>> out = merge_and_export(peft_model, "export/")          # doctest: +SKIP
    >>> model = load_rotated("export/")                        # same logits as peft_model  # doctest: +SKIP
    >>> quantize_model_(model, QuantConfig(w_bits=4, a_bits=4))  # doctest: +SKIP
    >>> merge_and_export(model, "w4a4/", format="compressed-tensors")  # load_rotated("w4a4/"): same logits  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .._peft import unwrap_peft
from ..config import QUANT_RECORD_KEY
from ..errors import QuantizationError
from ..model.online import use_consumer_arithmetic_
from ..quant import fake_quant_active, get_quantization_record, install_activation_quantizers, quantize_model_
from ..rotate.fingerprint import weights_fingerprint
from ..rotate.learned import LEARNED_FILE, learned_names, resolve_learned
from ..rotate.rotation import RECORD_KEY, RotationError, RotationRecord, ensure_rotated, get_rotation_record, install_online_rotations, rotate_model_
from .compressed import (
    COMPRESSED_FORMAT,
    EXPORT_SIDE_KEYS,
    QUANT_RECORD_FILE,
    _read_json,
    _refuse_fused_experts,
    is_compressed_export,
    load_compressed,
    model_class,
    prepare_compressed,
    verify_compressed_export,
    write_compressed,
)
from .loading import load_causal_lm
from .publish import OutputExistsError, atomic_output_dir, atomic_write_text, check_writable_parent
from .records import RECORD_FILE, load_learned, read_rotation_record, seal_export, verify_export_integrity, write_rotation_record
from .transform_config import TRANSFORM_CONFIG_FILE, embed_transform_config, load_with_compressed_tensors, transform_config_dict

__all__ = [
    "FORMATS",
    "LEARNED_FILE",
    "RECORD_FILE",
    "TRANSFORM_CONFIG_FILE",
    "load_rotated",
    "load_with_compressed_tensors",
    "merge_and_export",
    "quantize_and_export",
    "read_rotation_record",
    "seal_export",
    "transform_config_dict",
    "write_rotation_record",
]

logger = logging.getLogger(__name__)
FORMATS = ("fp", COMPRESSED_FORMAT)  # merge_and_export(format=...)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _require_same(a: RotationRecord, b: RotationRecord, what_a: str, what_b: str) -> None:
    if a != b:
        if dataclasses.replace(a, base_fingerprint=None) == dataclasses.replace(b, base_fingerprint=None):
            raise RotationError(
                f"rotation record mismatch: {what_a} and {what_b} describe the same rotation of different base weights "
                f"(base_fingerprint {a.base_fingerprint} vs {b.base_fingerprint}); merging would give a wrong model. Use "
                "the base model and adapter from the same run."
            )
        raise RotationError(
            f"rotation record mismatch: {what_a} has {_describe(a)} but {what_b} has {_describe(b)}. The adapter was "
            "trained in a different rotated basis; merging would silently give a wrong model. Use the base model and "
            "adapter from the same run (or pass the matching record=)."
        )


def _describe(record: RotationRecord) -> str:
    rots = {k: v["checksum"] for k, v in record.rotations.items()}
    return f"family={record.family}, seed={record.config.seed}, rotations={rots}, dims={record.dims}"


# ---------------------------------------------------------------------------------------------- loading


def load_rotated(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None, *, consumer_arithmetic: bool = False, **kwargs) -> nn.Module:
    """Load a rotated checkpoint (e.g. from :func:`merge_and_export`) with its online rotations rebuilt.

    Before anything is loaded: the record's ``integrity`` (written at export: a sampled fingerprint of the weight
    files and a digest of config.json less the fields that legitimately change) must match the folder, else
    :class:`rolora_plugin.io.loading.CheckpointError` (a replaced weight file, an edited ``rms_norm_eps``); a record
    without it (an older export) loads with one warning. Every load goes through
    :func:`rolora_plugin.io.loading.load_causal_lm` (no tensor missing, unexpected or of another shape).

    Full-precision export: ``AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)``, checked.
    compressed-tensors export: first :func:`rolora_plugin.io.compressed.verify_compressed_export` (records, the
    ``quantization_config`` and every tensor's checksum; nothing is loaded if one disagrees), then the packed
    weights are dequantized exactly by compressed-tensors at load and the activation / KV quantizers of the
    ``rolora_quant`` record are re-installed. In both cases the record in the config is checked against
    ``rolora_rotation.json`` (when present) and :func:`rolora_plugin.install_online_rotations` re-creates the
    online R4/R3 modules (verifying the record's checksums). ``consumer_arithmetic=True``: the online rotations
    compute ``(x @ √n·R) / √n`` in float32 as compressed-tensors and vLLM's dense transform do (:func:`rolora_plugin.model.online.use_consumer_arithmetic_`),
    so 4-bit activation codes on a rounding tie round as the consumer's do (what :func:`rolora_plugin.io.check.check_export`
    compares against). Returns the model in eval mode.
    """
    if dtype is not None:
        kwargs["dtype"] = dtype
    early = read_rotation_record(path)  # with its learned matrices, verified (the compressed export checks it first)
    compressed = is_compressed_export(path)
    if not compressed and (Path(path) / QUANT_RECORD_FILE).is_file():
        raise QuantizationError(
            f"{path} holds {QUANT_RECORD_FILE} (a compressed-tensors export) but config.json has no quantization_config: "
            "loading it would leave the packed linears randomly initialised. Restore the exported config.json, or re-export"
        )
    quant = verify_compressed_export(path) if compressed else None
    verify_export_integrity(Path(path), early)
    model = _from_pretrained(path, quant, kwargs)
    record = get_rotation_record(model)
    if record is None:
        raise RotationError(
            f"{path} holds no rotation record (config.json has no {RECORD_KEY!r} entry): it is not a rotated "
            "checkpoint. Load it with AutoModelForCausalLM.from_pretrained, or rotate it with rotate_model_."
        )
    if quant is None and getattr(model.config, QUANT_RECORD_KEY, None):
        raise RotationError(
            f"{path} holds fake-quantized weights exported as full precision (config.json has {QUANT_RECORD_KEY!r}) but "
            "no activation quantizers: loading it would silently give a different model. Re-export the quantized "
            "model with format='compressed-tensors', or export the full-precision model."
        )
    file_record = read_rotation_record(path)
    if file_record is not None:
        _require_same(file_record, record, f"{path}/{RECORD_FILE}", f"{path}/config.json")
    load_learned(path, record, unwrap_peft(model))  # refuses a missing, altered or non-orthogonal learned matrix
    if record.integrity is not None:  # verified above; a model in memory is no longer that folder
        record = dataclasses.replace(record, integrity=None)
        setattr(model.config, RECORD_KEY, record.to_dict())
    install_online_rotations(model, record)
    if consumer_arithmetic:
        use_consumer_arithmetic_(model)
    if quant is not None:
        install_activation_quantizers(model, quant)
    if device is not None:
        model.to(device)
    return model.eval()


def _from_pretrained(path, quant, kwargs: dict) -> nn.Module:
    if quant is not None:
        return load_compressed(path, quant, **kwargs)
    return load_causal_lm(path, model_cls=model_class(path), expected_unexpected=EXPORT_SIDE_KEYS, **kwargs)


def _load_base(base_model, dtype) -> nn.Module:
    if isinstance(base_model, nn.Module):
        _refuse_quantized_base(getattr(unwrap_peft(base_model), "config", None), "the base model")
        return base_model
    if base_model is None or not Path(base_model).is_dir():
        raise RotationError(
            f"the adapter's base model {base_model!r} is not a local directory; pass base_model=<rotated export or "
            "original model dir> (no hub downloads are attempted)"
        )
    config = Path(base_model) / "config.json"
    data = _read_json(config, "model config") if config.is_file() else {}
    _refuse_quantized_base(data, f"base model {base_model}")
    if data.get(RECORD_KEY):  # a rotated export: its checksums are verified like any rotated checkpoint's
        return load_rotated(base_model, dtype)
    return load_causal_lm(base_model, dtype, what="base model")


def _refuse_quantized_base(config, what: str) -> None:
    """An adapter merges into full-precision weights: a quantized base (ours or any compressed-tensors / bnb one) is refused."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    qc = get("quantization_config")
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
    if get(QUANT_RECORD_KEY) or qc.get("config_groups") or qc.get("quant_method") not in (None, COMPRESSED_FORMAT):
        raise QuantizationError(
            f"{what} is quantized: a LoRA adapter merges into full-precision weights, and peft cannot attach it to packed "
            "linears. Pass the full-precision base (the rotated export or the original model) with --base-model / "
            "base_model=, then quantize the merged model (rolora quantize)"
        )


def _rotated_base(base: nn.Module, record: RotationRecord, base_name: str) -> nn.Module:
    """``base`` in the rotated basis of ``record``: checked if already rotated, rotated from the record if not."""
    base_record = get_rotation_record(base)
    if base_record is None:
        _check_base_fingerprint(base, record, base_name)
        logger.info("base model %s is not rotated: rotating it with the adapter's record (seed %d)", base_name, record.config.seed)
        rotate_model_(base, record.config, learned=resolve_learned(record, {}) if learned_names(record) else None)
        rotated = get_rotation_record(base)
        if record.base_fingerprint is None:  # an older adapter record: nothing to compare the fingerprint with
            rotated = dataclasses.replace(rotated, base_fingerprint=None)
        _require_same(rotated, record, f"base model {base_name} rotated from the record", "the adapter record")
    else:
        if record.base_fingerprint is None:
            logger.warning("the adapter's rotation record has no base_fingerprint (older rolora-plugin): the integrity of "
                           "the base cannot be checked, so make sure %s is the model the adapter was trained on", base_name)  # fmt: skip
            base_record = dataclasses.replace(base_record, base_fingerprint=None)
        _require_same(base_record, record, f"base model {base_name}", "the adapter record")
        install_online_rotations(base, get_rotation_record(base))
    return base


def _check_base_fingerprint(base: nn.Module, record: RotationRecord, base_name: str) -> None:
    """Refuse an unrotated base whose weights are not the ones the adapter's record was made from."""
    if record.base_fingerprint is None:
        logger.warning("the adapter's rotation record has no base_fingerprint (older rolora-plugin): the integrity of the base "
                       "cannot be checked, so make sure %s is the model the adapter was trained on", base_name)  # fmt: skip
        return
    found = weights_fingerprint(base)
    if found != record.base_fingerprint:
        raise RotationError(
            f"base model {base_name} is not the model this adapter was trained on (weights fingerprint {found}, the "
            f"record says {record.base_fingerprint}); merging would give a wrong model. Pass the original base with "
            "--base-model / base_model=."
        )


def _load_adapter_dir(path: Path, record, base_model, dtype) -> tuple[nn.Module, RotationRecord, list]:
    from peft import PeftModel

    file_record = read_rotation_record(path)
    if record is not None and file_record is not None:
        _require_same(file_record, record, f"{path}/{RECORD_FILE}", "record=")
    if record is not None and file_record is not None and not record.learned:
        record = dataclasses.replace(record, learned=file_record.learned)  # the matrices read beside the adapter
    record = record or file_record
    if record is None:
        raise RotationError(
            f"{path} is a peft adapter without {RECORD_FILE}: nothing says which rotation it was trained in. Pass "
            "record=RotationRecord(...) from the training run (RoLoRACallback writes the file next to every adapter)."
        )
    base_name = base_model if base_model is not None else _adapter_config(path).get("base_model_name_or_path")
    base = _rotated_base(_load_base(base_name, dtype), record, str(base_name))
    return PeftModel.from_pretrained(base, str(path)), record, [path, base_name]


def _adapter_config(path: Path) -> dict:
    config = _read_json(path / "adapter_config.json", "adapter config")
    if not isinstance(config, dict):
        raise RotationError(f"{path}/adapter_config.json holds a {type(config).__name__}, not an object; re-save the adapter")
    return config


def _load_source(src, record, base_model, dtype) -> tuple[nn.Module, RotationRecord, list]:
    """(model, verified record, source dirs) for a module, an adapter dir or a checkpoint dir."""
    if isinstance(src, nn.Module):
        found = get_rotation_record(unwrap_peft(src))
        if found is None:
            raise RotationError(f"{type(src).__name__} is not rotated (no model.config.{RECORD_KEY}); nothing to verify the merge against")
        if record is not None:
            _require_same(found, record, "the model", "record=")
        return src, found, []
    path = Path(src)
    if (path / "adapter_config.json").is_file():
        return _load_adapter_dir(path, record, base_model, dtype)
    if (path / "config.json").is_file():
        model = load_rotated(path, dtype)
        if record is not None:
            _require_same(get_rotation_record(model), record, str(path), "record=")
        return model, get_rotation_record(model), [path]
    raise RotationError(f"{path} is neither a peft adapter (adapter_config.json) nor a model checkpoint (config.json)")


# ---------------------------------------------------------------------------------------------- export


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail before any work if ``out_dir`` cannot be published (exists and not ``overwrite``; parent unwritable)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; choose another out_dir or pass overwrite=True")
    check_writable_parent(out_dir)


def _fake_quant_active(model: nn.Module) -> bool:
    return fake_quant_active(model)


def _check_not_quantized(model: nn.Module) -> None:
    config = getattr(unwrap_peft(model), "config", None)
    if getattr(config, QUANT_RECORD_KEY, None):
        raise RotationError(
            "the model is quantized (model.config.rolora_quant): a full-precision export would write its fake-quantized "
            "weights without the activation quantizers, and it would reload as a different model. Export the "
            "full-precision model before quantize_model_, or export the quantized one with "
            "format='compressed-tensors' (CLI: rolora export ... --format compressed-tensors)."
        )


def _merged(model: nn.Module, inplace: bool) -> nn.Module:
    _check_not_quantized(model)
    if _fake_quant_active(model):
        raise RotationError("the model still has fake-quant (QAT) forwards installed; remove them before exporting")
    if not hasattr(model, "merge_and_unload"):
        return model
    return (model if inplace else copy.deepcopy(model)).merge_and_unload()


def _find_tokenizer(tokenizer, *dirs):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    candidates = [Path(tokenizer)] if tokenizer is not None else [Path(d) for d in dirs if isinstance(d, (str, os.PathLike))]
    for d in candidates:
        if d.is_dir() and any((d / f).is_file() for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(d))
    return None


def merge_and_export(
    model_or_dir,
    out_dir: str | os.PathLike,
    *,
    format: str = "fp",
    record: RotationRecord | None = None,
    base_model=None,
    tokenizer=None,
    overwrite: bool = False,
    inplace: bool = False,
    transform_config: str | None = None,
    dtype: torch.dtype | None = None,
    not_servable_ok: bool = False,
) -> Path:
    """Verify the rotation record, merge LoRA in the rotated basis and write a checkpoint atomically.

    Args:
        model_or_dir: a rotated model (bare or ``PeftModel``), a peft adapter directory (Trainer checkpoints of a
            ``PeftModel`` included) or a rotated full checkpoint directory (FP or compressed-tensors export).
        out_dir: target directory; must not exist or be empty unless ``overwrite``.
        format: ``"fp"`` (standard safetensors; refuses a quantized model) or ``"compressed-tensors"`` (a model
            quantized with ``quantize_model_``, packed; see the module doc and :mod:`rolora_plugin.io.compressed`).
        record: the expected :class:`RotationRecord`; required for an adapter directory without
            ``rolora_rotation.json``, otherwise checked against what is found.
        base_model: for adapters: the base model (directory or loaded module); default: the adapter config's
            ``base_model_name_or_path``. A rotated base must carry the same record; an unrotated one is rotated
            from the record.
        tokenizer: tokenizer object or directory; default: the first source directory that has one.
        overwrite: replace a non-empty ``out_dir`` (the old content is removed only after the new one is complete).
        inplace: merge a live ``PeftModel`` in place (peft's ``merge_and_unload``) instead of on a deep copy.
        transform_config: where the compressed-tensors transform config goes. ``format="fp"``: ``"file"``
            (default, ``transform_config.json``), ``"config"`` (inside ``config.json``'s ``quantization_config``;
            loading then needs compressed-tensors) or ``"none"``. ``format="compressed-tensors"``: always
            ``"config"`` (where compressed-tensors and vLLM read it); other values are refused.
        dtype: dtype to load directory sources in.
        not_servable_ok: ``format="compressed-tensors"`` refuses a quantization no serving engine reproduces
            (:meth:`rolora_plugin.QuantConfig.engine_contract`: asymmetric or clipped activations, the 15-level
            grid, an int KV cache) unless this is True; the export record then says ``"servable": false`` and why.

    Returns:
        ``Path(out_dir)``.
    """
    mode = _check_format(format, transform_config)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    model, found, src_dirs = _load_source(model_or_dir, record, base_model, dtype)
    found.verify()
    tok = _find_tokenizer(tokenizer, *src_dirs)
    if format == COMPRESSED_FORMAT:
        _write_compressed_export(_quantized(model), found, out_dir, tok, overwrite, not_servable_ok)
    else:
        merged = _merged(model, inplace or bool(src_dirs))  # a model loaded here is ours to merge in place
        ct = transform_config_dict(found) if mode != "none" else None
        _write_export(merged, found, out_dir, tok, ct, mode, overwrite)
    what = "merged rotated model" if _has_adapter(model) else "rotated model"
    logger.info("exported %s to %s (format %s)", what, out_dir, format)
    return out_dir


def _check_format(format: str, transform_config: str | None) -> str:
    """Validate ``format`` / ``transform_config``; returns the transform-config mode to use."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if format == COMPRESSED_FORMAT:
        if transform_config not in (None, "config"):
            raise ValueError(
                f"format='compressed-tensors' always writes the transform config into config.json (where its consumers "
                f"read it); transform_config={transform_config!r} is not possible there"
            )
        return "config"
    if transform_config is None:
        return "file"
    if transform_config not in ("file", "config", "none"):
        raise ValueError(f"transform_config must be 'file', 'config' or 'none', got {transform_config!r}")
    return transform_config


def _has_adapter(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload")


def _write_export(model, record: RotationRecord, out_dir: Path, tokenizer, ct: dict | None, ct_mode: str, overwrite: bool) -> None:
    # create-exclusive unless overwrite: a folder that appears at out_dir while we stage is never replaced
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if ct is not None and ct_mode == "file":
            atomic_write_text(tmp / TRANSFORM_CONFIG_FILE, json.dumps(ct, indent=2, sort_keys=True) + "\n")
        elif ct is not None:
            embed_transform_config(tmp / "config.json", ct)
        seal_export(tmp, record)  # last: checksums of what was written


# ---------------------------------------------------------------------------------------------- compressed-tensors


def _quantized(model: nn.Module) -> tuple[nn.Module, object]:
    """``(model, QuantizationRecord)`` of a model ``format='compressed-tensors'`` can write, else a clear error."""
    if _has_adapter(model) or _fake_quant_active(model):
        raise QuantizationError(
            "format='compressed-tensors' writes a post-training quantized model: merge the LoRA adapters and remove QAT "
            "forwards first, then quantize_model_ (or use quantize_and_export)"
        )
    quant = get_quantization_record(model)
    if quant is None:
        raise QuantizationError(
            f"{type(model).__name__} is not quantized (no model.config.{QUANT_RECORD_KEY}); format='compressed-tensors' "
            "needs a model quantized with quantize_model_ (or use quantize_and_export), format='fp' writes it unquantized"
        )
    return model, quant


def _write_compressed_export(model_and_record, record: RotationRecord, out_dir: Path, tokenizer, overwrite: bool, not_servable_ok: bool) -> None:
    model, quant = model_and_record
    prepared = prepare_compressed(model, quant, record, not_servable_ok=not_servable_ok)  # packs and checks every linear before anything is staged
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_compressed(model, prepared, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        seal_export(tmp, record)  # last: checksums of what was written


def quantize_and_export(
    model_or_dir,
    out_dir: str | os.PathLike,
    quant_config=None,
    *,
    calibration=None,
    rotation=None,
    tokenizer=None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    not_servable_ok: bool = False,
) -> Path:
    """Rotate (unless rotated) → quantize → write a compressed-tensors checkpoint; what ``rolora quantize`` runs.

    Args:
        model_or_dir: a model (rotated or not; edited **in place**), a model directory (an original checkpoint, a
            rotated full-precision export or a peft adapter directory with its record: merged first).
        out_dir: the export folder (checked before any work; must not exist or be empty unless ``overwrite``).
        quant_config: :class:`rolora_plugin.QuantConfig` (default W4A4 RTN per channel).
        calibration: for ``method="gptq"``, the clip searches and a learning ``rotation``: ``input_ids`` tensors
            (batch, seq) or dicts for ``model(**batch)``.
        rotation: :class:`rolora_plugin.RotationConfig` for an unrotated model (default ``RotationConfig()``); a rotated
            model must carry this very config (None: accept its record).
        tokenizer / overwrite / dtype / not_servable_ok: as in :func:`merge_and_export`.

    Returns:
        ``Path(out_dir)``; ``load_rotated(out_dir)`` gives the quantized model back.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    model, src_dirs = _quantization_source(model_or_dir, dtype)
    _refuse_fused_experts(unwrap_peft(model))  # before rotating and quantizing: the export could not be written
    ensure_rotated(model, rotation, calibration=calibration, progress=progress)
    quantize_model_(model, quant_config, calibration, progress=progress)
    return merge_and_export(
        model, out_dir, format=COMPRESSED_FORMAT, tokenizer=_find_tokenizer(tokenizer, *src_dirs), overwrite=overwrite, not_servable_ok=not_servable_ok
    )


def _quantization_source(src, dtype) -> tuple[nn.Module, list]:
    """``(bare model, source dirs)``: a module (merged on a copy if it has adapters) or a loaded directory."""
    if isinstance(src, nn.Module):
        return (_merged(src, inplace=False) if _has_adapter(src) else src), []
    path = Path(src)
    if (path / "adapter_config.json").is_file():
        model, _, dirs = _load_adapter_dir(path, None, None, dtype)
        return _merged(model, inplace=True), dirs
    if not (path / "config.json").is_file():
        raise RotationError(f"{path} is neither a model checkpoint (config.json) nor a peft adapter (adapter_config.json)")
    if _read_json(path / "config.json", "model config").get(RECORD_KEY):
        return load_rotated(path, dtype), [path]
    return load_causal_lm(path, dtype), [path]
