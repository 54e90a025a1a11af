"""Every plot the application draws: kurtosis per layer, the per-token range a W4A4 quantizer faces, channel
magnitudes, training loss, and W4A4 perplexity per model and recipe (ratio to FP, servable presets included).

The statistics come from :func:`rolora_plugin.lora.kurtosis.activation_stats` (``{module name: {"kurtosis", "max_abs",
"rms", "channel_max_abs", "token_peak_to_rms_hist", ...}}``); the loss curves from
:func:`rolora_plugin.app.train.loss_curve`; the perplexities from :func:`rolora_plugin.app.demo.run_demo`'s
results. matplotlib is imported on first use, on the non-interactive Agg backend; every PNG is written at
:data:`DPI` through :func:`rolora_plugin.io.publish.atomic_write_bytes` (readers never see half a file).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from ..io.publish import atomic_write_bytes
from ..lora.kurtosis import TOKEN_RATIO_EDGES, histogram_quantile, kinds_from_names, layer_index, leaf_name

__all__ = [
    "DPI",
    "agg_pyplot",
    "channel_magnitudes_figure",
    "kurtosis_figure",
    "losses_figure",
    "plot_channel_magnitudes",
    "plot_kurtosis_per_layer",
    "plot_losses",
    "plot_token_ranges",
    "plot_w4a4_perplexity",
    "save_figure",
    "smoothed",
    "token_ranges_figure",
    "w4a4_figure",
    "w4a4_points",
    "write_plots",
]

DPI = 150  # with the figure sizes below: 1400-1600 px wide, 10 pt text stays readable
BEFORE = {"color": "tab:blue", "ls": "--", "label": "before rotation"}
AFTER = {"color": "tab:orange", "ls": "-", "label": "after rotation"}


def agg_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Render ``fig`` as PNG at :data:`DPI`, publish it atomically at ``path`` (replacing an older plot), close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    agg_pyplot().close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


def _panels(n: int, width: float = 5.2, height: float = 3.6, sharey: bool = False):
    """``(fig, flat list of n axes)`` on a grid of at most 2 columns (one y-range for all with ``sharey``)."""
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = agg_pyplot().subplots(rows, cols, figsize=(width * cols, height * rows), layout="constrained", squeeze=False,
                                      sharey="all" if sharey else "none")  # fmt: skip
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _of_kind(stats: dict, kind: str) -> list[tuple[int, dict]]:
    """``[(layer index, stats), ...]`` of the linears of one input kind, in layer order."""
    pts = [(layer_index(n), s) for n, s in stats.items() if leaf_name(n) == kind]
    return sorted((p for p in pts if p[0] is not None), key=lambda p: p[0])


# ---------------------------------------------------------------------------------------------- kurtosis


def plot_kurtosis_per_layer(path: Path, before: dict, after: dict, kinds: tuple[str, ...] | None = None) -> Path:
    """:func:`kurtosis_figure` saved as PNG at ``path``."""
    return save_figure(kurtosis_figure(before, after, kinds), path)


def kurtosis_figure(before: dict, after: dict, kinds: tuple[str, ...] | None = None):
    """One panel per input kind (2 columns): kurtosis of its input per decoder layer, before vs after, on one
    shared log scale (so the panels compare: down_proj's outliers are orders of magnitude above q_proj's).

    ``kinds`` default to :func:`rolora_plugin.lora.kurtosis.kinds_from_names` of ``before``.
    """
    kinds = tuple(kinds or kinds_from_names(before))
    fig, axes = _panels(len(kinds), sharey=True)
    for ax, kind in zip(axes, kinds):
        for stats, style in ((before, BEFORE), (after, AFTER)):
            pts = _of_kind(stats, kind)
            ax.plot([i for i, _ in pts], [s["kurtosis"] for _, s in pts], marker=".", **style)
        ax.set_yscale("log")
        ax.axhline(3.0, color="grey", lw=0.8, ls=":", label="Gaussian (3)")
        ax.set(title=f"input of {kind}", xlabel="decoder layer", ylabel="kurtosis (log scale)")
        ax.yaxis.set_tick_params(labelleft=True)  # shared scale, still read on every panel
    axes[0].legend(fontsize=9)
    fig.suptitle("Kurtosis of each linear layer's input (tokens × channels), before vs after rotation (one scale)")
    return fig


# ---------------------------------------------------------------------------------------------- per-token range


def _pooled(stats: dict, kind: str) -> tuple[torch.Tensor, float, int]:
    """(histogram of r_t pooled over the kind's layers, max r_t, channel count)."""
    rows = [s for _, s in _of_kind(stats, kind)]
    hist = torch.stack([s["token_peak_to_rms_hist"] for s in rows]).sum(0)
    return hist, max(s["token_peak_to_rms_max"] for s in rows), len(rows[0]["channel_max_abs"])


def _ecdf(ax, hist: torch.Tensor, peak: float, style: dict) -> None:
    """Empirical CDF from a histogram over TOKEN_RATIO_EDGES (exact at the bin edges)."""
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(hist.double(), 0) / hist.sum()])
    label = f"{style['label']}: median {histogram_quantile(hist, 0.5):.1f}, max {peak:.0f}"
    ax.plot(TOKEN_RATIO_EDGES.numpy(), cdf.numpy(), **{**style, "label": label})


