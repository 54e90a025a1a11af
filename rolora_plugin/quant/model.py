"""Model-level quantization: :func:`quantize_model_`, its record, and the activation / KV-cache quantizers.

:func:`quantize_model_` edits weights in place (fake-quantized floats, same dtype) with the weight method the
config names (a handler per method in :data:`WEIGHT_HANDLERS`: ``"rtn"`` → :mod:`.rtn`, ``"gptq"`` → :mod:`.gptq`),
and adds a forward-pre-hook on every quantized ``nn.Linear`` that fake-quantizes its input per token. That hook
is registered normally (not prepended), so it runs *after* rolora's online R4 Hadamard, which the MLP prepends to
``down_proj``'s hooks on every call (see :mod:`rolora_plugin.model.online`): the quantizer sees the rotated activation,
as the hardware would. KV-cache quantization fake-quantizes keys and values per head and token inside the
attention function (after RoPE and after R3) through :func:`rolora_plugin.model.online.add_attention_transform`.

Mixture-of-Experts experts (fused 3-D parameters, not ``nn.Linear``) are quantized per expert by :mod:`.moe`
(weights per expert and output channel/group; their inputs per token, the down_proj input after the online R4).

What was done is stored as a :class:`QuantizationRecord` dict under ``model.config.rolora_quant``
(:data:`rolora_plugin.config.QUANT_RECORD_KEY`); :func:`install_activation_quantizers` re-installs the runtime
quantizers of a loaded checkpoint from it.

Papers: RoLoRA (Huang et al., 2024), QuaRot (Ashkboos et al., 2024), GPTQ (Frantar et al., 2022).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

from .._peft import is_lora_layer
from ..config import QUANT_RECORD_KEY
from ..errors import QuantizationError
from ..model.architectures import get_architecture, get_submodule
from ..model.online import add_attention_transform, attention_transforms, remove_attention_transform
from .calibration import check_calibration, input_amax, search_activation_clips
from .config import QuantConfig
from .gptq import gptq_quantize_model_
from .moe import (
    check_experts,
    expert_modules,
    install_expert_activation_quantizers,
    remove_expert_activation_quantizers,
    routed_token_counts,
    rtn_quantize_experts_,
)
from .primitives import OFF_BITS, TensorQuant, fake_quant, nvfp4_global_scale
from .rtn import rtn_quantize_linear_
from .targets import quantizable_linears

__all__ = [
    "QuantizationRecord",
    "quantize_model_",
    "get_quantization_record",
    "install_activation_quantizers",
    "remove_activation_quantizers",
    "ActivationQuantizer",
    "KVQuantizer",
    "WEIGHT_HANDLERS",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
_ACT_ATTR = "_rolora_act_quant"
_KV_NAME = "kv_quant"


# ---------------------------------------------------------------------------------------------- runtime quantizers


class ActivationQuantizer:
    """Forward-pre-hook that fake-quantizes a Linear's first input with ``spec`` (dynamic; STE, so it also trains).

    ``global_scale``: NVFP4's calibrated ``input_global_scale`` (None: from each tensor's own max).
    """

    def __init__(self, spec: TensorQuant, global_scale: float | None = None):
        self.spec, self.global_scale = spec, global_scale

    def __call__(self, module, args):
        return (fake_quant(args[0], self.spec, ste=True, global_scale=self.global_scale),) + tuple(args[1:])

    def __repr__(self) -> str:
        return f"ActivationQuantizer({self.spec}, global_scale={self.global_scale})"


class KVQuantizer(nn.Module):
    """Attention transform ``(q, k, v) → (q, Q(k), Q(v))``: per head and token (over head_dim). No parameters."""

    def __init__(self, spec: TensorQuant):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v):
        return q, fake_quant(k, self.spec, ste=True), fake_quant(v, self.spec, ste=True)

    def extra_repr(self) -> str:
        return repr(self.spec)


# ---------------------------------------------------------------------------------------------- record


@dataclass
class QuantizationRecord:
    """What :func:`quantize_model_` did; stored as a dict under ``model.config.rolora_quant``.

    ``weight_error`` maps each quantized linear to ``‖W - Q(W)‖_F / ‖W‖_F``; ``a_clip_ratios`` maps a linear to
    the activation clip ratio searched for it (``QuantConfig.a_clip_search``); linears not in it use
    ``config.a_clip_ratio``. ``input_global_scales`` (NVFP4 activations) maps a linear to its calibrated per-tensor
    ``input_global_scale`` (``448·6 / max|x|`` over the calibration data). ``experts`` names the MoE experts modules quantized (:mod:`.moe`; their weight errors
    are under ``<name>.gate_up_proj`` / ``<name>.down_proj``); ``expert_tokens`` (GPTQ) maps each to the number of
    calibration tokens routed to every expert.
    """

    config: QuantConfig
    quantized: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    kv_layers: int = 0
    weight_error: dict = field(default_factory=dict)
    a_clip_ratios: dict = field(default_factory=dict)
    experts: list = field(default_factory=list)
    expert_tokens: dict = field(default_factory=dict)
    input_global_scales: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizationRecord":
        data = dict(data)
        if data.get("format_version") != FORMAT_VERSION:
            raise QuantizationError(f"quantization record format {data.get('format_version')} is not supported")
        data["config"] = QuantConfig.from_dict(data["config"])
        return cls(**data)

    def mean_weight_error(self) -> float:
        return sum(self.weight_error.values()) / max(1, len(self.weight_error))


def get_quantization_record(model_or_config) -> QuantizationRecord | None:
    """The :class:`QuantizationRecord` of a quantized model (or its config), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, QUANT_RECORD_KEY, None)
    return QuantizationRecord.from_dict(data) if data else None


