"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2022).

For a Linear ``y = x Wᵀ`` with calibration inputs X (n tokens, in), GPTQ quantizes W one input column at a time
and spreads each column's rounding error over the columns not yet quantized so as to minimise
``‖X Wᵀ − X Ŵᵀ‖²``. With ``H = (2/n) XᵀX + λI`` (``λ = damp · mean(diag H)``) and ``U`` the upper Cholesky factor
of ``H⁻¹`` (``H⁻¹ = UᵀU``), column ``j`` is quantized as ``q_j = Q(w_j)`` and the rest is updated by
``W[:, j:] −= ((w_j − q_j) / U_jj) · U[j, j:]``; this equals the textbook OBS update
``W[:, j+1:] −= (w_j − q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_{j, j+1:}`` over the remaining columns F
(:func:`gptq_quantize_weight_ref`, the float64 reference the tests compare against). Updates are applied lazily per
block of ``block_size`` columns. Options:

* ``act_order``: columns processed by decreasing ``diag H``. With groups we use **static groups**: the scales of
  every group are computed from the (unpermuted) weight before any update, so groups stay contiguous in the
  original column order (same storage layout as RTN groups). Without act-order, group scales are computed when
  the sweep reaches the group's first column, from the already-updated weights (GPTQ's default); blocks are
  aligned to whole groups so those weights are exact.
* clip search: scales from :func:`rolora_plugin.quant.mse_clip_search` (per row, or per group when it starts).
* dead inputs (``H_jj = 0``): ``H_jj ← 1`` and the column set to 0, as in the reference code.

Pipeline (:func:`gptq_quantize_model_`): one forward of the model's **own** ``forward`` per calibration batch
captures the hidden states entering the first decoder layer and the exact keyword arguments every layer receives
(``position_embeddings``, the per-layer attention mask, ``position_ids``, ...), through
``register_forward_pre_hook(..., with_kwargs=True)``; a hook on the last layer stops the forward before the
LM head. Then layer by layer: forward-pre-hooks on each ``nn.Linear`` accumulate ``H`` from the Linear's actual
input — *after* rolora's online R4 Hadamard, which the MLP prepends to ``down_proj``'s hooks — the linears are
quantized (in call order with ``true_sequential``: q/k/v, then o, then gate/up, then down, re-running the layer in
between), and the layer is re-run with quantized weights to produce the next layer's inputs. Mixture-of-Experts
layers: after the layer's linears, the experts' input and the router's choice are captured
(:func:`rolora_plugin.quant.moe.routed_inputs`) and each expert gets its own Hessians: ``gate_up_proj[e]`` from the
tokens routed to ``e``, then ``down_proj[e]`` from ``_apply_gate(X_e · Q(gate_up[e])ᵀ)`` (after the online R4);
an expert with no routed token is RTN-quantized with a warning. As in QuaRot, the
Hessians use full-precision activations (activation quantizers are installed after the weights).

Why our own code and not a library (metadata of the current PyPI releases, read with pip): ``auto-gptq`` 0.7.1
(last release 2024-03) predates transformers 5 and builds CUDA extensions; ``gptqmodel`` 7.7.0 is an sdist with
C++/CUDA extensions and requires torch>=2.14.1 (we run 2.13); ``llmcompressor`` 0.14 pins ``transformers<=5.17``
and ``compressed-tensors==0.19`` (we use 5.23 and 0.20) and pulls auto-round, accelerate, nvidia-ml-py. None would
leave the environment intact on a CPU box, and we need control of where the Hessian is taken (after our online
rotation). The algorithm itself is ~100 lines.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import QuantizationError
from ..model.architectures import get_architecture
from .config import QuantConfig
from .moe import expert_modules, quantize_expert_rows_, routed_inputs, rtn_expert_, set_routed_token_counts
from .primitives import (
    OFF_BITS,
    TensorQuant,
    compute_qparams,
    nvfp4_global_scale,
    quant_range,
    quantize_with_params,
)
from .primitives import (
    clip_search as _clip_search,
)
from .rtn import WeightQuantParams, replace_weight_, rtn_quantize_linear_, set_weight_quant_params_
from .targets import quantizable_linears

