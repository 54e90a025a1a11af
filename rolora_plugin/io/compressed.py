"""``format="compressed-tensors"``: a quantized rotated model as a packed compressed-tensors checkpoint, and back.

Written by :func:`rolora_plugin.io.export.merge_and_export` and read back by :func:`rolora_plugin.io.export.load_rotated`;
the online rotations go into ``quantization_config.transform_config`` (:mod:`rolora_plugin.io.transform_config`).

The weights use compressed-tensors' ``pack-quantized`` format, written with its own ``PackedQuantizationCompressor``.
For every quantized linear ``NAME``:

* ``NAME.weight_packed`` int32 (out, ceil(in·b/32)): the integer codes, 32/b per word;
* ``NAME.weight_scale`` (out, n_groups), the scales RTN/GPTQ used (:class:`rolora_plugin.quant.rtn.WeightQuantParams`,
  float32; float64 for float64 models), ``NAME.weight_shape`` int64 ``[out, in]``;
* ``NAME.weight_zero_point`` int32, packed along dim 0 (asymmetric weights only).

Our asymmetric grid ``[0, 2^b − 1]`` is shifted to compressed-tensors' signed one: ``q' = q − 2^(b−1)``,
``z' = z − 2^(b−1)``, so ``(q' − z') · s = (q − z) · s`` exactly. Every linear is checked at export:
compressed-tensors' own ``decompress`` must give the fake-quantized weight bit for bit, or nothing is written.
``config.json → quantization_config`` (``ModelCompressor.update_config``) describes weights (bits, channel/group,
sym), ``input_activations`` (bits, per token, dynamic), the KV cache (``kv_cache_scheme``: dynamic, one group per
head and token), ``ignore`` (``lm_head`` and every skipped linear) and the ``transform_config``.
``rolora_quantization.json`` holds the quantization record and the sha256 of every tensor; :func:`verify_compressed_export`
checks both before anything is loaded.

What a compressed-tensors consumer does **not** reproduce: its dynamic symmetric activation scale is
``max|x| / (2^(b−1) − ½)`` (7.5 for 4 bits), ours ``max|x| / (2^(b−1) − 1)`` (7); clip ratios below 1 have no field.
The ``rolora_quant`` record is authoritative; :func:`rolora_plugin.io.export.load_rotated` re-installs our quantizers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import QUANT_RECORD_KEY
from ..errors import QuantizationError, RotationError
from ..quant.model import QuantizationRecord
from ..quant.primitives import OFF_BITS, round_e4m3
from ..quant.qat import fused_expert_modules
from ..quant.rtn import WeightQuantParams, set_weight_quant_params_, weight_quant_params
from ..rotate.learned import LEGACY_LEARNED_FILE
from ..rotate.rotation import RotationRecord
from .loading import EXPORT_SIDE_KEYS, load_causal_lm, model_class, read_json_object  # noqa: F401  (re-exported for callers of compressed)
from .publish import atomic_write_text
from .transform_config import require_compressed_tensors, stored_transform_weights, transform_config_dict

__all__ = [
    "COMPRESSED_FORMAT",
    "QUANT_RECORD_FILE",
    "CompressedExport",
    "is_compressed_export",
    "load_compressed",
    "model_class",
    "prepare_compressed",
    "quantization_config_dict",
    "check_servable",
    "tensor_digests",
    "verify_compressed_export",
    "write_compressed",
]

logger = logging.getLogger(__name__)
COMPRESSED_FORMAT = "compressed-tensors"
QUANT_RECORD_FILE = "rolora_quantization.json"
_GROUP = "group_0"
_RECORD_VERSION = 1
_IGNORED_KEYS = ("version",)  # quantization_config keys that do not describe the model


# ---------------------------------------------------------------------------------------------- quantization config


_PACK_FORMAT = {"int": "pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
_FP4_PRESET = {"nvfp4": "NVFP4", "mxfp4": "MXFP4"}  # compressed-tensors' own scheme presets define the FP4 args


def _fp4_args(fmt: str, kind: str) -> dict:
    from compressed_tensors.quantization import preset_name_to_scheme

    return getattr(preset_name_to_scheme(_FP4_PRESET[fmt], ["Linear"]), kind).model_dump()


def _weights_args(cfg) -> dict:
    if cfg.w_format != "int":
        return _fp4_args(cfg.w_format, "weights")
    strategy = "channel" if cfg.w_group_size is None else "group"
    return {"num_bits": cfg.w_bits, "type": "int", "symmetric": cfg.w_sym, "strategy": strategy, "group_size": cfg.w_group_size, "dynamic": False}


def _dynamic_args(bits: int, sym: bool, group_size: int | None = None) -> dict:
    strategy = "token" if group_size is None else "group"
    return {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy, "group_size": group_size, "dynamic": True}


def _activation_args(cfg) -> dict | None:
    if cfg.a_bits >= OFF_BITS:
        return None
    if cfg.a_format != "int":
        return _fp4_args(cfg.a_format, "input_activations")
    return _dynamic_args(cfg.a_bits, cfg.a_sym, cfg.a_group_size)


def check_servable(record: QuantizationRecord, not_servable_ok: bool) -> dict:
    """The record's engine contract (:meth:`QuantConfig.engine_contract`); refuses a non-servable one unless allowed.

    A compressed-tensors checkpoint looks servable to every engine that reads the format; one whose numerics an
    engine would not reproduce (asymmetric or clipped activations, the 15-level grid, an int KV cache) must be
    asked for explicitly (``not_servable_ok=True``; the record then says ``"servable": false`` and why).
    """
    contract = record.config.engine_contract()
    if not contract["servable"]:
        if not not_servable_ok:
            raise QuantizationError(
                "this quantization is not servable: " + "; ".join(contract["reasons"]) + ". A compressed-tensors "
                "checkpoint of it would look servable but vLLM / compressed-tensors would compute another model. Use a "
                "servable preset (QuantConfig.preset('w4a4-int' | 'nvfp4' | 'mxfp4' | 'w4a8'); CLI --recipe), or "
                "write it anyway for load_rotated only with not_servable_ok=True (CLI --not-servable-ok)."
            )
        logger.warning("writing a NOT servable compressed-tensors checkpoint (%s): only load_rotated computes its numbers", "; ".join(contract["reasons"]))
    return contract


def _check_exportable(record: QuantizationRecord) -> None:
    cfg = record.config
    if cfg.w_bits > 8:
        raise QuantizationError(
            f"format='compressed-tensors' packs integer weights of 1-8 bits; this model has w_bits={cfg.w_bits}. "
            "Quantize the weights to at most 8 bits (e.g. QuantConfig(w_bits=4))."
        )
    searched = sorted({r for r in (getattr(record, "a_clip_ratios", None) or {}).values() if r != 1.0})
    if cfg.a_clip_ratio != 1.0 or cfg.kv_clip_ratio != 1.0 or searched:
        logger.warning(
            "compressed-tensors has no field for activation/KV clip ratios (a %s, kv %s, per-linear searched %s): its "
            "consumers quantize activations unclipped; load_rotated applies them from the rolora_quant record",
            cfg.a_clip_ratio, cfg.kv_clip_ratio, searched or "none",
        )  # fmt: skip


def quantization_config_dict(record: QuantizationRecord, head_dim: int, transform_config: dict | None, targets=("Linear",)) -> dict:
    """``config.json → quantization_config`` for ``record`` as ``ModelCompressor.update_config`` writes it (less ``version``).

    ``targets``: compressed-tensors targets of the one config group (``["Linear"]`` with ``ignore`` = the skipped
    linears, or the explicit names of the quantized linears). ``head_dim`` sets the KV group (one per head and token).
    """
    from compressed_tensors.quantization import QuantizationConfig

    cfg = record.config
    group = {
        "targets": list(targets),
        "weights": _weights_args(cfg),
        "input_activations": _activation_args(cfg),
        "output_activations": None,
        "format": _PACK_FORMAT[cfg.w_format],
    }
    kv = _dynamic_args(cfg.kv_bits, cfg.kv_sym, head_dim) if cfg.kv_bits < OFF_BITS else None
    qc = QuantizationConfig.model_validate(
        {"config_groups": {_GROUP: group}, "format": _PACK_FORMAT[cfg.w_format], "quantization_status": "compressed",
         "ignore": sorted(record.skipped), "kv_cache_scheme": kv}
    )  # fmt: skip
    transform = _dumped_transform_config(transform_config)
    out = {"quant_method": COMPRESSED_FORMAT, "sparsity_config": {}, "transform_config": transform}
    return _jsonable({**out, **qc.model_dump(exclude=["quant_method"])})


def _dumped_transform_config(config: dict | None) -> dict:
    """``config`` as ``TransformConfig.model_dump()`` writes it (defaults filled in), {} for None."""
    from compressed_tensors.transform import TransformConfig

    return _jsonable(TransformConfig.model_validate(config).model_dump()) if config else {}


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _targets_for(model: nn.Module, record: QuantizationRecord) -> list[str]:
    """``["Linear"]`` when compressed-tensors' class match minus ``ignore`` is exactly the quantized set, else the names."""
    from compressed_tensors.utils import match_named_modules

    matched = [name for name, _ in match_named_modules(model, ["Linear"], sorted(record.skipped))]
    return ["Linear"] if matched == list(record.quantized) else sorted(record.quantized)


