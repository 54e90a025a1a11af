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

Output (written to a temporary directory next to ``out_dir`` and renamed into place): ``model.safetensors``
(+ shards), ``config.json`` carrying the record, ``generation_config.json``, the tokenizer when one is found,
``rolora_rotation.json`` and ``transform_config.json`` (below). :func:`load_rotated` reloads it with plain
``AutoModelForCausalLM.from_pretrained`` and re-installs the online R4/R3 modules from the record.

compressed-tensors ``transform_config``. The online parts of the rotation (R4 on ``down_proj``'s input, R3 on
queries/keys after RoPE) are described in compressed-tensors 0.20's format, so serving stacks reading that
format can apply them; the merged rotations (R1, R2, R4's weight side) are already in the weights. Verified
on CPU with the library (tests/test_export.py): plain load + ``apply_transform_config`` reproduces
:func:`load_rotated`'s logits. What it does **not** support, and what we do about it:

* its ``hadamard`` type is the Sylvester matrix, powers of two only. Widths that are not a power of two (e.g.
  intermediate 1536 in SmolLM2, 11008 in LLaMA-2-7B: Paley/Kronecker or orthogonal-fallback factors) have no
  equivalent there (``random-hadamard`` / ``random-matrix`` draw from compressed-tensors' own RNG). Then **no**
  transform config is written at all (a partial one would silently give a wrong model) and a warning says so;
  ``rolora_rotation.json`` + :func:`load_rotated` remain exact.
* its ``q_attn`` / ``k_cache`` locations hook the attention function and fail with transformers 5.23's
  ``eager`` attention (``KeyError: 'eager'``); use ``attn_implementation="sdpa"`` to apply R3 with it.
* transformers 5.23 ignores ``transform_config`` when loading, and a ``quantization_config`` in
  ``config.json`` makes plain ``from_pretrained`` require compressed-tensors. The default
  ``transform_config="file"`` therefore writes ``transform_config.json`` beside the weights; ``"config"`` embeds
  it as ``config.json → quantization_config.transform_config`` (what ``ModelCompressor.update_config`` writes).

Example::

    >>> out = merge_and_export(peft_model, "export/")          # doctest: +SKIP
    >>> model = load_rotated("export/")                        # same logits as peft_model  # doctest: +SKIP
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
from .architectures import get_architecture
from .config import QUANT_RECORD_KEY
from .publish import OutputExistsError, atomic_output_dir, atomic_write_text, check_writable_parent
from .fingerprint import weights_fingerprint
from .rotation import RECORD_KEY, RotationError, RotationRecord, get_rotation_record, install_online_rotations, rotate_model_

__all__ = [
    "RECORD_FILE",
    "TRANSFORM_CONFIG_FILE",
    "merge_and_export",
    "load_rotated",
    "write_rotation_record",
    "read_rotation_record",
    "transform_config_dict",
    "load_with_compressed_tensors",
]

logger = logging.getLogger(__name__)
RECORD_FILE = "rolora_rotation.json"
TRANSFORM_CONFIG_FILE = "transform_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# ---------------------------------------------------------------------------------------------- record files


def write_rotation_record(directory: str | os.PathLike, record: RotationRecord) -> Path:
    """Write ``record`` as ``<directory>/rolora_rotation.json`` atomically; returns the path."""
    path = Path(directory) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
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


def load_rotated(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None, **kwargs) -> nn.Module:
    """Load a rotated checkpoint (e.g. from :func:`merge_and_export`) with its online rotations rebuilt.

    Plain ``AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)``, then the record in its config is
    checked against ``rolora_rotation.json`` (when present) and :func:`rolora_plugin.install_online_rotations`
    re-creates the online R4/R3 modules (verifying the record's checksums). Returns the model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    record = get_rotation_record(model)
    if record is None:
        raise RotationError(
            f"{path} holds no rotation record (config.json has no {RECORD_KEY!r} entry): it is not a rotated "
            "checkpoint. Load it with AutoModelForCausalLM.from_pretrained, or rotate it with rotate_model_."
        )
    if getattr(model.config, QUANT_RECORD_KEY, None):
        raise RotationError(
            f"{path} holds fake-quantized weights exported as full precision (config.json has {QUANT_RECORD_KEY!r}) but "
            "no activation quantizers: loading it would silently give a different model. Re-export the quantized "
            "model with format='compressed-tensors', or export the full-precision model."
        )
    file_record = read_rotation_record(path)
    if file_record is not None:
        _require_same(file_record, record, f"{path}/{RECORD_FILE}", f"{path}/config.json")
    install_online_rotations(model, record)
    if device is not None:
        model.to(device)
    return model.eval()


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
        rotate_model_(base, record.config)
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
    record: RotationRecord | None = None,
    base_model=None,
    tokenizer=None,
    overwrite: bool = False,
    inplace: bool = False,
    transform_config: str = "file",
    dtype: torch.dtype | None = None,
) -> Path:
    """Verify the rotation record, merge LoRA in the rotated basis and write a standard checkpoint atomically.

    Args:
        model_or_dir: a rotated model (bare or ``PeftModel``), a peft adapter directory (Trainer checkpoints of a
            ``PeftModel`` included) or a rotated full checkpoint directory.
        out_dir: target directory; must not exist or be empty unless ``overwrite``.
        record: the expected :class:`RotationRecord`; required for an adapter directory without
            ``rolora_rotation.json``, otherwise checked against what is found.
        base_model: for adapters: the base model (directory or loaded module); default: the adapter config's
            ``base_model_name_or_path``. A rotated base must carry the same record; an unrotated one is rotated
            from the record.
        tokenizer: tokenizer object or directory; default: the first source directory that has one.
        overwrite: replace a non-empty ``out_dir`` (the old content is removed only after the new one is complete).
        inplace: merge a live ``PeftModel`` in place (peft's ``merge_and_unload``) instead of on a deep copy.
        transform_config: ``"file"`` (``transform_config.json``), ``"config"`` (inside ``config.json``'s
            ``quantization_config``; loading then needs compressed-tensors) or ``"none"``. See the module doc.
        dtype: dtype to load directory sources in.

    Returns:
        ``Path(out_dir)``.
    """
    if transform_config not in ("file", "config", "none"):
        raise ValueError(f"transform_config must be 'file', 'config' or 'none', got {transform_config!r}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    model, found, src_dirs = _load_source(model_or_dir, record, base_model, dtype)
    found.verify()
    merged = _merged(model, inplace or bool(src_dirs))  # a model loaded here is ours to merge in place
    tok = _find_tokenizer(tokenizer, *src_dirs)
    ct = transform_config_dict(found) if transform_config != "none" else None
    _write_export(merged, found, out_dir, tok, ct, transform_config, overwrite)
    what = "merged rotated model" if _has_adapter(model) else "rotated model"
    logger.info("exported %s to %s", what, out_dir)
    return out_dir


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
            _embed_transform_config(tmp / "config.json", ct)


# ---------------------------------------------------------------------------------------------- compressed-tensors


def _is_sylvester(t) -> bool:
    """True if the transform is exactly compressed-tensors' ``hadamard`` (normalised Sylvester, no signs)."""
    return t.dense is None and t.signs is None and t.pow2 == t.n


def _scheme(location_targets: list[tuple[str, str]], head_dim: int | None = None) -> dict:
    apply = [{"targets": [target], "location": loc, "inverse": False, "ignore": []} for loc, target in location_targets]
    return {"type": "hadamard", "apply": apply, "randomize": False, "requires_grad": False, "head_dim": head_dim}


def transform_config_dict(record: RotationRecord) -> dict | None:
    """The online rotations of ``record`` as a compressed-tensors ``TransformConfig`` dict, or None.

    None when there is no online rotation, or when one of them has no compressed-tensors equivalent (width not
    a power of two; see the module doc) — a partial description would give a wrong model, so none is given.
    Validated with compressed-tensors' pydantic models when the library is installed.
    """
    from .architectures import architecture_by_name

    transforms = record.verify()
    spec = architecture_by_name(record.family)
    groups, unsupported = {}, []
    if "r4" in transforms:
        target = "re:.*" + spec.down_proj.replace(".", r"\.") + "$"
        groups["rolora_r4"] = _scheme([("input", target)])
        unsupported += [] if _is_sylvester(transforms["r4"]) else [f"r4 ({transforms['r4'].description})"]
    if "r3" in transforms:
        target = "re:.*" + spec.attention.replace(".", r"\.") + "$"
        groups["rolora_r3"] = _scheme([("q_attn", target), ("k_cache", target)], head_dim=record.dims.head_dim)
        unsupported += [] if _is_sylvester(transforms["r3"]) else [f"r3 ({transforms['r3'].description})"]
    if unsupported:
        logger.warning(
            "no compressed-tensors transform_config written: %s has no compressed-tensors equivalent (its 'hadamard' "
            "type is a power-of-two Sylvester matrix). rolora_rotation.json + load_rotated stay exact.", ", ".join(unsupported)
        )  # fmt: skip
        return None
    if not groups:
        return None
    config = {"config_groups": groups}
    _validate_with_compressed_tensors(config)
    return config


def _validate_with_compressed_tensors(config: dict) -> None:
    try:
        from compressed_tensors.transform import TransformConfig
    except ImportError:
        logger.info("compressed-tensors not installed: transform_config written without validation")
        return
    TransformConfig.model_validate(config)


def _embed_transform_config(config_path: Path, ct: dict) -> None:
    import compressed_tensors

    data = json.loads(config_path.read_text())
    data["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": compressed_tensors.__version__,
        "sparsity_config": {},
        "transform_config": ct,
    }
    atomic_write_text(config_path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _require_compressed_tensors():
    try:
        from compressed_tensors.transform import TransformConfig, apply_transform_config
    except ImportError:
        raise ImportError(
            "compressed-tensors is needed for this: pip install 'compressed-tensors>=0.20' (or rolora-plugin[export])"
        ) from None
    return TransformConfig, apply_transform_config


def load_with_compressed_tensors(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load an export the way a compressed-tensors consumer would: plain weights + ``apply_transform_config``.

    No rolora code touches the forward: the online rotations come from the export's ``transform_config`` only
    (file or ``config.json``), applied by compressed-tensors with ``sdpa`` attention (its q/k hooks do not
    support ``eager``). Used to check that the transform config is right; raises if the export has none.
    """
    from transformers import AutoModelForCausalLM

    TransformConfig, apply_transform_config = _require_compressed_tensors()
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    ct = cfg.get("quantization_config", {}).get("transform_config")
    if ct is None and (path / TRANSFORM_CONFIG_FILE).is_file():
        ct = json.loads((path / TRANSFORM_CONFIG_FILE).read_text())
    if ct is None:
        raise RotationError(f"{path} has no compressed-tensors transform_config (see rolora_plugin.export's module doc)")
    kwargs = {"attn_implementation": "sdpa", **({"dtype": dtype} if dtype is not None else {})}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    get_architecture(model)  # clear error for a family we do not know
    apply_transform_config(model, TransformConfig.model_validate(ct))
    return model.eval()
