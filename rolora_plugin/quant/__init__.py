"""Weight-activation quantization, in layers that import only downward:

* :mod:`.primitives` — tensor maths: integer grids, scales, ``quantize_weight`` / ``quantize_activation`` (one
  fake-quant function per tensor kind, ``ste=True`` for the straight-through estimator), MSE clip search.
* :mod:`.config` — :class:`QuantConfig` (held by :class:`rolora_plugin.QATConfig` and :class:`rolora_plugin.MonitorConfig`).
* :mod:`.rtn`, :mod:`.gptq` — weight quantizers of one linear / of a model's linears (GPTQ with calibration data).
* :mod:`.targets` — which linears a config quantizes.
* :mod:`.calibration` — calibrated activation clipping (a clip ratio per linear searched on calibration data).
* :mod:`.model` — :func:`quantize_model_` (a handler per weight method), its :class:`QuantizationRecord`, the
  activation and KV-cache quantizers.
* :mod:`.qat` — the fake-quantized training forward (:func:`enable_fake_quant_`, :func:`fake_quantized`).

Every public name is importable from ``rolora_plugin.quant``.
"""

from ..config import QUANT_RECORD_KEY
from ..errors import QuantizationError
from .calibration import DEFAULT_A_CLIP_CANDIDATES, ClipErrorMeter, check_calibration, search_activation_clips
from .config import WEIGHT_METHODS, QuantConfig
from .gptq import (
    HessianAccumulator,
    capture_layer_inputs,
    gptq_quantize_model_,
    gptq_quantize_weight,
    gptq_quantize_weight_ref,
)
from .model import (
    FORMAT_VERSION,
    WEIGHT_HANDLERS,
    ActivationQuantizer,
    KVQuantizer,
    QuantizationRecord,
    get_quantization_record,
    install_activation_quantizers,
    quantize_model_,
    remove_activation_quantizers,
)
from .primitives import (
    OFF_BITS,
    compute_scales,
    fake_quantize_activation,
    fake_quantize_weight,
    mse_clip_search,
    quant_range,
    quantize_activation,
    quantize_weight,
    quantize_with_scales,
    weight_scales,
)
from .qat import ALL_LINEAR, FakeQuantHandle, enable_fake_quant_, fake_quant_active, fake_quantized, fused_expert_modules
from .rtn import WeightQuantParams, replace_weight_, rtn_quantize_linear_, weight_quant_params
from .targets import is_skipped, quantizable_linears

__all__ = [
    "ALL_LINEAR",
    "ActivationQuantizer",
    "ClipErrorMeter",
    "DEFAULT_A_CLIP_CANDIDATES",
    "FORMAT_VERSION",
    "FakeQuantHandle",
    "HessianAccumulator",
    "KVQuantizer",
    "OFF_BITS",
    "QUANT_RECORD_KEY",
    "QuantConfig",
    "QuantizationError",
    "QuantizationRecord",
    "WEIGHT_HANDLERS",
    "WEIGHT_METHODS",
    "WeightQuantParams",
    "capture_layer_inputs",
    "check_calibration",
    "compute_scales",
    "enable_fake_quant_",
    "fake_quant_active",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "fake_quantized",
    "fused_expert_modules",
    "get_quantization_record",
    "gptq_quantize_model_",
    "gptq_quantize_weight",
    "gptq_quantize_weight_ref",
    "install_activation_quantizers",
    "is_skipped",
    "mse_clip_search",
    "quant_range",
    "quantizable_linears",
    "quantize_activation",
    "quantize_model_",
    "quantize_weight",
    "quantize_with_scales",
    "remove_activation_quantizers",
    "replace_weight_",
    "rtn_quantize_linear_",
    "search_activation_clips",
    "weight_quant_params",
    "weight_scales",
]