# ---------------------------------------------------------------------------------------------- checks


def _check_model(model: nn.Module, config: QuantConfig, linears: dict) -> None:
    if get_quantization_record(model) is not None or any(_ACT_ATTR in m.__dict__ for m in linears.values()):
        raise QuantizationError(
            f"{type(model).__name__} is already quantized (model.config.{QUANT_RECORD_KEY} is set); quantizing twice "
            "would compound the rounding. Reload the full-precision model to quantize with another config."
        )
    for name, mod in model.named_modules():
        if is_lora_layer(mod):
            raise QuantizationError(
                f"{name} is a peft LoRA layer; quantize_model_ is post-training: merge the adapters first "
                "(model = model.merge_and_unload()), then quantize"
            )
    if not linears:
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear left to quantize (skip={list(config.skip)})")
    embeds = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, lin in linears.items():
        _check_linear(name, lin, config, embeds)


def _check_linear(name: str, lin: nn.Linear, config: QuantConfig, embed_ptrs: set) -> None:
    cols = lin.in_features
    if config.w_bits < OFF_BITS and config.w_group_size is not None and cols % config.w_group_size:
        divisors = [d for d in (32, 64, 128, 256) if cols % d == 0]
        raise QuantizationError(
            f"w_group_size={config.w_group_size} does not divide the input width {cols} of layer {name!r}; choose a "
            f"divisor of {cols} (e.g. {divisors or [cols]}) or per-channel scales (w_group_size=None), or add "
            f"{name.rsplit('.', 1)[-1]!r} to skip"
        )
    if config.w_bits < OFF_BITS and lin.weight.data_ptr() in embed_ptrs:
        raise QuantizationError(
            f"{name} shares its weight with the input embeddings (tied); quantizing it would quantize the embeddings "
            "too. Keep it in QuantConfig.skip, or untie the embeddings first"
        )
    if not lin.weight.is_floating_point():
        raise QuantizationError(f"{name} has a {lin.weight.dtype} weight; quantize_model_ needs a floating-point model")


# ---------------------------------------------------------------------------------------------- weight methods


def _rtn_weights(model: nn.Module, config: QuantConfig, linears: dict, calibration, progress: bool) -> dict:
    errors = {name: rtn_quantize_linear_(lin, config) for name, lin in linears.items()}
    errors.update(rtn_quantize_experts_(expert_modules(model, config), config))  # MoE: per expert
    return errors


def _gptq_weights(model: nn.Module, config: QuantConfig, linears: dict, calibration, progress: bool) -> dict:
    if calibration is None:
        raise QuantizationError("method='gptq' needs calibration data: pass calibration=[input_ids tensors or dicts]")
    if not (config.gptq_quantized_inputs and config.a_bits < OFF_BITS):
        return gptq_quantize_model_(model, config, calibration, progress=progress)
    # activation quantizers registered before GPTQ's Hessian hooks run first: H is taken from Q(X)
    specs = {n: config.activation_spec(n) for n in linears}
    handles = [lin.register_forward_pre_hook(ActivationQuantizer(specs[n])) for n, lin in linears.items() if not specs[n].off]
    try:
        return gptq_quantize_model_(model, config, calibration, progress=progress)
    finally:
        for h in handles:
            h.remove()


# method → handler(model, config, {name: Linear}, calibration, progress) → {name: ‖W − Ŵ‖_F / ‖W‖_F}; edits in place
WEIGHT_HANDLERS: dict[str, Callable[..., dict]] = {"rtn": _rtn_weights, "gptq": _gptq_weights}  # keys: WEIGHT_METHODS


