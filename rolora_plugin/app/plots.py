"""Every plot the application draws: activation kurtosis per layer, channel magnitudes, training loss.

The statistics come from :func:`rolora_plugin.kurtosis.activation_stats` (``{module name: {"kurtosis", "max_abs",
"rms", "channel_max_abs", ...}}``); the loss curves from :func:`rolora_plugin.app.train.loss_curve`. matplotlib is
imported on first use, on the non-interactive Agg backend; every PNG is written through
:func:`rolora_plugin.publish.atomic_write_bytes` (readers never see half a file).
"""

from __future__ import annotations

import io
from pathlib import Path

from ..kurtosis import kinds_from_names, layer_index, leaf_name
from ..publish import atomic_write_bytes

__all__ = [
    "agg_pyplot",
    "plot_channel_magnitudes",
    "plot_kurtosis_per_layer",
    "plot_losses",
    "save_figure",
    "write_plots",
]

DPI = 110


def agg_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Render ``fig`` as PNG, publish it atomically at ``path`` (replacing an older plot) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    agg_pyplot().close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


def _layer_points(stats: dict, kind: str) -> list[tuple[int, float]]:
    """``[(layer index, kurtosis), ...]`` of the linears of one input kind, in layer order."""
    pts = ((layer_index(n), s["kurtosis"]) for n, s in stats.items() if leaf_name(n) == kind)
    return sorted(p for p in pts if p[0] is not None)


def plot_kurtosis_per_layer(path: Path, before: dict, after: dict, kinds: tuple[str, ...] | None = None) -> Path:
    """One panel per input kind: kurtosis of its input per decoder layer, before (dashed) and after (solid).

    ``kinds`` default to :func:`rolora_plugin.kurtosis.kinds_from_names` of ``before``.
    """
    kinds = tuple(kinds or kinds_from_names(before))
    plt = agg_pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), sharey=True, layout="constrained", squeeze=False)
    axes = axes[0]
    for ax, kind in zip(axes, kinds):
        for tag, stats, style in (("before", before, "--"), ("after rotation", after, "-")):
            pts = _layer_points(stats, kind)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", label=tag)
        ax.set_yscale("log")
        ax.axhline(3.0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"input of {kind}")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("kurtosis (Gaussian = 3)")
    axes[0].legend()
    fig.suptitle("Activation kurtosis per layer, before vs after rotation")
    return save_figure(fig, path)


def plot_channel_magnitudes(path: Path, before: dict, after: dict, kinds: tuple[str, ...] | None = None) -> Path:
    """Per-channel max|x| / rms, before vs after, of the most outlier-heavy input of each of ``kinds``.

    ``kinds`` default to the first attention input and ``down_proj``'s input of the family
    (:func:`rolora_plugin.kurtosis.kinds_from_names`).
    """
    if kinds is None:
        family = kinds_from_names(before)
        kinds = (family[0], family[-1])
    plt = agg_pyplot()
    picks = [max((n for n in before if leaf_name(n) == k), key=lambda n: before[n]["kurtosis"]) for k in kinds]
    fig, axes = plt.subplots(1, len(picks), figsize=(6 * len(picks), 3.8), layout="constrained", squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, picks):
        for tag, stats in (("before", before), ("after rotation", after)):
            ch = stats[name]["channel_max_abs"] / stats[name]["rms"]
            ax.plot(ch.numpy(), lw=0.7, alpha=0.8, label=f"{tag} (max {ch.max():.0f}x rms)")
        ax.set_yscale("log")
        ax.set_title(name.replace("model.layers.", "layer "))
        ax.set_xlabel("input channel")
        ax.legend()
    axes[0].set_ylabel("max |x| / rms over tokens")
    fig.suptitle("Activation magnitude per channel: rotation spreads the outlier channels")
    return save_figure(fig, path)


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_losses(path: Path, tuned: dict) -> Path:
    """Training loss of the LoRA and RoLoRA runs (``tuned[name]["loss_curve"] = [(step, loss), ...]``), raw and smoothed."""
    fig, ax = agg_pyplot().subplots(figsize=(6.4, 3.8), layout="constrained")
    for name, label, color in (("lora", "LoRA", "tab:blue"), ("rolora", "RoLoRA", "tab:orange")):
        steps, losses = zip(*tuned[name]["loss_curve"])
        ax.plot(steps, losses, color=color, lw=0.8, alpha=0.45)
        w = max(1, len(losses) // 8)  # moving average over ~1/8 of the run
        ax.plot(steps, _moving_average(list(losses), w), color=color, lw=2, label=label + (f" ({w}-step moving average)" if w > 1 else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title("Fine-tuning on SciQ: LoRA vs RoLoRA")
    ax.legend()
    return save_figure(fig, path)


def write_plots(out_dir: Path, before: dict, after: dict, tuned: dict | None, kinds: tuple[str, ...] | None = None) -> dict:
    """kurtosis_per_layer.png, activation_magnitude.png and (with ``tuned``) training_loss.png; returns their paths."""
    magnitude_kinds = (kinds[0], kinds[-1]) if kinds else None
    paths = {"kurtosis": plot_kurtosis_per_layer(out_dir / "kurtosis_per_layer.png", before, after, kinds),
             "activation_magnitude": plot_channel_magnitudes(out_dir / "activation_magnitude.png", before, after, magnitude_kinds)}  # fmt: skip
    if tuned:
        paths["training_loss"] = plot_losses(out_dir / "training_loss.png", tuned)
    return {k: str(v) for k, v in paths.items()}
