"""Activation statistics of every linear layer's input: kurtosis and max-abs (RoLoRA Fig. 1 / QuaRot Fig. 1).

Outliers concentrate in a few channels of the residual stream; a rotation spreads them, so the input of each
linear becomes close to Gaussian. Kurtosis (Pearson, Gaussian = 3) is the standard single-number summary:

    κ = E[(x - μ)⁴] / (E[(x - μ)²])²      over every element of the input activation (tokens × channels)

The moments are accumulated in float64 over all calibration batches (raw power sums; activations have a mean
close to zero relative to their spread, so the cancellation in the central moments stays far below float64's
precision).

What a *per-token* activation quantizer faces is a different statistic: it picks one scale per token from that
token's largest entry, so its grid must span the token's peak-to-rms ratio across channels

    r_t = max_c |x_tc| / sqrt(mean_c x_tc²)      (1 ≤ r_t ≤ sqrt(C) for C channels; Gaussian ≈ sqrt(2 ln C))

and its rounding error relative to the token's rms grows with r_t (step = max|x_t| / qmax). A few "massive" tokens
have r_t near sqrt(C) before rotation; a rotation spreads each token's peak over its channels. Every token's
r_t is counted in a fixed histogram (:data:`TOKEN_RATIO_EDGES`, 80 log-spaced bins per decade from 1 to 1000),
so the memory per linear stays bounded however many tokens pass; its exact max and mean are kept as well
(:func:`token_peak_to_rms`, reference :func:`token_peak_to_rms_ref`; quantiles by :func:`histogram_quantile`).

Hooks are forward-pre-hooks registered *after* any online rotation hook rolora installs (those are
prepended), so a rotated model reports the statistics of what its linears actually see.

Summaries group the linears by *input kind*: one leaf name per distinct tensor a decoder layer feeds into its
linears (q/k/v read one input, gate/up another), taken from the family's
:meth:`~rolora_plugin.model.architectures.ArchitectureSpec.input_kinds` (``q_proj, o_proj, gate_proj, down_proj`` for
Llama; ``qkv_proj, o_proj, gate_up_proj, down_proj`` for Phi-3). The plots of these statistics live in the
application wing (:mod:`rolora_plugin.app.plots`).

Example::

    >>> stats = activation_stats(model, [input_ids])  # doctest: +SKIP
    >>> stats["model.layers.0.mlp.down_proj"]["kurtosis"]  # doctest: +SKIP
    >>> summarize_by_kind(before, after, input_kinds(model))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .._peft import bare_name, unwrap_peft
from ..model.architectures import ArchitectureSpec, get_architecture, list_architectures

__all__ = [
    "TOKEN_RATIO_EDGES",
    "ActivationMoments",
    "activation_stats",
    "histogram_quantile",
    "input_kinds",
    "kinds_from_names",
    "kurtosis_from_power_sums",
    "kurtosis_ref",
    "layer_index",
    "leaf_name",
    "summarize_by_kind",
    "token_peak_to_rms",
    "token_peak_to_rms_ref",
]

logger = logging.getLogger(__name__)

TOKEN_RATIO_EDGES = torch.logspace(0.0, 3.0, 241, dtype=torch.float64)  # bin edges of r_t: 1 … 1000, 80 per decade


def kurtosis_from_power_sums(n: int, s1: float, s2: float, s3: float, s4: float) -> float:
    """Pearson kurtosis from the power sums ``s_k = Σ x^k`` of ``n`` values (Gaussian → 3).

    Reference: :func:`kurtosis_ref`. Returns ``nan`` for constant inputs.
    """
    mean = s1 / n
    m2 = s2 / n - mean**2
    m4 = s4 / n - 4 * mean * s3 / n + 6 * mean**2 * s2 / n - 3 * mean**4
    return float(m4 / m2**2) if m2 > 0 else float("nan")


def kurtosis_ref(x: torch.Tensor) -> float:
    """Pearson kurtosis of all elements of ``x``, computed directly in float64 (the reference)."""
    x = x.detach().double().flatten()
    c = x - x.mean()
    m2 = (c**2).mean()
    return float((c**4).mean() / m2**2) if m2 > 0 else float("nan")


def token_peak_to_rms(x: torch.Tensor) -> torch.Tensor:
    """Per token, the peak-to-rms ratio across channels ``r_t = max_c |x_tc| / sqrt(mean_c x_tc²)``, in float64.

    Args:
        x: activations (..., C), channels last.

    Returns:
        float64 tensor of shape ``x.shape[:-1]``; ``nan`` where a token is all zeros. Reference:
        :func:`token_peak_to_rms_ref`.
    """
    x = x.detach().to(torch.float64)
    rms = torch.linalg.vector_norm(x, dim=-1) / x.shape[-1] ** 0.5
    return x.abs().amax(dim=-1) / torch.where(rms > 0, rms, torch.nan)


def token_peak_to_rms_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`token_peak_to_rms`: one token at a time, in float64, straight from the formula."""
    rows = x.detach().double().reshape(-1, x.shape[-1])
    out = [row.abs().max() / row.pow(2).mean().sqrt() if row.any() else torch.tensor(float("nan")) for row in rows]
    return torch.stack(out).to(torch.float64).reshape(x.shape[:-1])


