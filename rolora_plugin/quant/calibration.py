"""Calibrated activation clipping: a clip ratio per linear, searched on calibration data.

For a quantized Linear with weight ``Ŵ`` (out, in) and calibration inputs ``X`` (n tokens, in), the ratio ``c``
of its dynamic per-token activation quantizer is chosen among ``candidates`` to minimise the error the
activation quantization causes at the layer's output:

    ``c* = argmin_c Σ_t ‖Q_c(x_t) Ŵᵀ − x_t Ŵᵀ‖²``

(``Q_c`` as in :func:`~rolora_plugin.quant.quantize_activation`: per token, scale ``c · max|x_t| / qmax``
symmetric, or ``c · (max − min) / qmax`` asymmetric). Ratio 1 is always a candidate, and ties keep the larger ratio,
so the chosen ratio never has a larger calibration error than no clipping. Clipping trades the error of the few
largest entries of a token (clamped) against a finer step for all the others; with the symmetric 4-bit grid
``[−8, 7]`` the ratio ``7/7.5`` is exactly the 16-level grid of llm-compressor (scale ``max|x| / 7.5``), so that
grid is one of the default candidates rather than a separate option.

One forward pass per calibration batch: a forward-pre-hook on each linear measures every candidate on the
linear's actual input (after rolora's online R4, which the MLP prepends to ``down_proj``'s hooks) and passes on
the input quantized with ``apply_ratio``, so each linear sees the activation noise of the quantized layers
before it, as it will at inference. Related: QuaRot uses a fixed ratio 0.9 (Ashkboos et al., 2024); OmniQuant
learns clipping (Shao et al., 2023).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import QuantizationError
from .primitives import TensorQuant, _check_ratio, fake_quant

__all__ = ["DEFAULT_A_CLIP_CANDIDATES", "ClipErrorMeter", "check_calibration", "input_amax", "search_activation_clips"]

logger = logging.getLogger(__name__)

# 1, the 16-level grid 7/7.5 (symmetric 4-bit), then a coarse sweep down to 0.6
DEFAULT_A_CLIP_CANDIDATES = (1.0, 0.975, 0.95, 7 / 7.5, 0.9, 0.875, 0.85, 0.8, 0.75, 0.7, 0.6)


class ClipErrorMeter:
    """Forward-pre-hook: accumulates ``Σ‖Q_c(X) Ŵᵀ − X Ŵᵀ‖²`` for each candidate ``c``; passes on ``Q_apply(X)``.

    ``errors``: float64 tensor (n_candidates,), summed over every token seen. Work is done in float32.

    By linearity the error is ``‖E_c Ŵᵀ‖²`` with ``E_c = Q_c(X) − X`` (no cancellation between two large products),
    and the candidates go through one matmul per block of ``max_elements`` input entries. A linear wider at its
    output than at its input (``out > in``, e.g. gate/up_proj) measures ``Σ_t e_t G e_tᵀ`` with the Gram matrix
    ``G = ŴᵀŴ`` (in × in, formed once in float64): ``in/out`` of the work.
    """

    max_elements = 1 << 23  # entries of E_c stacked over candidates per matmul (32 MiB in float32)

    def __init__(self, lin: nn.Linear, spec: TensorQuant, candidates, apply_ratio: float = 1.0):
        self.weight = lin.weight
        self.spec, self.apply_ratio = spec, apply_ratio
        self.candidates = tuple(float(c) for c in candidates)
        self.errors = torch.zeros(len(self.candidates), dtype=torch.float64)
        self.tokens = 0
        self._gram = None  # (key of the weight's storage and version, G)

    def _output_sq_norms(self, e: torch.Tensor) -> torch.Tensor:
        """``‖e Ŵᵀ‖²`` per leading index of e (k, n, in) → (k,), float64."""
        w = self.weight.detach()
        if w.shape[0] > w.shape[1]:
            key = (w.data_ptr(), w._version)  # a weight edited in place since (or replaced) forms G again
            if self._gram is None or self._gram[0] != key:
                wd = w.to(torch.float64)
                self._gram = (key, (wd.T @ wd).float())
            y = (e @ self._gram[1]).mul_(e)
        else:
            y = F.linear(e, w.float()).pow_(2)
        return y.sum(dim=(1, 2), dtype=torch.float64)

    @torch.no_grad()
    def measure(self, x: torch.Tensor) -> None:
        xf = x.detach().reshape(-1, x.shape[-1]).float()
        step = max(1, self.max_elements // max(1, xf.numel()))
        for k0 in range(0, len(self.candidates), step):
            cands = self.candidates[k0 : k0 + step]
            e = torch.stack([fake_quant(xf, self.spec.with_clip(c)) for c in cands]).sub_(xf)
            self.errors[k0 : k0 + len(cands)] += self._output_sq_norms(e).cpu()
        self.tokens += xf.shape[0]

    def __call__(self, module, args):
        self.measure(args[0])
        return (fake_quant(args[0], self.spec.with_clip(self.apply_ratio)),) + tuple(args[1:])

    def best(self) -> float:
        """The candidate with the smallest error (ties: the larger ratio); 1.0 if nothing was measured."""
        if self.tokens == 0:
            return 1.0
        order = sorted(range(len(self.candidates)), key=lambda k: (float(self.errors[k]), -self.candidates[k]))
        return self.candidates[order[0]]


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    return getattr(embed, "num_embeddings", None)


def _check_ids(k: int, ids, vocab: int | None) -> None:
    where = f"calibration item {k}: input_ids"
    if not isinstance(ids, torch.Tensor):
        raise QuantizationError(f"{where} is a {type(ids).__name__}; pass a torch integer tensor (batch, seq)")
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise QuantizationError(
            f"{where} has dtype {ids.dtype}; token ids must be an integer tensor, e.g. "
            "tokenizer(texts, return_tensors='pt').input_ids"
        )
    if ids.dim() not in (1, 2):
        raise QuantizationError(f"{where} has shape {tuple(ids.shape)}; expected (seq,) or (batch, seq)")
    if ids.numel() == 0:
        raise QuantizationError(f"{where} is empty (shape {tuple(ids.shape)}); every calibration batch needs tokens")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise QuantizationError(
            f"{where} holds ids in [{lo}, {hi}] but the model's vocabulary is [0, {vocab}); the data was tokenized "
            "with another tokenizer or is not token ids"
        )


def check_calibration(model: nn.Module, calibration) -> list | None:
    """Validate calibration data once, before any weight is edited; returns it as a list (None stays None).

    Items: ``input_ids`` tensors (seq,) / (batch, seq) of an integer dtype with ids inside the model's vocabulary,
    or dicts for ``model(**batch)`` (their ``input_ids``, when present, are checked the same way; an
    ``attention_mask`` must have the ids' shape). A one-shot iterator is materialised here, so GPTQ and the clip
    search (which both iterate) see the same batches. Raises :class:`QuantizationError` naming the bad item.
    """
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]  # one batch given bare
    items, vocab = list(calibration), _vocab_size(model)
    for k, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            _check_ids(k, item, vocab)
            continue
        if not isinstance(item, Mapping):
            raise QuantizationError(f"calibration items must be input_ids tensors or dicts, got {type(item).__name__} (item {k})")
        if "input_ids" in item:
            _check_ids(k, item["input_ids"], vocab)
            mask = item.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape != item["input_ids"].shape:
                raise QuantizationError(
                    f"calibration item {k}: attention_mask shape {tuple(mask.shape)} differs from input_ids "
                    f"shape {tuple(item['input_ids'].shape)}"
                )
    return items


def _batches(calibration, device) -> list[dict]:
    out = []
    for b in calibration if calibration is not None else []:
        if isinstance(b, torch.Tensor):
            b = {"input_ids": b if b.dim() == 2 else b.unsqueeze(0)}
        elif not isinstance(b, Mapping):
            raise QuantizationError(f"calibration items must be input_ids tensors or dicts, got {type(b).__name__}")
        out.append({**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}, "use_cache": False})
    if not out:
        raise QuantizationError("activation clip search needs calibration data: pass calibration=[input_ids tensors or dicts]")
    return out


def search_activation_clips(
    model: nn.Module, linears: dict, calibration, specs, *, candidates=DEFAULT_A_CLIP_CANDIDATES, apply_ratio: float = 1.0, progress: bool = False
) -> dict[str, float]:
    """``{name: clip ratio}`` for ``linears`` ({name: Linear}), searched on ``calibration`` (see module docstring).

    ``specs``: the activation :class:`~rolora_plugin.quant.primitives.TensorQuant`, one for all or ``{name: spec}``
    for every linear (mixed settings); their clip ratios are replaced by the candidates.
    ``model`` must not have activation quantizers installed (the meters stand in for them); its weights should
    already be quantized, so the error is measured through ``Ŵ``. ``candidates``: ratios in (0, 1]; 1.0 is added
    when missing. Padded tokens of dict batches (``attention_mask``) are measured too; use full rows.
    """
    cands = tuple(dict.fromkeys([1.0, *candidates]))
    for c in cands:
        _check_ratio(c, "activation clip candidate")
    per = specs if isinstance(specs, dict) else dict.fromkeys(linears, specs)
    meters = {n: ClipErrorMeter(lin, per[n], cands, apply_ratio) for n, lin in linears.items()}
    _run_with_hooks(model, linears, meters, calibration, "activation clip search", progress)
    ratios = {n: m.best() for n, m in meters.items()}
    logger.info("activation clip search: ratios %s", _summary(ratios))
    return ratios


def _run_with_hooks(model: nn.Module, linears: dict, hooks: dict, calibration, desc: str, progress: bool) -> None:
    """One eval forward per calibration batch with ``hooks[name]`` as forward-pre-hook of ``linears[name]``."""
    handles = [lin.register_forward_pre_hook(hooks[n]) for n, lin in linears.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(_batches(calibration, next(model.parameters()).device), desc=desc, disable=not progress, leave=False):
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


class _AmaxMeter:
    def __init__(self):
        self.amax = torch.zeros((), dtype=torch.float32)

    def __call__(self, module, args):
        self.amax = torch.maximum(self.amax, args[0].detach().abs().amax().float().cpu())


def input_amax(model: nn.Module, linears: dict, calibration, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """``{name: max|x|}`` of each linear's input over ``calibration`` (after the online R4; activation quantizers
    of ``model`` are not installed yet, weights already quantized): the NVFP4 ``input_global_scale`` is
    ``448·6 / max|x|`` (compressed-tensors' ``static_minmax`` observer, as llm-compressor calibrates it)."""
    meters = {n: _AmaxMeter() for n in linears}
    _run_with_hooks(model, linears, meters, calibration, "activation ranges", progress)
    return {n: m.amax for n, m in meters.items()}


def _summary(ratios: dict) -> str:
    counts: dict = {}
    for r in ratios.values():
        counts[round(r, 4)] = counts.get(round(r, 4), 0) + 1
    return ", ".join(f"{r}: {n}" for r, n in sorted(counts.items(), reverse=True))