def plot_token_ranges(path: Path, before: dict, after: dict, kinds: tuple[str, ...] | None = None) -> Path:
    """:func:`token_ranges_figure` saved as PNG at ``path``."""
    return save_figure(token_ranges_figure(before, after, kinds), path)


def token_ranges_figure(before: dict, after: dict, kinds: tuple[str, ...] | None = None):
    """What a per-token activation quantizer faces: ``r_t = max_c|x_tc| / rms_c(x_t)`` of every token.

    Top row, one panel per input kind: the distribution over tokens (all layers pooled, as an empirical CDF)
    before vs after, with the i.i.d. Gaussian value ``≈ sqrt(2 ln 2C)`` and the upper bound ``sqrt(C)`` (one
    channel holds the whole token). Bottom row: per decoder layer, the largest ``r_t`` of any token (markers)
    and the median token (thin). Lower is better: a 4-bit per-token step is ``max|x_t| / 7``, i.e. ``r_t / 7``
    of the token's rms.
    """
    kinds = tuple(kinds or kinds_from_names(before))
    plt = agg_pyplot()
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.9 * len(kinds), 7.0), layout="constrained", squeeze=False)
    for col, kind in enumerate(kinds):
        top, bottom = axes[0, col], axes[1, col]
        for stats, style in ((before, BEFORE), (after, AFTER)):
            hist, peak, channels = _pooled(stats, kind)
            _ecdf(top, hist, peak, style)
            _per_layer_range(bottom, stats, kind, style)
        _bounds(top, bottom, channels)
        top.set(xscale="log", xlim=(1, 1.4 * math.sqrt(channels)), ylim=(0, 1.38), yticks=[0, 0.25, 0.5, 0.75, 1],
                title=f"input of {kind} ({channels} channels)", xlabel="per-token max|x| / rms across channels",
                ylabel="fraction of tokens ≤ x")  # fmt: skip
        _plain_log_ticks(top, 1.4 * math.sqrt(channels))
        top.legend(fontsize=8.5, loc="upper left")  # above the curves (they end at 1)
        bottom.set(ylim=(0, 1.7 * math.sqrt(channels)), xlabel="decoder layer", ylabel="max|x| / rms across channels")
    # one legend for the bottom row, readable at screen size (a legend per panel would cover the curves)
    fig.legend(*axes[1, 0].get_legend_handles_labels(), loc="outside lower center", ncol=5, fontsize=10)
    fig.suptitle("The range a per-token quantizer must cover: each token's peak / rms across its channels (lower is better)")
    return fig


def _plain_log_ticks(ax, upper: float) -> None:
    """x ticks 1, 2, 3, 5, 10, 20, ... up to ``upper`` written as plain numbers on a log axis."""
    from matplotlib.ticker import NullFormatter

    ticks = [t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500) if t <= upper]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _bounds(top, bottom, channels: int) -> None:
    """Reference values of r_t for ``channels`` channels: i.i.d. Gaussian and the largest possible, sqrt(C)."""
    gauss, bound = math.sqrt(2 * math.log(2 * channels)), math.sqrt(channels)
    top.axvline(gauss, color="grey", lw=0.8, ls=":", label=f"i.i.d. Gaussian ≈ {gauss:.1f}")
    top.axvline(bound, color="black", lw=0.8, ls="-.", label=f"upper bound √C = {bound:.0f}")
    bottom.axhline(bound, color="black", lw=0.8, ls="-.", label="upper bound √C")