def _histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts (int64, len(TOKEN_RATIO_EDGES) - 1) of ``values`` in bins ``[e_i, e_i+1)`` (values clamped into range)."""
    edges = TOKEN_RATIO_EDGES.to(values.device)
    idx = (torch.searchsorted(edges, values, right=True) - 1).clamp_(0, len(edges) - 2)
    return torch.bincount(idx, minlength=len(edges) - 1).cpu()


def histogram_quantile(counts: torch.Tensor, q: float, edges: torch.Tensor = TOKEN_RATIO_EDGES) -> float:
    """The ``q``-quantile (0 < q ≤ 1) of the values counted in ``counts``: the upper edge of the bin where the
    cumulative count reaches ``q · total`` (an upper bound, within one bin: 2.9% for :data:`TOKEN_RATIO_EDGES`).
    ``nan`` for an empty histogram."""
    cum = torch.cumsum(counts.to(torch.float64), 0)
    if cum[-1] <= 0:
        return float("nan")
    return float(edges[1:][int(torch.searchsorted(cum, q * cum[-1]))])


class ActivationMoments:
    """Running statistics of one layer's input (last dim = channels): float64 power sums, max-abs, per-channel
    max-abs, and the per-token peak-to-rms ratio ``r_t`` (histogram over :data:`TOKEN_RATIO_EDGES`, max, sum)."""

    def __init__(self):
        self.n = 0
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.channel_max_abs: torch.Tensor | None = None
        self.tokens = 0
        self.token_hist = torch.zeros(len(TOKEN_RATIO_EDGES) - 1, dtype=torch.int64)
        self.token_ratio_max = 0.0
        self.token_ratio_sum = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
        self.n += x.numel()
        powers = torch.stack([x.sum(), (x**2).sum(), (x**3).sum(), (x**4).sum()])
        self.sums += powers.cpu()
        cmax = x.abs().amax(dim=0).to(torch.float32).cpu()
        self.channel_max_abs = cmax if self.channel_max_abs is None else torch.maximum(self.channel_max_abs, cmax)
        self._update_tokens(token_peak_to_rms(x))

    def _update_tokens(self, ratios: torch.Tensor) -> None:
        ratios = ratios[~torch.isnan(ratios)]  # all-zero tokens have no ratio
        if ratios.numel():
            self.tokens += ratios.numel()
            self.token_hist += _histogram(ratios)
            self.token_ratio_max = max(self.token_ratio_max, float(ratios.max()))
            self.token_ratio_sum += float(ratios.sum())

    def summary(self) -> dict:
        s1, s2, s3, s4 = self.sums.tolist()
        return {
            "kurtosis": kurtosis_from_power_sums(self.n, s1, s2, s3, s4),
            "max_abs": float(self.channel_max_abs.max()),
            "rms": (s2 / self.n) ** 0.5,
            "numel": self.n,
            "channel_max_abs": self.channel_max_abs,
            **self._token_summary(),
        }

    def _token_summary(self) -> dict:
        mean, peak = (self.token_ratio_sum / self.tokens, self.token_ratio_max) if self.tokens else (float("nan"),) * 2
        return {"tokens": self.tokens, "token_peak_to_rms_mean": mean, "token_peak_to_rms_max": peak,
                "token_peak_to_rms_p50": histogram_quantile(self.token_hist, 0.5),
                "token_peak_to_rms_p99": histogram_quantile(self.token_hist, 0.99),
                "token_peak_to_rms_hist": self.token_hist.clone()}  # fmt: skip


def _linear_inputs(model: nn.Module, exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    """``{name: module}`` for each nn.Linear, peft LoRA layers reported once under their own name."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name or any(e in name for e in exclude):
            continue
        found[bare_name(name)] = module
    return found