__all__ = [
    "HessianAccumulator",
    "capture_layer_inputs",
    "gptq_quantize_model_",
    "gptq_quantize_weight",
    "gptq_quantize_weight_ref",
]

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early once the needed inputs are captured."""


# ---------------------------------------------------------------------------------------------- maths


class HessianAccumulator:
    """Running ``H = (2/n) Σ_t x_t x_tᵀ`` over all n tokens seen; x: (..., in). Accumulated in ``dtype``."""

    def __init__(self, in_features: int, device=None, dtype=torch.float32):
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.hessian.shape[0]).to(self.hessian.dtype)
        m = x.shape[0]
        if m == 0:
            return
        self.hessian *= self.count / (self.count + m)
        self.count += m
        self.hessian += (2.0 / self.count) * (x.T @ x)


def _prepare(w: torch.Tensor, hessian: torch.Tensor, damp: float):
    """Working copies: W in the compute dtype, H in float64 with dead inputs fixed; returns (W, H, damping)."""
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's input width {w.shape[1]}")
    W = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32).clone()
    H = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, damp * torch.mean(torch.diag(H))


def _scales(W: torch.Tensor, spec: TensorQuant, clip_search: dict | None, global_scale):
    """Per-row (s, z), each (rows, 1), for the columns of W (rows, k), with optional clip search."""
    if clip_search:
        ratio = _clip_search(W, spec, global_scale=global_scale, **clip_search)  # W is one group wide (or per channel)
        spec = spec.with_clip(ratio.reshape(-1, 1))
    return compute_qparams(W, spec, global_scale=global_scale)


def _static_scales(W: torch.Tensor, spec: TensorQuant, clip_search, global_scale):
    """Scales of every group before any update: lists of (s, z) per group (one entry when per channel)."""
    g = spec.group_size or W.shape[1]
    if W.shape[1] % g:
        raise ValueError(f"group_size {spec.group_size} does not divide the input width {W.shape[1]}")
    return [_scales(W[:, i : i + g], spec, clip_search, global_scale) for i in range(0, W.shape[1], g)]


def _spec_of(bits, group_size, sym, spec):
    return spec if spec is not None else TensorQuant("int", bits, sym, "narrow", group_size)


def gptq_quantize_weight(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    sym: bool = True,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip_search: dict | None = None,
    return_params: bool = False,
    spec: TensorQuant | None = None,
):
    """GPTQ-quantize a weight: w (out, in), hessian (in, in) → fake-quantized ``Ŵ`` (out, in), w's dtype/device.

    ``spec``: the weight's :class:`~rolora_plugin.quant.primitives.TensorQuant` (any format; it overrides
    ``bits``/``group_size``/``sym``, which describe a narrow-grid int spec when it is None). NVFP4's per-tensor global
    scale is taken from ``w`` before any update and stays fixed. ``clip_search``: None, or keyword arguments of
    :func:`~rolora_plugin.quant.primitives.clip_search` (grid, max_shrink, norm). See the module docstring for the
    update rule and the group / act-order choices. ``return_params=True`` returns ``(Ŵ, s, z, G)`` with the
    (effective) scales and zero points actually used, each (out, n_groups) in the compute dtype, such that
    ``Ŵ = Q(Ŵ; s, z)`` per group (groups in the original column order, also with act-order: static groups), and
    the NVFP4 global scale G (None for other formats).
    """
    spec = _spec_of(bits, group_size, sym, spec)
    group_size = spec.group_size
    W, H, lam = _prepare(w, hessian, damp)
    gscale = nvfp4_global_scale(W.abs().amax().float()) if spec.format == "nvfp4" else None
    cols = W.shape[1]
    static = _static_scales(W, spec, clip_search, gscale) if (act_order or group_size is None) else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += lam * torch.eye(cols, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(W.dtype)
    g = group_size or cols
    block = g * max(1, block_size // g) if group_size else block_size  # groups never straddle blocks
    Q = torch.zeros_like(W)
    scale = zero = None
    found = static if static is not None else [None] * (cols // g)  # (s, z) per group, original column order
    group_of = (perm // g).tolist()  # column (permuted order) -> its group, as Python ints for the sweep
    qmin, qmax = quant_range(spec.bits, spec.sym)
    diag = torch.diagonal(U).clone()
    flat = [(sc.reshape(-1), z.reshape(-1)) for sc, z in static] if static is not None else None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale, zero = flat[group_of[col]]
            elif col % g == 0:
                found[col // g] = _scales(W1[:, i : i + g], spec, clip_search, gscale)
                scale, zero = (t.reshape(-1) for t in found[col // g])
            w_col = W1[:, i]
            if spec.is_fp4:
                q = quantize_with_params(w_col, scale, zero, spec)
            else:  # quantize_with_params' integer ops, inlined (this loop runs once per input column)
                q = torch.div(w_col, scale).round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)
            Q[:, col] = q
            err = w_col.sub(q).div_(diag[col])
            W1[:, i:].addr_(err, U[col, col:i2], alpha=-1)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)].to(w.dtype)
    if not return_params:
        return Q
    return Q, torch.cat([s for s, _ in found], dim=1), torch.cat([z for _, z in found], dim=1), gscale


def gptq_quantize_weight_ref(w, hessian, bits, *, group_size=None, sym=True, damp=0.01, act_order=False, clip_search=None, spec=None):
    """Float64 reference of :func:`gptq_quantize_weight`: unblocked OBS updates with an explicit inverse.

    After quantizing column j of the remaining set F: ``W[:, F∖j] −= (w_j − q_j)/[H_F⁻¹]_jj · [H_F⁻¹]_{j,F∖j}`` and
    ``H_{F∖j}⁻¹ = H_F⁻¹ − [H_F⁻¹]_{:,j} [H_F⁻¹]_{j,:} / [H_F⁻¹]_jj`` (Frantar et al. 2022, eq. 2-3). O(in³) memory-light.
    """
    spec = _spec_of(bits, group_size, sym, spec)
    W, H, lam = _prepare(w.to(torch.float64), hessian, damp)
    gscale = nvfp4_global_scale(W.abs().amax().float()) if spec.format == "nvfp4" else None
    cols = W.shape[1]
    static = _static_scales(W, spec, clip_search, gscale) if (act_order or spec.group_size is None) else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm] + lam * torch.eye(cols, dtype=torch.float64, device=W.device)
    Hinv, g = torch.linalg.inv(H), spec.group_size or cols
    Q = torch.zeros_like(W)
    for j in range(cols):
        if static is not None:
            scale, zero = static[int(perm[j]) // g]
        elif j % g == 0:
            scale, zero = _scales(W[:, j : j + g], spec, clip_search, gscale)
        Q[:, j : j + 1] = quantize_with_params(W[:, j : j + 1], scale, zero, spec)
        d = Hinv[0, 0]
        W[:, j + 1 :] -= (W[:, j : j + 1] - Q[:, j : j + 1]) / d * Hinv[0:1, 1:]
        Hinv = Hinv[1:, 1:] - Hinv[1:, 0:1] @ Hinv[0:1, 1:] / d
    return Q[:, torch.argsort(perm)].to(w.dtype)


# ---------------------------------------------------------------------------------------------- model pipeline


def _as_kwargs(batch, device) -> dict:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    elif not isinstance(batch, Mapping):
        raise QuantizationError(
            f"calibration items must be input_ids tensors (batch, seq) or dicts for model(**batch), got {type(batch).__name__}"
        )
    out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(out.get("input_ids"), torch.Tensor) and out["input_ids"].dim() == 1:
        out["input_ids"] = out["input_ids"].unsqueeze(0)
    out.setdefault("use_cache", False)
    return out


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _stop(*_args, **_kwargs):
    raise _StopForward


def capture_layer_inputs(model: nn.Module, layers, batches: list[dict]):
    """Run ``model(**batch)`` and record, per batch, what enters the decoder layers.

    Returns ``(hidden, calls)``: ``hidden[b]`` the hidden states entering ``layers[0]`` (batch, seq, d) and
    ``calls[i][b] = (args, kwargs)`` the other arguments ``layers[i]`` received (kwargs kept whole:
    ``position_embeddings``, attention mask, ``position_ids``, ``cache_position``...).
    """
    hidden, calls = [], [[] for _ in layers]

    def recorder(i):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(h)
            calls[i].append((tuple(args[1:]), kwargs))

        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(_stop))
    try:
        for batch in batches:
            try:
                model(**batch)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


def _run_layer(layer, hidden, calls):
    return [_first(layer(h, *args, **kw)) for h, (args, kw) in zip(hidden, calls)]


def _call_stages(layer, linears: dict, hidden, call) -> list[list[str]]:
    """Linears of ``layer`` grouped by shared input, in call order: e.g. [[q,k,v], [o], [gate,up], [down]]."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.append((n, args[0]))) for n, m in linears.items()]
    try:
        layer(hidden, *call[0], **call[1])
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    for k, (name, x) in enumerate(seen):
        if any(name in s for s in stages):
            continue
        (stages[-1].append(name) if k and x is seen[k - 1][1] else stages.append([name]))
    return stages