# ---------------------------------------------------------------------------------------------- packing


def _scheme_of(qconfig: dict):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme.model_validate(qconfig["config_groups"][_GROUP])


def _module_state(name: str, lin: nn.Module, record: QuantizationRecord) -> dict[str, torch.Tensor]:
    """compressed-tensors' per-module state before packing: ``weight``, ``weight_scale`` (+ signed ``weight_zero_point``)."""
    cfg, params = record.config, weight_quant_params(lin)
    if params is None:
        raise QuantizationError(
            f"{name} has no recorded quantization scales (quantized by an older rolora-plugin, or its weight was replaced "
            "after quantize_model_); reload the full-precision model and run quantize_model_ again"
        )
    if (params.bits, params.group_size, params.sym, params.format) != (cfg.w_bits, cfg.w_group_size, cfg.w_sym, cfg.w_format):
        raise QuantizationError(f"{name} was quantized with {params} but the record says {cfg}; re-run quantize_model_")
    scale = params.scale.to(lin.weight.device)
    if params.format == "nvfp4":  # stored: the FP8 group scale S = s·G (exact: s = S/G rounded, S has 3 mantissa bits)
        gscale = params.global_scale.to(device=scale.device, dtype=torch.float32).reshape(1)
        state = {"weight": lin.weight.detach(), "weight_scale": round_e4m3(scale.float() * gscale), "weight_global_scale": gscale}
        return state
    state = {"weight": lin.weight.detach(), "weight_scale": scale.contiguous()}
    if not cfg.w_sym:
        state["weight_zero_point"] = (params.zero - 2 ** (cfg.w_bits - 1)).to(device=lin.weight.device, dtype=torch.int8)
    return state