def activation_stats(
    model: nn.Module,
    chunks: Iterable,
    *,
    exclude: tuple[str, ...] = ("lm_head",),
    progress: bool = True,
) -> dict[str, dict]:
    """Run ``model`` over ``chunks`` and return statistics of every linear layer's input.

    Args:
        model: any ``nn.Module``; every ``nn.Linear`` whose name contains none of ``exclude`` is measured
            (a peft LoRA layer is measured once, at its base layer's input, under the LoRA layer's name).
        chunks: ``input_ids`` tensors of shape (batch, seq), or dicts of keyword arguments for ``model``.
        exclude: name substrings to skip (default: the LM head, which stays high precision anyway).
        progress: tqdm bar over chunks.

    Returns:
        ``{module_name: {"kurtosis", "max_abs", "rms", "numel", "channel_max_abs" (float32 tensor (in_features,)),
        "tokens", "token_peak_to_rms_{mean,max,p50,p99}", "token_peak_to_rms_hist" (int64 counts over
        TOKEN_RATIO_EDGES)}}`` in module order; ``rms`` is over every element, the ``token_*`` entries describe the
        per-token ratio ``r_t`` (module doc).
    """
    targets = _linear_inputs(model, exclude)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to measure (exclude={exclude})")
    moments = {name: ActivationMoments() for name in targets}
    handles = [m.register_forward_pre_hook(_recorder(moments[n])) for n, m in targets.items()]
    try:
        with torch.no_grad():
            for chunk in tqdm(list(chunks), desc="activation stats", disable=not progress, leave=False):
                model(**chunk) if isinstance(chunk, dict) else model(input_ids=chunk)
    finally:
        for h in handles:
            h.remove()
    empty = [n for n, m in moments.items() if m.n == 0]
    if empty:
        logger.warning("%d linear layer(s) saw no input (e.g. %s); they are left out", len(empty), empty[0])
    return {n: m.summary() for n, m in moments.items() if m.n}


def _recorder(moments: ActivationMoments):
    def hook(module, args):
        moments.update(args[0])

    return hook


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module name like ``model.layers.12.mlp.down_proj`` (None if absent)."""
    parts = name.split(".")
    for before, part in zip(parts, parts[1:]):
        if before in ("layers", "h", "blocks") and part.isdigit():
            return int(part)
    return None


def leaf_name(name: str) -> str:
    """The last component of a qualified module name (``model.layers.3.mlp.down_proj`` → ``down_proj``)."""
    return name.rsplit(".", 1)[-1]


def input_kinds(model: nn.Module) -> tuple[str, ...]:
    """The input kinds of ``model``'s family (a bare model or a PeftModel): ``ArchitectureSpec.input_kinds()``."""
    return get_architecture(unwrap_peft(model)).input_kinds()


def kinds_from_names(names: Iterable[str]) -> tuple[str, ...]:
    """The input kinds of the registered family whose layer linears are all among ``names`` (module names).

    For statistics measured without the model at hand; families sharing linear names (Llama, Mistral, Qwen)
    share their kinds. Raises ValueError when no family, or several with different kinds, match: pass the
    kinds explicitly then (e.g. :func:`input_kinds` of the model).
    """
    leaves = {leaf_name(n) for n in names}
    specs = [s for s in list_architectures().values() if isinstance(s, ArchitectureSpec)]  # VLMs reuse text families
    matches = {spec.input_kinds() for spec in specs if set(spec.linear_names()) <= leaves}
    if len(matches) != 1:
        found = "no registered family" if not matches else f"several families ({sorted(matches)})"
        raise ValueError(f"cannot tell the input kinds of linears {sorted(leaves)}: {found} match; pass kinds explicitly")
    return matches.pop()


def summarize_by_kind(before: dict, after: dict, kinds: tuple[str, ...] | None = None) -> dict:
    """Per input kind: mean/max over layers of kurtosis, the max of max|x|/rms (whole tensor), and the per-token
    ratio ``r_t`` pooled over the kind's layers (median, 99th percentile, max), before and after (e.g. a rotation).

    ``kinds`` default to :func:`kinds_from_names` of ``before``'s module names. The ``token_*`` entries appear
    only when the statistics carry ``token_peak_to_rms_hist`` (:func:`activation_stats` does).
    """
    out = {}
    for kind in kinds or kinds_from_names(before):
        names = [n for n in before if leaf_name(n) == kind and n in after]
        if names:
            out[kind] = {tag: _kind_summary([stats[n] for n in names]) for tag, stats in (("before", before), ("after", after))}
    return out


def _kind_summary(rows: list[dict]) -> dict:
    k = [r["kurtosis"] for r in rows]
    peak = max(r["max_abs"] / r["rms"] for r in rows)
    out = {"kurtosis_mean": sum(k) / len(k), "kurtosis_max": max(k), "peak_over_rms_max": peak}
    if all("token_peak_to_rms_hist" in r for r in rows):
        hist = torch.stack([r["token_peak_to_rms_hist"] for r in rows]).sum(0)
        out.update(token_peak_to_rms_p50=histogram_quantile(hist, 0.5), token_peak_to_rms_p99=histogram_quantile(hist, 0.99),
                   token_peak_to_rms_max=max(r["token_peak_to_rms_max"] for r in rows))  # fmt: skip
    return out
