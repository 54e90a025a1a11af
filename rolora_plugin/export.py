"""Merge LoRA in the rotated basis and export a standard checkpoint; load it back with its online rotations.

RoLoRA's adapters are trained on rotated weights, so they only make sense merged into *the same* rotation. The
official implementation re-draws R1 at export without the training seed and merges into a different basis; here
every merge first verifies the rotation record (seed, sign vectors' checksums, which rotations, model dims):

* a live model: ``model.config.rolora`` (written by :func:`rolora_plugin.rotate_model_`);
* a peft adapter directory (``adapter_config.json``, also Trainer checkpoints of a ``PeftModel``): the
  ``rolora_rotation.json`` written next to it by :class:`rolora_plugin.callbacks.RoLoRACallback`. Its base model
  (``base_model=`` or ``adapter_config.base_model_name_or_path``) is either a rotated checkpoint whose record
  must be identical, or the original model, which is rotated again from the record (bit-identical by seed) and
  then checked against it;
* a full checkpoint directory: its ``config.json`` record, and ``rolora_rotation.json`` if present (must agree).

A missing or mismatched record raises :class:`rolora_plugin.RotationError` before anything is written.

Output (written to a temporary directory next to ``out_dir`` and renamed into place, create-exclusive unless
``overwrite``), ``format="fp"`` (default): ``model.safetensors`` (+ shards), ``config.json`` carrying the record,
``generation_config.json``, the tokenizer when one is found, ``rolora_rotation.json`` and the online rotations as
a compressed-tensors ``transform_config`` (``transform_config.json``; see :mod:`rolora_plugin.compressed`).
:func:`load_rotated` reloads it with plain ``AutoModelForCausalLM.from_pretrained`` and re-installs the online
R4/R3 modules from the record. A quantized model is refused here (it would reload without its activation
quantizers).

``format="compressed-tensors"``: a model quantized with :func:`rolora_plugin.quant.quantize_model_` written as a
packed compressed-tensors checkpoint (int weights at their bit width + scales, ``quantization_config``,
``transform_config`` with exactly our R4/R3, ``rolora_quantization.json`` with checksums; layout in
:mod:`rolora_plugin.compressed`). :func:`load_rotated` verifies it, loads the exact dequantized weights and
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
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ._peft import unwrap_peft
from .compressed import (
    COMPRESSED_FORMAT,
    is_compressed_export,
    load_compressed,
    model_class,
    prepare_compressed,
    verify_compressed_export,
    write_compressed,
)
from .config import QUANT_RECORD_KEY
from .errors import QuantizationError
from .fingerprint import weights_fingerprint
from .learned import LEARNED_FILE, learned_names, load_learned, resolve_learned, save_learned
from .publish import OutputExistsError, atomic_output_dir, atomic_write_text, check_writable_parent
from .rotation import RECORD_KEY, RotationError, RotationRecord, get_rotation_record, install_online_rotations, rotate_model_
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
    "transform_config_dict",
    "write_rotation_record",
]

logger = logging.getLogger(__name__)
RECORD_FILE = "rolora_rotation.json"
FORMATS = ("fp", COMPRESSED_FORMAT)  # merge_and_export(format=...)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# ---------------------------------------------------------------------------------------------- record files


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
    """The record in ``<directory>/rolora_rotation.json``, or None if the file does not exist."""
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return RotationRecord.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise RotationError(f"{path} is not valid JSON ({e}); it should hold the dict written by rotate_model_") from None


def _require_same(a: RotationRecord, b: RotationRecord, what_a: str, what_b: str) -> None:
    if a != b:
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

    Full-precision export: plain ``AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)``.
    compressed-tensors export: first :func:`rolora_plugin.compressed.verify_compressed_export` (records, the
    ``quantization_config`` and every tensor's checksum; nothing is loaded if one disagrees), then the packed
    weights are dequantized exactly by compressed-tensors at load and the activation / KV quantizers of the
    ``rolora_quant`` record are re-installed. In both cases the record in the config is checked against
    ``rolora_rotation.json`` (when present) and :func:`rolora_plugin.install_online_rotations` re-creates the
    online R4/R3 modules (verifying the record's checksums). ``consumer_arithmetic=True``: the online rotations
    compute ``(x @ √n·R) / √n`` in float32 as compressed-tensors and vLLM's dense transform do (:func:`rolora_plugin.online.use_consumer_arithmetic_`),
    so 4-bit activation codes on a rounding tie round as the consumer's do (what :func:`rolora_plugin.check.check_export`
    compares against). Returns the model in eval mode.
    """
    if dtype is not None:
        kwargs["dtype"] = dtype
    early = read_rotation_record(path)
    # learned matrices are needed to verify the record (the compressed export checks it first); the registry holds
    # them weakly, so keep a reference until they are attached to the loaded model below
    _learned = load_learned(path, early) if early is not None else {}
    quant = verify_compressed_export(path) if is_compressed_export(path) else None
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
    install_online_rotations(model, record)
    if consumer_arithmetic:
        from .online import use_consumer_arithmetic_

        use_consumer_arithmetic_(model)
    if quant is not None:
        from .quant import install_activation_quantizers

        install_activation_quantizers(model, quant)
    if device is not None:
        model.to(device)
    return model.eval()