def _hessians(layer, linears: dict, names: list[str], hidden, calls, masks) -> dict[str, HessianAccumulator]:
    """Accumulate H for ``names`` over all batches; the forward stops right after the last of them is reached."""
    accs = {n: HessianAccumulator(linears[n].in_features, linears[n].weight.device) for n in names}
    state = {"mask": None}

    def hook(mod, args, n):
        x = args[0]
        m = state["mask"]
        accs[n].add(x[m] if m is not None and m.shape == x.shape[:2] else x)
        if n == names[-1]:
            raise _StopForward

    handles = [linears[n].register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n in names]
    try:
        for h, (args, kw), m in zip(hidden, calls, masks):
            state["mask"] = m
            try:
                layer(h, *args, **kw)
            except _StopForward:
                pass
    finally:
        for hd in handles:
            hd.remove()
    return accs


def _quantize_stage(linears: dict, accs: dict, config: QuantConfig, errors: dict, prefix: str) -> None:
    for name, acc in accs.items():
        lin = linears[name]
        if acc.count == 0:
            logger.warning("GPTQ: %s%s received no calibration tokens; falling back to RTN", prefix, name)
            errors[prefix + name] = rtn_quantize_linear_(lin, config)
            continue
        q, scale, zero, gscale = gptq_quantize_weight(
            lin.weight, acc.hessian, config.w_bits, spec=config.weight_spec(), damp=config.gptq_damp,
            act_order=config.gptq_act_order, block_size=config.gptq_block_size,
            clip_search=config.clip_search_kwargs(), return_params=True,
        )  # fmt: skip
        errors[prefix + name] = replace_weight_(lin, q)
        set_weight_quant_params_(lin, WeightQuantParams.of(config, scale, zero, gscale))