def _pack_linear(name: str, lin: nn.Module, record: QuantizationRecord, scheme) -> dict[str, torch.Tensor]:
    """Packed tensors of one linear; raises unless compressed-tensors' decompression gives its weight bit for bit."""
    from compressed_tensors.compressors import BaseCompressor

    Packer = BaseCompressor.get_value_from_registry(_PACK_FORMAT[record.config.w_format])
    packed = Packer.compress(_module_state(name, lin, record), scheme)
    if name in record.input_global_scales:  # NVFP4 activations: the calibrated static global scale
        packed["input_global_scale"] = torch.tensor([record.input_global_scales[name]], dtype=torch.float32)
    if record.config.w_format != "int":
        return _checked_fp4(name, lin, record, packed, Packer.decompress(dict(packed), scheme)["weight"])
    back = Packer.decompress(packed, scheme)["weight"].to(lin.weight.dtype)
    if not torch.equal(back, lin.weight.detach()):
        bad = (back != lin.weight.detach()).sum().item()
        raise QuantizationError(
            f"{name}: {bad} weights are not on their quantization grid (changed after quantize_model_?); packing would "
            "change the model. Re-run quantize_model_ on the full-precision model."
        )
    return {k: v.detach().cpu().contiguous() for k, v in packed.items()}