def _per_layer_range(ax, stats: dict, kind: str, style: dict) -> None:
    pts = _of_kind(stats, kind)
    layers = [i for i, _ in pts]
    worst, median = [s["token_peak_to_rms_max"] for _, s in pts], [s["token_peak_to_rms_p50"] for _, s in pts]
    ax.plot(layers, worst, marker="o", ms=3, **{**style, "label": f"{style['label']}: worst token"})
    ax.plot(layers, median, lw=0.8, color=style["color"], ls=":", label=f"{style['label']}: median token")


# ---------------------------------------------------------------------------------------------- channel view


def plot_channel_magnitudes(path: Path, before: dict, after: dict, kinds: tuple[str, ...] | None = None) -> Path:
    """:func:`channel_magnitudes_figure` saved as PNG at ``path``."""
    return save_figure(channel_magnitudes_figure(before, after, kinds), path)


def channel_magnitudes_figure(before: dict, after: dict, kinds: tuple[str, ...] | None = None):
    """Per-channel view (the one per-*channel* quantizers face): for each input channel, its largest |x| over all
    tokens divided by the rms of the whole tensor, channels sorted from largest to smallest, before vs after.

    Read it as "how unevenly the peak magnitude is spread over channels": before rotation a few channels hold the
    outliers (a steep head), after it every channel shares them (a flat line). It is *not* the range a per-token
    quantizer covers (:func:`plot_token_ranges`). One panel per kind of ``kinds``, at the layer whose input has
    the highest kurtosis before; ``kinds`` default to the family's first and last input kinds.
    """
    if kinds is None:
        family = kinds_from_names(before)
        kinds = (family[0], family[-1])
    picks = [max((n for n in before if leaf_name(n) == k), key=lambda n: before[n]["kurtosis"]) for k in kinds]
    fig, axes = _panels(len(picks), width=5.6, height=3.8)
    for ax, name in zip(axes, picks):
        for stats, style in ((before, BEFORE), (after, AFTER)):
            ch = (stats[name]["channel_max_abs"].double() / stats[name]["rms"]).sort(descending=True).values
            ax.plot(range(1, len(ch) + 1), ch.numpy(), **{**style, "label": f"{style['label']} (top channel {ch[0]:.0f})"})
        ax.set(xscale="log", yscale="log", title=name.replace("model.layers.", "layer "),
               xlabel="input channels, sorted by peak (rank)", ylabel="channel's max|x| over tokens / tensor rms")  # fmt: skip
        ax.legend(fontsize=8)
    fig.suptitle("Per-channel view (not the per-token range, see plot_token_ranges): "
                 "rotation spreads a few outlier channels over all")
    return fig