def _from_pretrained(path, quant, kwargs: dict) -> nn.Module:
    if quant is not None:
        return load_compressed(path, quant, **kwargs)
    return model_class(path).from_pretrained(path, **kwargs)


def _load_base(base_model, dtype) -> nn.Module:
    if isinstance(base_model, nn.Module):
        return base_model
    from transformers import AutoModelForCausalLM

    if base_model is None or not Path(base_model).exists():
        raise RotationError(
            f"the adapter's base model {base_model!r} is not a local directory; pass base_model=<rotated export or "
            "original model dir> (no hub downloads are attempted)"
        )
    return AutoModelForCausalLM.from_pretrained(base_model, **({"dtype": dtype} if dtype is not None else {}))


def _rotated_base(base: nn.Module, record: RotationRecord, base_name: str) -> nn.Module:
    """``base`` in the rotated basis of ``record``: checked if already rotated, rotated from the record if not."""
    base_record = get_rotation_record(base)
    if base_record is None:
        _check_base_fingerprint(base, record, base_name)
        logger.info("base model %s is not rotated: rotating it with the adapter's record (seed %d)", base_name, record.config.seed)
        rotate_model_(base, record.config, learned=resolve_learned(record, {}) if learned_names(record) else None)
        _require_same(get_rotation_record(base), record, f"base model {base_name} rotated from the record", "the adapter record")
    else:
        _require_same(base_record, record, f"base model {base_name}", "the adapter record")
        install_online_rotations(base, base_record)
    return base


def _check_base_fingerprint(base: nn.Module, record: RotationRecord, base_name: str) -> None:
    """Refuse an unrotated base whose weights are not the ones the adapter's record was made from."""
    if record.base_fingerprint is None:
        logger.warning("the adapter's rotation record has no base_fingerprint (older rolora-plugin): cannot check that %s is its base", base_name)
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
    record = record or file_record
    _learned = load_learned(path, file_record) if file_record is not None else {}  # alive until the base holds them
    if record is None:
        raise RotationError(
            f"{path} is a peft adapter without {RECORD_FILE}: nothing says which rotation it was trained in. Pass "
            "record=RotationRecord(...) from the training run (RoLoRACallback writes the file next to every adapter)."
        )
    base_name = base_model if base_model is not None else json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base = _rotated_base(_load_base(base_name, dtype), record, str(base_name))
    return PeftModel.from_pretrained(base, str(path)), record, [path, base_name]


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
    from .quant import fake_quant_active

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
            quantized with ``quantize_model_``, packed; see the module doc and :mod:`rolora_plugin.compressed`).
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
        write_rotation_record(tmp, record)
        if ct is not None and ct_mode == "file":
            atomic_write_text(tmp / TRANSFORM_CONFIG_FILE, json.dumps(ct, indent=2, sort_keys=True) + "\n")
        elif ct is not None:
            embed_transform_config(tmp / "config.json", ct)


# ---------------------------------------------------------------------------------------------- compressed-tensors


def _quantized(model: nn.Module) -> tuple[nn.Module, object]:
    """``(model, QuantizationRecord)`` of a model ``format='compressed-tensors'`` can write, else a clear error."""
    from .quant import get_quantization_record

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
        write_rotation_record(tmp, record)


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
    from .quant import quantize_model_
    from .rotation import ensure_rotated

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    model, src_dirs = _quantization_source(model_or_dir, dtype)
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
    if json.loads((path / "config.json").read_text()).get(RECORD_KEY):
        return load_rotated(path, dtype), [path]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **({"dtype": dtype} if dtype is not None else {})), [path]