def fp4_dequantized(packed: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    """Exact float32 FP4 weights ``e2m1 code × s`` from compressed-tensors' packed uint8 codes and the effective scales
    s (out, n_groups). compressed-tensors 0.20's decompressor returns them rounded to bf16 (its
    ``unpack_fp4_from_uint8`` dtype); FP4 GEMM kernels use the exact product, so this is what rolora loads."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    codes = unpack_fp4_from_uint8(packed, shape[0], shape[1], dtype=torch.float32)
    return (codes.reshape(shape[0], scale.shape[1], -1) * scale.float().unsqueeze(-1)).reshape(shape)


def _checked_fp4(name: str, lin: nn.Module, record: QuantizationRecord, packed: dict, decompressed: torch.Tensor) -> dict:
    """FP4: the packed codes × our scales give the weight bit for bit, and compressed-tensors' own decompression gives it
    rounded to its output dtype (bf16), bit for bit; otherwise nothing is written."""
    params = weight_quant_params(lin)
    w = lin.weight.detach()
    exact = fp4_dequantized(packed["weight_packed"], params.scale, tuple(w.shape)).to(w.dtype)
    if not torch.equal(exact, w) or not torch.equal(decompressed, w.to(decompressed.dtype)):
        bad = (exact != w).sum().item()
        raise QuantizationError(
            f"{name}: {bad} weights are not on their {record.config.w_format} grid (changed after quantize_model_?); packing "
            "would change the model. Re-run quantize_model_ on the full-precision model."
        )
    return {k: v.detach().cpu().contiguous() for k, v in packed.items()}


@dataclass
class CompressedExport:
    """Everything :func:`write_compressed` writes, computed (and checked) before the output folder is staged."""

    state_dict: dict  # the model's state dict, each quantized linear's ``weight`` replaced by its packed tensors
    quantization_config: dict  # config.json → quantization_config (less ``version``)
    quant_record: dict  # model.config.rolora_quant as it is (also in config.json), copied into rolora_quantization.json
    transform_weights: dict = field(default_factory=dict)  # stored transform matrices (in the model's weight files)
    engine: dict = field(default_factory=dict)  # QuantConfig.engine_contract(): servable?, vLLM scheme, reasons


def _refuse_fused_experts(model: nn.Module) -> None:
    experts = fused_expert_modules(model)
    if experts:
        raise QuantizationError(
            f"format='compressed-tensors' packs nn.Linear weights; this MoE model's fused experts (e.g. {experts[0]}, "
            "3-D parameters) have no compressed-tensors layout here yet. Export it in full precision "
            "(merge_and_export(..., format='fp')) and quantize after loading (load_rotated + quantize_model_)."
        )


def prepare_compressed(model: nn.Module, record: QuantizationRecord, rotation: RotationRecord, *, not_servable_ok: bool = False) -> CompressedExport:
    """Pack every quantized linear of ``model`` (the state dict to save) and build its ``quantization_config``."""
    require_compressed_tensors()
    contract = check_servable(record, not_servable_ok)
    _check_exportable(record)
    _refuse_fused_experts(model)
    transform = transform_config_dict(rotation, stored=True)
    qconfig = quantization_config_dict(record, rotation.dims.head_dim, transform, _targets_for(model, record))
    scheme = _scheme_of(qconfig)
    state = dict(model.state_dict())
    for name in record.quantized:
        packed = _pack_linear(name, model.get_submodule(name), record, scheme)
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": value for key, value in packed.items()})
    return CompressedExport(state, qconfig, getattr(model.config, QUANT_RECORD_KEY), stored_transform_weights(rotation, model), contract)


def write_compressed(model: nn.Module, export: CompressedExport, directory: Path) -> None:
    """Write ``export`` into ``directory`` (a staging folder): weights, ``quantization_config``, stored transforms,
    and ``rolora_quantization.json`` with the record and every tensor's sha256."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig

    # stored transform matrices go into the model's own weight files (and index): vLLM reads a side file only when the
    # checkpoint has no safetensors index, and silently leaves the transform uninitialised otherwise
    model.save_pretrained(str(directory), state_dict={**export.state_dict, **export.transform_weights})
    transform = export.quantization_config["transform_config"]
    qconfig = {k: v for k, v in export.quantization_config.items() if k not in ("transform_config", "sparsity_config")}
    compressor = ModelCompressor(
        quantization_config=QuantizationConfig.model_validate(qconfig),
        transform_config=TransformConfig.model_validate(transform) if transform else None,
    )
    compressor.update_config(str(directory))
    body = {"format_version": _RECORD_VERSION, "quantization": export.quant_record, "tensors": tensor_digests(directory), "engine": export.engine}
    atomic_write_text(directory / QUANT_RECORD_FILE, json.dumps(body, indent=2, sort_keys=True) + "\n")


def tensor_digests(directory: Path) -> dict[str, str]:
    """``{tensor name: sha256 of (dtype, shape, bytes)}`` over every ``*.safetensors`` file of ``directory``."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        if path.name == LEGACY_LEARNED_FILE:  # learned rotations: verified by their own sha256 in the rotation record
            continue
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(key).contiguous()
                h = hashlib.sha256(f"{path.name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                out[key] = h.hexdigest()[:32]
    return out


# ---------------------------------------------------------------------------------------------- reading back


def _read_json(path: Path, what: str) -> dict:
    """:func:`rolora_plugin.io.loading.read_json_object` raising :class:`QuantizationError` (the export's own files)."""
    return read_json_object(path, what, QuantizationError)


def is_compressed_export(path: str | os.PathLike) -> bool:
    """True if ``path/config.json`` describes a quantized compressed-tensors checkpoint (non-empty config groups)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    qc = _read_json(config, "model config").get("quantization_config") or {}
    return qc.get("quant_method") == COMPRESSED_FORMAT and bool(qc.get("config_groups"))


def verify_compressed_export(path: str | os.PathLike) -> QuantizationRecord:
    """Check a compressed export before loading anything; returns its :class:`QuantizationRecord`.

    Raises :class:`~rolora_plugin.QuantizationError` when ``rolora_quantization.json`` is missing, its record differs
    from ``config.json``'s ``rolora_quant``, ``quantization_config`` is not the one the record describes, or a tensor
    (packed weights, scales, stored transforms, anything else) differs from the checksum written at export.
    """
    path = Path(path)
    config = _read_json(path / "config.json", "model config")
    if not (path / QUANT_RECORD_FILE).is_file():
        raise QuantizationError(
            f"{path} is a compressed-tensors checkpoint without {QUANT_RECORD_FILE}: nothing says how it was quantized. "
            "Load it with transformers (AutoModelForCausalLM.from_pretrained), or re-export it with rolora-plugin."
        )
    body = _read_json(path / QUANT_RECORD_FILE, "quantization record")
    record = _check_records(path, body, config)
    rotation = RotationRecord.from_dict(config["rolora"]) if config.get("rolora") else None
    if rotation is None:
        raise RotationError(f"{path}/config.json holds no rotation record: it is not a rolora-plugin export")
    _check_quantization_config(path, config["quantization_config"], record, rotation)
    _check_digests(path, body.get("tensors") or {})
    return record


def _check_records(path: Path, body: dict, config: dict) -> QuantizationRecord:
    if body.get("format_version") != _RECORD_VERSION or not isinstance(body.get("quantization"), dict):
        raise QuantizationError(f"{path}/{QUANT_RECORD_FILE} is not a quantization record this version reads")
    if config.get(QUANT_RECORD_KEY) != body["quantization"]:
        raise QuantizationError(
            f"the quantization record in {path}/{QUANT_RECORD_FILE} differs from config.json's {QUANT_RECORD_KEY!r}: the "
            "export was edited; re-export the quantized model"
        )
    return QuantizationRecord.from_dict(body["quantization"])


def _check_quantization_config(path: Path, found: dict, record: QuantizationRecord, rotation: RotationRecord) -> None:
    targets = ((found.get("config_groups") or {}).get(_GROUP) or {}).get("targets") or ["Linear"]
    if targets not in (["Linear"], sorted(record.quantized)):
        targets = ["Linear"]
    expected = quantization_config_dict(record, rotation.dims.head_dim, transform_config_dict(rotation, stored=True), targets)
    found = _jsonable({k: v for k, v in found.items() if k not in _IGNORED_KEYS})
    if found != expected:
        diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise QuantizationError(
            f"{path}/config.json's quantization_config disagrees with the quantization and rotation records (keys {diff}); "
            "a consumer would run a different model than the one exported. Re-export the quantized model."
        )


def _check_digests(path: Path, expected: dict) -> None:
    found = tensor_digests(path)
    changed = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise QuantizationError(
            f"{path}: tensors differ from the checksums written at export ({shown}); the weights were modified or "
            "truncated. Re-export the quantized model."
        )


@contextlib.contextmanager
def export_side_keys_expected(path: str | os.PathLike):
    """While loading ``path`` with transformers, its :data:`EXPORT_SIDE_KEYS` are expected, not "UNEXPECTED" (the
    model class's ``_keys_to_ignore_on_load_unexpected``, restored afterwards). Yields the concrete model class."""
    cls = model_class(path)
    if hasattr(cls, "_model_mapping"):  # an Auto class: the concrete one for this config
        from transformers import AutoConfig

        cls = cls._model_mapping[type(AutoConfig.from_pretrained(str(path)))]
    own = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", _ABSENT)
    cls._keys_to_ignore_on_load_unexpected = [*(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []), *EXPORT_SIDE_KEYS]
    try:
        yield cls
    finally:
        if own is _ABSENT:
            del cls._keys_to_ignore_on_load_unexpected
        else:
            cls._keys_to_ignore_on_load_unexpected = own


_ABSENT = object()


def load_compressed(path: str | os.PathLike, record: QuantizationRecord, **kwargs) -> nn.Module:
    """Dense model with the exact dequantized weights (transformers + compressed-tensors' decompression at load),
    each quantized linear carrying its :class:`WeightQuantParams` again; no quantizer or rotation installed yet."""
    from transformers import CompressedTensorsConfig

    require_compressed_tensors()
    with warnings.catch_warnings(), export_side_keys_expected(path) as cls:
        # "the quantization_config from the model will be used": what we ask for
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model = load_causal_lm(path, model_cls=cls, expected_unexpected=EXPORT_SIDE_KEYS,
                               quantization_config=CompressedTensorsConfig(dequantize=True), **kwargs)  # fmt: skip
    _attach_params(model, Path(path), record)
    return model


def _attach_params(model: nn.Module, path: Path, record: QuantizationRecord) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    cfg = record.config
    kinds = ("weight_scale", "weight_zero_point", "weight_global_scale", "weight_packed")
    wanted = {_checkpoint_key(model, f"{name}.{kind}"): f"{name}.{kind}" for name in record.quantized for kind in kinds}
    tensors = {}
    for file in sorted(path.glob("model*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({wanted[k]: f.get_tensor(k) for k in f.keys() if k in wanted})  # noqa: SIM118
    for name in record.quantized:
        if cfg.w_format != "int":  # exact float32 weights from the codes (the decompressor rounds them to bf16)
            lin = model.get_submodule(name)
            params = _fp4_params(cfg, tensors, name)
            with torch.no_grad():
                lin.weight.copy_(fp4_dequantized(tensors[f"{name}.weight_packed"], params.scale, tuple(lin.weight.shape)))
            set_weight_quant_params_(lin, params)
            continue
        scale = tensors[f"{name}.weight_scale"]
        zero = torch.zeros_like(scale)
        if not cfg.w_sym:
            signed = unpack_from_int32(tensors[f"{name}.weight_zero_point"], cfg.w_bits, scale.shape, packed_dim=0)
            zero = signed.to(scale.dtype) + 2 ** (cfg.w_bits - 1)
        set_weight_quant_params_(model.get_submodule(name), WeightQuantParams(cfg.w_bits, cfg.w_group_size, cfg.w_sym, scale, zero))


def _fp4_params(cfg, tensors: dict, name: str) -> WeightQuantParams:
    """The effective FP4 scales as quantization used them: NVFP4 ``S / G`` (compressed-tensors' order), MXFP4 ``2^(e−127)``."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale

    raw = tensors[f"{name}.weight_scale"]
    if cfg.w_format == "nvfp4":
        gscale = tensors[f"{name}.weight_global_scale"].float()
        scale = raw.float() / gscale
    else:
        gscale, scale = None, decompress_mx_scale(raw).float()
    return WeightQuantParams.of(cfg, scale, torch.zeros_like(scale), gscale)


def _checkpoint_key(model: nn.Module, key: str) -> str:
    """The name transformers gives the module-named ``key`` in the files it saves (e.g. LLaVA's legacy prefixes)."""
    from transformers.core_model_loading import revert_weight_conversion

    return next(iter(revert_weight_conversion(model, {key: torch.empty(0)})))