# ---------------------------------------------------------------------------------------------- training loss


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start): ``s_i = mean(v[max(0, i-w+1) : i+1])``."""
    spans = (values[max(0, i - window + 1) : i + 1] for i in range(len(values)))
    return [sum(span) / len(span) for span in spans]


def plot_losses(path: Path, tuned: dict) -> Path:
    """:func:`losses_figure` saved as PNG at ``path``."""
    return save_figure(losses_figure(tuned), path)


def losses_figure(tuned: dict):
    """Training loss of the LoRA and RoLoRA runs (``tuned[name]["loss_curve"] = [(step, loss), ...]``): each
    step faint, a trailing moving average over ~1/4 of the run bold (runs of 8+ steps), the held-out loss of
    each merged model after training as a marker at the last step (``tuned[name]["held_out_loss"]``) and that of
    the base model before fine-tuning as a dotted line (``tuned["base_fp_response_ppl"]``)."""
    from matplotlib.ticker import MaxNLocator

    w4a4 = all("w4a4" in tuned.get(name, {}) for name in ("lora", "rolora"))
    if w4a4:
        fig, (ax, right) = agg_pyplot().subplots(1, 2, figsize=(11.5, 4.4), layout="constrained", width_ratios=(1.8, 1))
    else:
        fig, ax = agg_pyplot().subplots(figsize=(7.2, 4.2), layout="constrained")
    for name, label, color in (("lora", "LoRA", "tab:blue"), ("rolora", "RoLoRA", "tab:orange")):
        steps, losses = zip(*tuned[name]["loss_curve"])
        w = len(losses) // 4
        ax.plot(steps, losses, color=color, lw=0.8 if w > 1 else 1.8, alpha=0.35 if w > 1 else 0.9,
                label=f"{label}: each step (one batch)")  # fmt: skip
        if w > 1:
            ax.plot(steps, smoothed(list(losses), w), color=color, lw=2.2, label=f"{label}: {w}-step moving average")
        if "held_out_loss" in tuned[name]:
            ax.plot([steps[-1]], [tuned[name]["held_out_loss"]], marker="D", ms=8, color=color, mec="black", ls="none",
                    label=f"{label}: held-out loss after training {tuned[name]['held_out_loss']:.3f}")  # fmt: skip
    if "base_fp_response_ppl" in tuned:
        base = math.log(tuned["base_fp_response_ppl"])
        ax.axhline(base, color="grey", ls=":", lw=1.2, label=f"base model: held-out loss before fine-tuning {base:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="step", ylabel="loss on response tokens (nats/token)", title="Fine-tuning on SciQ pairs: LoRA vs RoLoRA")
    ax.legend(fontsize=8)
    if w4a4:
        _low_bit_panel(right, tuned)
    return fig


def _low_bit_panel(ax, tuned: dict) -> None:
    """The same held-out loss after training, in full precision and at W4A4 (the merged model quantized as in the
    demo's fine-tune table): the paper's point is the W4A4 one ("low-bit convergence"), not the FP one."""
    for x, (name, label, color) in enumerate((("lora", "LoRA", "tab:blue"), ("rolora", "RoLoRA", "tab:orange"))):
        fp, low = tuned[name]["held_out_loss"], math.log(tuned[name]["w4a4"]["response_ppl"])
        ax.plot([x, x], [fp, low], color=color, lw=1.5, alpha=0.6)
        ax.plot([x], [fp], marker="D", ms=8, color=color, mec="black", ls="none", label="FP" if x == 0 else "_fp")
        ax.plot([x], [low], marker="s", ms=9, color="white", mec=color, mew=2.2, ls="none", label="W4A4" if x == 0 else "_w4a4")
        for y, text in ((fp, f"{fp:.2f}"), (low, f"{low:.2f}")):
            ax.annotate(text, (x, y), xytext=(10, -3), textcoords="offset points", fontsize=9)
    if "base_fp_response_ppl" in tuned:
        ax.axhline(math.log(tuned["base_fp_response_ppl"]), color="grey", ls=":", lw=1.2, label="base model, FP")
    ax.set_xticks([0, 1], ["LoRA merged", "RoLoRA merged"])
    ax.set_xlim(-0.5, 1.7)
    ax.set(xlabel="model", ylabel="held-out loss (nats/token)", title="After training: full precision vs W4A4")
    ax.legend(fontsize=8, loc="upper right")


# ---------------------------------------------------------------------------------------------- W4A4 perplexity

# The colour says whether the model is rotated, as everywhere else (kurtosis: before blue / after orange; loss
# plot: LoRA blue / RoLoRA orange); the marker says how it was quantized.
UNROTATED, ROTATED = BEFORE["color"], AFTER["color"]
CONSUMER_DX = 0.18  # compressed-tensors' forward is drawn this far right of our point of the same export
KINDS = {  # kind of W4A4 recipe -> (marker, size, legend text)
    "rtn": ("o", 8, "RTN, no calibration (not the deploy recipe)"),
    "calibrated": ("s", 8, "calibrated research recipe (GPTQ ...)"),
    "servable": ("D", 9, "servable preset (its weight recipe in the label), exported, re-loaded by the consumer check"),
}


def _point(label: str, ppl: float, fp: float, rotated: bool, kind: str, consumer: float | None = None) -> dict:
    return {"label": label, "ppl": ppl, "fp": fp, "ratio": ppl / fp, "color": ROTATED if rotated else UNROTATED,
            "kind": kind, "consumer_ratio": None if consumer is None else consumer / fp}  # fmt: skip


def w4a4_points(results: dict) -> tuple[list[dict], list[dict]]:
    """The points of :func:`plot_w4a4_perplexity`: ``(text points, response points)``, each a list of
    ``{"label", "ppl", "fp", "ratio" (= ppl / fp, the same model unquantized), "color", "kind", "consumer_ratio"}``.

    Text (BoolQ passages): every W4A4 row of ``results["quantization"]`` (the base model unrotated / rotated, one
    point per ``recipe``), the merged LoRA / RoLoRA models (quantized with ``results["finetune_recipe"]``, else the
    first row's recipe), then each servable preset of ``results["deploy"]`` on the merged RoLoRA model (ours via
    ``load_rotated``; ``consumer_ratio``: compressed-tensors' forward of the export). Response (SciQ held-out
    answers): LoRA / RoLoRA, then the servable presets. ``kind``: ``"rtn"``, ``"calibrated"`` or ``"servable"``.
    """
    w4a4 = [row for row in results["quantization"] if row["setting"] == "W4A4"]
    fp = {row["rotation"]: row["perplexity"] for row in results["quantization"] if row["setting"] == "FP"}
    recipe = results.get("finetune_recipe") or (w4a4[0].get("recipe", "RTN") if w4a4 else "RTN")

    def kind(name: str) -> str:
        return "rtn" if name.upper().startswith("RTN") else "calibrated"

    text = []
    for row in w4a4:
        rotated, name = row["rotation"] == "rotated", row.get("recipe", recipe)
        base = "base, rotated" if rotated else "base, no rotation"
        text.append(_point(f"{base}\n{name}", row["perplexity"], fp.get(row["rotation"], math.nan), rotated, kind(name)))
    tuned = results.get("finetune") or {}
    response = []
    for name, label in (("lora", "LoRA"), ("rolora", "RoLoRA")):
        if name in tuned:
            r = tuned[name]
            text.append(_point(f"{label} merged\n{recipe}", r["w4a4"]["text_ppl"], r["fp"]["text_ppl"], name == "rolora", kind(recipe)))
            response.append(_point(f"{label} merged\n{recipe}", r["w4a4"]["response_ppl"], r["fp"]["response_ppl"],
                                   name == "rolora", kind(recipe)))  # fmt: skip
    deploy = results.get("deploy") or {}
    for row in deploy.get("rows", []):
        label = f"RoLoRA merged\n{row['preset']}" + (f", {row['config']['method'].upper()}" if "config" in row else "")
        text.append(_point(label, row["text_ppl"], deploy["fp"]["text_ppl"], True, "servable", row.get("consumer_text_ppl")))
        response.append(_point(label, row["response_ppl"], deploy["fp"]["response_ppl"], True, "servable"))
    return text, response


def _ratio_panel(ax, points: list[dict], title: str) -> None:
    """Points at ``ratio`` (log axis, plain-number ticks), each annotated with its ratio and perplexity; the FP
    line at 1; the servable points on a shaded background; compressed-tensors' own forward as a black +."""
    xs = list(range(len(points)))
    ratios = [p["ratio"] for p in points] + [p["consumer_ratio"] for p in points if p["consumer_ratio"] is not None]
    top = max(ratios + [2.0]) * 2.2
    serv = [x for x, p in zip(xs, points) if p["kind"] == "servable"]
    if serv:
        ax.axvspan(serv[0] - 0.45, serv[-1] + 0.45, color="tab:green", alpha=0.1, lw=0)
        ax.text((serv[0] + serv[-1]) / 2, top / 1.08, "deploy recipe:\nservable presets", ha="center", va="top", fontsize=8,
                color="darkgreen")  # fmt: skip
    ax.axhline(1.0, color="black", ls="--", lw=1.0)
    for x, p in zip(xs, points):
        marker, size, _ = KINDS[p["kind"]]
        ax.plot([x], [p["ratio"]], ls="none", marker=marker, ms=size, color=p["color"], mec="black", mew=0.6)
        if p["consumer_ratio"] is not None:  # beside ours: at the same height when the consumer computes the same model
            ax.plot([x + CONSUMER_DX], [p["consumer_ratio"]], ls="none", marker="+", ms=10, mew=1.6, color="black")
        ax.annotate(f"{p['ratio']:.2f}×\n(ppl {p['ppl']:.1f})" if p["ratio"] < 10 else f"{p['ratio']:.0f}×\n(ppl {p['ppl']:.0f})",
                    (x, p["ratio"]), ha="left", va="bottom", fontsize=8, xytext=(8, 3), textcoords="offset points")  # fmt: skip
    ax.set(yscale="log", ylim=(min(ratios + [1.0]) / 1.25, top), xlim=(-0.5, len(points) - 0.2), title=title,
           ylabel="W4A4 perplexity / FP perplexity of the same model", xlabel="model and W4A4 recipe")  # fmt: skip
    _plain_log_yticks(ax, top)
    ax.set_xticks(xs, [p["label"] for p in points], fontsize=8)


def _plain_log_yticks(ax, upper: float) -> None:
    """y ticks 1×, 1.5×, 2×, 3×, 5×, 10×, ... up to ``upper`` as plain numbers on a log axis."""
    from matplotlib.ticker import NullFormatter

    ticks = [t for t in (1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= upper]
    ax.set_yticks(ticks, [f"{t:g}×" for t in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())


def _legend_handles(points: list[dict]) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color="black", ls="--", lw=1.0, label="1× = full precision (the same model unquantized)"),
               Patch(color=UNROTATED, label="not rotated (base, LoRA)"), Patch(color=ROTATED, label="rotated (base, RoLoRA)")]  # fmt: skip
    for kind in dict.fromkeys(p["kind"] for p in points):
        marker, size, text = KINDS[kind]
        handles.append(Line2D([], [], ls="none", marker=marker, ms=size * 0.8, color="white", mec="black", label=text))
    if any(p["consumer_ratio"] is not None for p in points):
        handles.append(Line2D([], [], ls="none", marker="+", ms=9, mew=1.4, color="black",
                              label="the same export run by compressed-tensors' own forward"))  # fmt: skip
    return handles


def plot_w4a4_perplexity(path: Path, results: dict) -> Path:
    """:func:`w4a4_figure` saved as PNG at ``path``."""
    return save_figure(w4a4_figure(results), path)


def w4a4_figure(results: dict):
    """W4A4 perplexity per model and recipe as a multiple of the same model's FP perplexity (:func:`w4a4_points`):
    points on a log axis (no bars: a log axis has no zero for a bar to start from), lower is better; the servable
    presets on a shaded background, with compressed-tensors' own forward of each export beside ours."""
    text, response = w4a4_points(results)
    if not text:
        raise ValueError("no W4A4 rows in results['quantization']: nothing to plot")
    fig, axes = agg_pyplot().subplots(1, 2 if response else 1, figsize=(14.5 if response else 8.5, 5.6),
                                      layout="constrained", squeeze=False, width_ratios=[len(text), max(len(response), 2)] if response else None)  # fmt: skip
    _ratio_panel(axes[0, 0], text, "BoolQ passages (text perplexity)")
    if response:
        _ratio_panel(axes[0, 1], response, "SciQ held-out answers (response perplexity)")
    fig.legend(handles=_legend_handles(text), loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("W4A4 perplexity as a multiple of full precision (weights and activations 4 bit; lower is better)")
    return fig


# ---------------------------------------------------------------------------------------------- all of them


def write_plots(out_dir: Path, before: dict, after: dict, tuned: dict | None, kinds: tuple[str, ...] | None = None,
                results: dict | None = None) -> dict:  # fmt: skip
    """kurtosis_per_layer.png, activation_magnitude.png (:func:`plot_token_ranges`), with ``tuned``
    training_loss.png, and with ``results`` (those of :func:`~rolora_plugin.app.demo.run_demo`)
    w4a4_perplexity.png; returns ``{key: path}``."""
    out_dir = Path(out_dir)
    paths = {"kurtosis": plot_kurtosis_per_layer(out_dir / "kurtosis_per_layer.png", before, after, kinds),
             "activation_magnitude": plot_token_ranges(out_dir / "activation_magnitude.png", before, after, kinds)}  # fmt: skip
    if tuned:
        paths["training_loss"] = plot_losses(out_dir / "training_loss.png", tuned)
    if results:
        paths["w4a4_perplexity"] = plot_w4a4_perplexity(out_dir / "w4a4_perplexity.png", results)
    return {k: str(v) for k, v in paths.items()}