# ---------------------------------------------------------------------------------------------- entry point


def quantize_model_(model: nn.Module, config: QuantConfig | None = None, calibration=None, *, progress: bool = True) -> QuantizationRecord:
    """Quantize ``model`` in place: weights (RTN or GPTQ), per-token activations of linear inputs, KV cache.

    Args:
        model: a causal LM (rotated or not). Every ``nn.Linear`` not in ``config.skip`` is quantized; embeddings
            and skipped linears (``lm_head`` by default) stay in high precision.
        config: :class:`QuantConfig` (default W4A4 RTN per channel).
        calibration: for GPTQ, an iterable of ``input_ids`` tensors (batch, seq) or of dicts accepted by
            ``model(**batch)``. Ignored by RTN.
        progress: tqdm bars.

    Returns:
        The :class:`QuantizationRecord`, also stored in ``model.config.rolora_quant``.

    Example::

        >>> record = quantize_model_(model, QuantConfig(w_bits=4, a_bits=8))  # doctest: +SKIP
    """
    config = config or QuantConfig()
    linears, skipped = quantizable_linears(model, config)
    _check_model(model, config, linears)
    experts = expert_modules(model, config)
    check_experts(experts, config)
    calibration = check_calibration(model, calibration)
    record = QuantizationRecord(config=config, quantized=list(linears), skipped=skipped, experts=list(experts))
    if config.w_bits < OFF_BITS:
        record.weight_error = WEIGHT_HANDLERS[config.method](model, config, linears, calibration, progress)
        record.expert_tokens = routed_token_counts(experts)
    searched = {n: lin for n, lin in linears.items() if config.activation_bits(n) < OFF_BITS}
    if config.a_clip_search and searched:
        specs = {n: config.activation_spec(n, 1.0) for n in searched}
        record.a_clip_ratios = search_activation_clips(
            model, searched, calibration, specs, candidates=config.a_clip_candidates, apply_ratio=config.a_clip_ratio, progress=progress
        )
    if config.a_format == "nvfp4" and searched:
        if calibration is None:
            raise QuantizationError(
                "NVFP4 activations need a calibrated per-linear input_global_scale: pass calibration=[input_ids ...] "
                "to quantize_model_ (a few hundred tokens of representative text)"
            )
        amax = input_amax(model, searched, calibration, progress=progress)
        record.input_global_scales = {n: float(nvfp4_global_scale(a)) for n, a in amax.items()}
    install_activation_quantizers(model, record)
    setattr(model.config, QUANT_RECORD_KEY, record.to_dict())
    logger.info(
        "quantized %d linears of %s (%s, %s); mean relative weight error %.4f; kept %s in high precision",
        len(linears), type(model).__name__, config.label(), config.method,
        record.mean_weight_error(), skipped,
    )  # fmt: skip
    return record


def install_activation_quantizers(model: nn.Module, record: QuantizationRecord) -> None:
    """(Re)install the activation and KV-cache quantizers that ``record`` describes (weights are not touched).

    Used by :func:`quantize_model_` and after loading a quantized checkpoint, whose weights are already fake-quantized.
    """
    cfg = record.config
    remove_activation_quantizers(model)
    for name in record.quantized:
        spec = cfg.activation_spec(name, record.a_clip_ratios.get(name, cfg.a_clip_ratio))
        if not spec.off:
            lin = model.get_submodule(name)
            hook = ActivationQuantizer(spec, record.input_global_scales.get(name))
            lin.__dict__[_ACT_ATTR] = (hook, lin.register_forward_pre_hook(hook))
    install_expert_activation_quantizers(model, record.experts, cfg, record.a_clip_ratios)
    record.kv_layers = _install_kv_quantizers(model, cfg) if cfg.kv_bits < OFF_BITS else 0


def _install_kv_quantizers(model: nn.Module, cfg: QuantConfig) -> int:
    spec = get_architecture(model)
    layers = spec.decoder_layers(model)
    for layer in layers:
        quantizer = KVQuantizer(cfg.kv_spec())
        add_attention_transform(get_submodule(layer, spec.attention), _KV_NAME, quantizer, model.config)
    return len(layers)


def remove_activation_quantizers(model: nn.Module) -> None:
    """Remove every activation / KV quantizer installed by rolora (weights stay as they are)."""
    remove_expert_activation_quantizers(model)
    for module in model.modules():
        entry = module.__dict__.pop(_ACT_ATTR, None)
        if entry is not None:
            entry[1].remove()
        if _KV_NAME in attention_transforms(module):
            remove_attention_transform(module, _KV_NAME)
