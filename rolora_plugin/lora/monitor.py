"""Host-free maths of the quantization-aware training monitor: activation statistics and fake-quant eval loss.

What :class:`~rolora_plugin.integrations.hf_trainer.RoLoRACallback` logs every ``MonitorConfig.every_n_steps``,
computed here from a model and a few batches, so any training loop can call it:

* **activation statistics** of the linear inputs (kurtosis ``κ = E[(x-μ)⁴] / E[(x-μ)²]²``, Gaussian = 3, and
  ``max|x|``), one value per *input kind* (the family's
  :meth:`~rolora_plugin.model.architectures.ArchitectureSpec.input_kinds`: linears reading the same tensor share one)
  summarised over the decoder layers: ``rolora/kurtosis/<kind>_in/{mean,max}``, ``rolora/max_abs/<kind>_in/max``,
  plus ``rolora/{kurtosis,max_abs}/layer<i>/<kind>_in`` for chosen layers. Always measured in full precision,
  also while QAT forwards are installed.
* **fake-quant eval loss**: the token-weighted mean next-token NLL (:func:`rolora_plugin.metrics.mean_loss`) in
  full precision and with every decoder-layer linear fake-quantized (weights ``W + sBA`` and per-token
  activations, RTN): ``rolora/eval_loss_fp`` and ``rolora/eval_loss_w<w>a<a>``, what merging and
  ``quantize_model_`` with the same bits would give.

Batches are dicts with ``input_ids`` (batch, seq) and optionally ``labels`` / ``attention_mask``, or bare
``input_ids`` tensors. :class:`BatchCapture` keeps copies of the first batches a model is called with, for runs
that give the monitor no eval data. Nothing here imports a host framework.

Example::

    >>> metrics = monitor_metrics(model, [input_ids], MonitorConfig(layers=[0]))  # doctest: +SKIP
    >>> metrics["rolora/eval_loss_w4a4"] - metrics["rolora/eval_loss_fp"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .._peft import unwrap_peft
from ..metrics import as_batch, eval_mode, mean_loss
from ..model.architectures import get_architecture
from ..quant import fake_quantized, fused_expert_modules
from .kurtosis import activation_stats, layer_index, leaf_name

__all__ = ["BatchCapture", "activation_metrics", "fake_quant_eval_metrics", "measured_kinds", "monitor_metrics"]

logger = logging.getLogger(__name__)
_KEEP = ("input_ids", "attention_mask", "labels")


def measured_kinds(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(kinds, exclude)``: the input kinds measured (leaf names, one per distinct linear input of a layer) and
    the module-name fragments left out of the statistics (the LM head and the linears sharing a kind's input)."""
    spec = get_architecture(unwrap_peft(model))
    kinds = spec.input_kinds()
    return kinds, ("lm_head",) + tuple("." + leaf for leaf in spec.linear_names() if leaf not in kinds)


def _summaries(kind_values: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    out = {}
    for kind, vals in kind_values.items():
        if vals:
            out[f"rolora/kurtosis/{kind}_in/mean"] = sum(k for k, _ in vals) / len(vals)
            out[f"rolora/kurtosis/{kind}_in/max"] = max(k for k, _ in vals)
            out[f"rolora/max_abs/{kind}_in/max"] = max(m for _, m in vals)
    return out


def activation_metrics(model: nn.Module, batches: list, layers=()) -> dict[str, float]:
    """Kurtosis / max-abs of the linear inputs per input kind (mean/max over layers), plus ``layers`` one by one.

    Measured with full-precision forwards (QAT forwards, if installed, are bypassed for the measurement).
    """
    kinds, exclude = measured_kinds(model)
    device = next(model.parameters()).device
    with fake_quantized(model, None):
        stats = activation_stats(model, [as_batch(b, device) for b in batches], exclude=exclude, progress=False)
    per_kind: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    out = {}
    for name, s in stats.items():
        kind, idx = leaf_name(name), layer_index(name)
        if kind not in per_kind or math.isnan(s["kurtosis"]):
            continue
        per_kind[kind].append((s["kurtosis"], s["max_abs"]))
        if idx in layers:
            out[f"rolora/kurtosis/layer{idx}/{kind}_in"] = s["kurtosis"]
            out[f"rolora/max_abs/layer{idx}/{kind}_in"] = s["max_abs"]
    return {**out, **_summaries(per_kind)}


def fake_quant_eval_metrics(model: nn.Module, batches: list, quant) -> dict[str, float]:
    """Eval loss in full precision and fake-quantized with ``quant`` (a :class:`~rolora_plugin.quant.QuantConfig`).

    Returns ``{"rolora/eval_loss_fp": L_fp, "rolora/eval_loss_w<w>a<a>": L_q}``, each a token-weighted mean NLL.
    """
    with fake_quantized(model, None):
        fp = mean_loss(model, batches)
    with fake_quantized(model, quant):
        q = mean_loss(model, batches)
    return {"rolora/eval_loss_fp": fp, f"rolora/eval_loss_w{quant.w_bits}a{quant.a_bits}": q}


def monitor_metrics(model: nn.Module, batches: list, monitor) -> dict[str, float]:
    """Everything ``monitor`` (a :class:`~rolora_plugin.lora.config.MonitorConfig`) asks for, in eval mode
    without gradients (the previous train/eval mode is restored)."""
    out = {}
    with eval_mode(model):
        if monitor.activation_stats:
            out.update(activation_metrics(model, batches, monitor.layers))
        if monitor.fake_quant_eval and not _skip_fake_quant_eval(model):
            out.update(fake_quant_eval_metrics(model, batches, monitor.quant))
    return out


def _skip_fake_quant_eval(model: nn.Module) -> bool:
    """MoE experts are not reached by fake quant (see :func:`~rolora_plugin.quant.fused_expert_modules`): the
    W4A4 eval loss is left out rather than logged under a wrong label (warned once per model)."""
    moe = fused_expert_modules(model)
    if moe and not getattr(model, "_rolora_warned_moe_monitor", False):
        logger.warning(
            "monitor: no fake-quant eval loss for this MoE model (fused experts, e.g. %s, cannot be fake-quantized "
            "during training); activation statistics are still logged", moe[0]
        )
        model.__dict__["_rolora_warned_moe_monitor"] = True
    return bool(moe)


class BatchCapture:
    """Forward-pre-hook (with kwargs) keeping detached copies of the first ``n`` batches ``model`` is called with.

    Keeps the ``input_ids`` / ``attention_mask`` / ``labels`` tensors of each call; removes itself once it holds
    ``n`` batches (or on :meth:`remove`).
    """

    def __init__(self, model: nn.Module, n: int):
        self.batches: list[dict] = []
        self.n = n
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if len(self.batches) < self.n and "input_ids" in kwargs:
            self.batches.append({k: kwargs[k].detach().clone() for k in _KEEP if isinstance(kwargs.get(k), torch.Tensor)})
        if len(self.batches) >= self.n:
            self.remove()

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