def _decoder_layers(model: nn.Module):
    spec = get_architecture(model)
    return spec.layers, spec.decoder_layers(model)


def gptq_quantize_model_(model: nn.Module, config: QuantConfig, calibration, *, progress: bool = True) -> dict[str, float]:
    """GPTQ-quantize the weights of every ``nn.Linear`` of ``model`` not in ``config.skip``, layer by layer.

    ``calibration``: iterable of ``input_ids`` tensors (batch, seq) or dicts for ``model(**batch)``; an
    ``attention_mask`` (batch, seq) in a dict excludes padded tokens from the Hessians. Weights are edited in
    place; returns ``{name: ‖W − Ŵ‖_F / ‖W‖_F}``. Normally called through ``quantize_model_``.
    """
    if config.w_bits >= OFF_BITS:
        return {}
    targets, _ = quantizable_linears(model, config)
    prefix, layers = _decoder_layers(model)
    device = next(model.parameters()).device
    batches = [_as_kwargs(b, device) for b in (calibration if calibration is not None else [])]
    if not batches:
        raise QuantizationError("method='gptq' needs calibration data: pass calibration=[input_ids tensors or dicts]")
    masks = [b.get("attention_mask") if isinstance(b.get("attention_mask"), torch.Tensor) else None for b in batches]
    masks = [m.bool() if m is not None and m.dim() == 2 else None for m in masks]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden, calls = capture_layer_inputs(model, layers, batches)
            experts = expert_modules(model, config)
            errors = _quantize_layers(layers, prefix, (targets, experts), hidden, calls, masks, config, progress)
    finally:
        model.train(was_training)
    for name in set(targets) - set(errors):  # linears outside the decoder layers that are not skipped
        logger.info("GPTQ: %s is outside the decoder layers; quantized with RTN", name)
        errors[name] = rtn_quantize_linear_(targets[name], config)
    return {name: errors[name] for name in targets} | {n: v for n, v in errors.items() if n not in targets}


