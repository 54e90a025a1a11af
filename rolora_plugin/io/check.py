"""Consumer-side check of a compressed-tensors export: the format's own code computes the model, we compare.

:func:`consumer_model` loads an export **only** through compressed-tensors 0.20 and transformers, as a consumer
does: transformers decompresses the packed weights with compressed-tensors' own decompressors
(``CompressedTensorsConfig(dequantize=True)``), compressed-tensors' ``apply_quantization_config`` attaches its
quantized forward from ``config.json → quantization_config`` (dynamic activation quantization with *its* grids,
NVFP4's ``input_global_scale`` read from the checkpoint), and ``apply_transform_config`` builds the online
rotations from ``transform_config`` and the stored matrices. No rolora code runs in that model's forward.

:func:`check_export` runs it beside :func:`rolora_plugin.load_rotated` (``consumer_arithmetic=True``: online
rotations in the consumer's float32 dense arithmetic) on the same tokens and reports the logit difference,
argmax agreement and both perplexities, with the export's engine contract (servable?, vLLM scheme).

Why the consumer's arithmetic: a dynamic 4-bit activation code that sits on a rounding tie (the full int grid puts
``±max`` exactly on ±7.5) flips with a 1e-7 change of the rotation's float rounding, and a tiny model's logits
then move by ~1%. With the same arithmetic the int and MXFP4 exports agree bit for bit.

What it cannot make equal, exactly: compressed-tensors 0.20 decompresses FP4 weights through
``unpack_fp4_from_uint8(..., dtype=torch.bfloat16)``, so its NVFP4 weights are ``bf16(q · S/G)`` (MXFP4's
power-of-two scales keep them exact). vLLM's FP4 GEMMs use the codes and scales themselves. The check therefore
reports NVFP4 twice: against our exact model, and against ours with the weights rounded to bf16 as that decompressor
does (``bf16_weights``), which must agree bit for bit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import QuantizationError
from ..metrics import perplexity
from .compressed import EXPORT_SIDE_KEYS, QUANT_RECORD_FILE, _read_json, export_side_keys_expected
from .export import load_rotated
from .loading import load_causal_lm
from .transform_config import _load_transform_weights

__all__ = ["check_export", "consumer_model"]

logger = logging.getLogger(__name__)


def consumer_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device=None) -> nn.Module:
    """An export loaded and run by compressed-tensors' own code only (module docstring). Eval mode."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = Path(path)
    qc = dict(_read_json(path / "config.json", "model config").get("quantization_config") or {})
    if not qc.get("config_groups"):
        raise QuantizationError(f"{path} is not a quantized compressed-tensors export (no quantization_config.config_groups)")
    transform = qc.pop("transform_config", None)
    qc.pop("sparsity_config", None)
    with export_side_keys_expected(path):  # stored transforms / input_global_scale are loaded below, by compressed-tensors' modules
        model = load_causal_lm(path, dtype, model_cls=AutoModelForCausalLM, expected_unexpected=EXPORT_SIDE_KEYS,
                               attn_implementation="sdpa", quantization_config=CompressedTensorsConfig(dequantize=True))  # fmt: skip
    apply_quantization_config(model, QuantizationConfig.model_validate(qc))
    static = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            static.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(".input_global_scale")})  # noqa: SIM118
    for name, mod in model.named_modules():
        if getattr(mod, "quantization_scheme", None) is not None:
            mod.quantization_status = QuantizationStatus.COMPRESSED  # weights are the decompressed ones: no re-quantization
            if f"{name}.input_global_scale" in static:
                mod.input_global_scale.data.copy_(static[f"{name}.input_global_scale"])
    if transform:
        apply_transform_config(model, TransformConfig.model_validate(transform))
        _load_transform_weights(model, path)
    if device is not None:
        model.to(device)  # on CUDA compressed-tensors quantizes activations with its Triton kernels
    return model.eval()


@torch.no_grad()
def _logits(model: nn.Module, chunks: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model(input_ids=c.unsqueeze(0).to(device)).logits.float().cpu() for c in chunks])


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {
        "rel_err": float((a - b).norm() / b.norm().clamp_min(1e-30)),
        "max_abs_logit_diff": float((a - b).abs().max()),
        "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


def check_export(path: str | os.PathLike, chunks: torch.Tensor, *, progress: bool = False, device=None, bf16: bool = False) -> dict:
    """Logits of compressed-tensors' forward of ``path`` against ``load_rotated`` on ``chunks`` (n, seq) token ids.

    Returns ``{"engine": {...}, "consumer": {rel_err, max_abs_logit_diff, argmax_agreement}, "ppl": {"rolora",
    "consumer"}, "format": ...}`` and for NVFP4 also ``"bf16_weights"`` (module docstring). ``device``: where both
    models run (e.g. ``"cuda"``: compressed-tensors' Triton quantization kernels against our PyTorch path).
    ``bf16``: also the perplexity of compressed-tensors' forward in bfloat16 (``ppl["consumer_bf16"]``), the dtype
    engines serve in (our numbers are fp32).
    """
    body = _read_json(Path(path) / QUANT_RECORD_FILE, "quantization record")
    ours = load_rotated(path, consumer_arithmetic=True, attn_implementation="sdpa", device=device)
    theirs = consumer_model(path, device=device)
    fmt = body["quantization"]["config"].get("w_format", "int")
    a, b = _logits(theirs, chunks), _logits(ours, chunks)
    out = {
        "format": fmt,
        "engine": body.get("engine") or {},
        "consumer": _compare(a, b),
        "ppl": {"rolora": perplexity(ours, chunks, progress=progress), "consumer": perplexity(theirs, chunks, progress=progress)},
    }
    if bf16:
        out["ppl"]["consumer_bf16"] = perplexity(consumer_model(path, torch.bfloat16, device), chunks, progress=progress)
    if fmt == "nvfp4":
        _round_quantized_weights_to_bf16(ours, body["quantization"]["quantized"])
        out["bf16_weights"] = _compare(a, _logits(ours, chunks))
    return out


def _round_quantized_weights_to_bf16(model: nn.Module, names) -> None:
    for name in names:
        w = model.get_submodule(name).weight
        w.data.copy_(w.data.to(torch.bfloat16).to(w.dtype))