def _quantize_layers(layers, prefix, targets, hidden, calls, masks, config, progress) -> dict[str, float]:
    targets, experts = targets  # ({name: Linear}, {name: MoE experts module})
    errors: dict[str, float] = {}
    for i, layer in enumerate(tqdm(layers, desc="GPTQ layers", disable=not progress, leave=False)):
        where = f"{prefix}.{i}."
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and where + n in targets}
        stages = _call_stages(layer, linears, hidden[0], calls[i][0])
        if not config.gptq_true_sequential:
            stages = [[n for s in stages for n in s]]
        for stage in stages:
            _quantize_stage(linears, _hessians(layer, linears, stage, hidden, calls[i], masks), config, errors, where)
        for n in set(linears) - {n for s in stages for n in s}:
            logger.warning("GPTQ: %s%s was not called in the layer's forward; quantized with RTN", where, n)
            errors[where + n] = rtn_quantize_linear_(linears[n], config)
        for name, mod in ((n, m) for n, m in experts.items() if n.startswith(where)):
            _gptq_experts_(name, mod, _capture_routing(layer, mod, hidden, calls[i], masks), config, errors)
        hidden = _run_layer(layer, hidden, calls[i])
        logger.debug("GPTQ: layer %d done (%d linears in %d stages)", i, len(linears), len(stages))
    return errors


# ---------------------------------------------------------------------------------------------- MoE experts


def _capture_routing(layer, experts: nn.Module, hidden, calls, masks) -> list:
    """Per batch ``(x (T, H), top_k_index (T, k), mask (T,) or None)`` entering ``experts``; stops each forward there."""
    seen = []

    def hook(module, args, kwargs):
        named = dict(zip(("hidden_states", "top_k_index"), args)) | kwargs
        seen.append((named["hidden_states"], named["top_k_index"]))
        raise _StopForward

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for h, (args, kw) in zip(hidden, calls):
            try:
                layer(h, *args, **kw)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return [(x, idx, m.reshape(-1) if m is not None and m.numel() == x.shape[0] else None) for (x, idx), m in zip(seen, masks)]


def _gptq_rows(w: torch.Tensor, x: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """GPTQ of one expert's [out, in] matrix from its routed inputs x (n, in)."""
    acc = HessianAccumulator(w.shape[1], w.device)
    acc.add(x)
    return gptq_quantize_weight(
        w, acc.hessian, config.w_bits, spec=config.weight_spec(), damp=config.gptq_damp,
        act_order=config.gptq_act_order, block_size=config.gptq_block_size, clip_search=config.clip_search_kwargs(),
    )  # fmt: skip


def _gptq_experts_(name: str, experts: nn.Module, captured: list, config: QuantConfig, errors: dict) -> None:
    """GPTQ every expert of ``experts`` from the tokens routed to it (RTN with a warning for an expert with none)."""
    n_exp = experts.gate_up_proj.shape[0]
    per_batch = [routed_inputs(x, idx, n_exp, m) for x, idx, m in captured]
    inputs = [torch.cat([b[e] for b in per_batch]) for e in range(n_exp)]
    set_routed_token_counts(experts, [x.shape[0] for x in inputs])
    gu, down = experts.gate_up_proj, experts.down_proj
    before = {p: getattr(experts, p).detach().to(torch.float64).clone() for p in ("gate_up_proj", "down_proj")}
    for e, x in enumerate(inputs):
        if x.shape[0] == 0:
            logger.warning("GPTQ: expert %d of %s received no calibration tokens; falling back to RTN", e, name)
            rtn_expert_(gu, e, config), rtn_expert_(down, e, config)
            continue
        quantize_expert_rows_(gu, e, _gptq_rows(gu.detach()[e], x, config))
        act = experts._apply_gate(nn.functional.linear(x.to(gu.dtype), gu[e]))  # the down_proj input, after R4
        quantize_expert_rows_(down, e, _gptq_rows(down.detach()[e], act, config))
    for p, w0 in before.items():
        errors[f"{name}.{p}"] = ((getattr(experts, p).detach().to(torch.float64) - w0).norm() / w0.norm().clamp_min(1e-300)).item()
