"""Input kinds of the activation statistics (taken from each family's ArchitectureSpec, fused Phi-3 included), the
per-token peak-to-rms statistic against a float64 reference, the app's plots (content, size, dpi), the demo's
table and loss summary, the demo's response perplexity over padded batches, and build_once on the shared publisher."""

from __future__ import annotations

import math
import socket
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rolora_plugin import get_architecture
from rolora_plugin.app.assets import COMPLETE_MARKER, AssetError, build_once
from rolora_plugin.app.demo import _loss_summary, format_demo_table, response_perplexity
from rolora_plugin.app.plots import (
    DPI,
    plot_channel_magnitudes,
    plot_kurtosis_per_layer,
    plot_token_ranges,
    plot_w4a4_perplexity,
    w4a4_points,
    write_plots,
)
from rolora_plugin.lora.kurtosis import (
    TOKEN_RATIO_EDGES,
    ActivationMoments,
    activation_stats,
    histogram_quantile,
    input_kinds,
    kinds_from_names,
    leaf_name,
    summarize_by_kind,
    token_peak_to_rms,
    token_peak_to_rms_ref,
)
from rolora_plugin.io.publish import STAGING_MARKER
from tests.helpers import FAMILIES, lora, random_ids, tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stats(family: str, layers: int = 2) -> tuple[torch.nn.Module, dict]:
    model = tiny_model(family, layers=layers)
    return model, activation_stats(model, [random_ids(batch=2, seq=12)], progress=False)


# ---------------------------------------------------------------------------------------------- input kinds


@pytest.mark.parametrize("family", FAMILIES)
def test_summary_kinds_come_from_the_family_spec(family):
    model, stats = _stats(family)
    kinds = get_architecture(model).input_kinds()
    assert input_kinds(model) == kinds and input_kinds(lora(model, ["o_proj"])) == kinds  # PeftModel unwrapped
    assert kinds_from_names(stats) == kinds
    summary = summarize_by_kind(stats, stats)
    assert tuple(summary) == kinds
    for kind in kinds:
        values = [s["kurtosis"] for n, s in stats.items() if leaf_name(n) == kind]
        assert len(values) == 2 and summary[kind]["after"]["kurtosis_mean"] == pytest.approx(sum(values) / 2)


def test_phi3_fused_projections_are_summarised():
    _, stats = _stats("phi3")
    assert set(summarize_by_kind(stats, stats)) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_kinds_of_unknown_linears_must_be_given():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    stats = activation_stats(model, [{"input": torch.randn(3, 8)}], exclude=(), progress=False)
    with pytest.raises(ValueError, match="pass kinds explicitly"):
        summarize_by_kind(stats, stats)
    assert set(summarize_by_kind(stats, stats, kinds=("0", "2"))) == {"0", "2"}


# ---------------------------------------------------------------------------------------------- per-token range


def _tokens_with_outliers(seed: int = 0) -> torch.Tensor:
    """(3, 5, 16) activations: Gaussian tokens, one massive token, one all-zero token, one flat token."""
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(seed))
    x[0, 0, 3] = 50.0  # one channel dominates: r_t close to sqrt(16) = 4
    x[1, 2] = 0.0  # no ratio
    x[2, 4] = -1.5  # |x| equal in every channel: r_t = 1
    return x


def _peak_to_rms_python(row: list[float]) -> float:
    """The formula in plain Python floats: max_c |x_c| / sqrt(mean_c x_c^2)."""
    return max(abs(v) for v in row) / math.sqrt(sum(v * v for v in row) / len(row))


def test_token_peak_to_rms_matches_float64_reference():
    x = _tokens_with_outliers()
    got = token_peak_to_rms(x)
    assert got.dtype == torch.float64 and got.shape == (3, 5)
    torch.testing.assert_close(got, token_peak_to_rms_ref(x), rtol=1e-12, atol=0, equal_nan=True)
    for b, t in ((0, 0), (0, 1), (2, 3)):
        assert got[b, t].item() == pytest.approx(_peak_to_rms_python(x[b, t].tolist()), rel=1e-12)
    assert math.isnan(got[1, 2]) and got[2, 4].item() == pytest.approx(1.0, rel=1e-15)
    finite = got[~got.isnan()]
    assert bool((finite >= 1).all() and (finite <= 4 + 1e-12).all())  # 1 <= r_t <= sqrt(C)
    assert got[0, 0] > 3.9 and bool((got[0, 1:] < 3.5).all())


def test_activation_stats_count_every_token_in_a_bounded_histogram():
    xs = [_tokens_with_outliers(seed) for seed in range(3)]
    model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    stats = activation_stats(model, [{"input": x} for x in xs], exclude=(), progress=False)["0"]
    ref = torch.cat([token_peak_to_rms_ref(x).flatten() for x in xs])
    ref = ref[~ref.isnan()].sort().values  # the all-zero tokens are left out
    hist = stats["token_peak_to_rms_hist"]
    assert stats["tokens"] == ref.numel() == 42 and int(hist.sum()) == 42
    assert hist.shape == (len(TOKEN_RATIO_EDGES) - 1,)
    bins = torch.searchsorted(TOKEN_RATIO_EDGES, ref, right=True) - 1
    assert torch.equal(hist, torch.bincount(bins, minlength=len(TOKEN_RATIO_EDGES) - 1))
    assert stats["token_peak_to_rms_max"] == pytest.approx(ref.max().item(), rel=1e-12)
    assert stats["token_peak_to_rms_mean"] == pytest.approx(ref.mean().item(), rel=1e-12)
    bin_ratio = (TOKEN_RATIO_EDGES[1] / TOKEN_RATIO_EDGES[0]).item()
    for q, key in ((0.5, "p50"), (0.99, "p99")):
        exact = ref[math.ceil(q * len(ref)) - 1].item()  # the value the cumulative count reaches q * n at
        assert exact <= stats[f"token_peak_to_rms_{key}"] <= exact * bin_ratio * (1 + 1e-12), key


def test_token_statistics_stay_bounded_in_memory():
    moments = ActivationMoments()
    for shape in ((4000, 16), (7, 3, 16), (1, 16)):
        moments.update(torch.randn(shape))
    tensors = [v for v in vars(moments).values() if isinstance(v, torch.Tensor)]
    assert moments.tokens == 4022 and max(t.numel() for t in tensors) == len(TOKEN_RATIO_EDGES) - 1
    empty = ActivationMoments()
    empty.update(torch.zeros(3, 16))  # all-zero tokens: counted nowhere
    summary = empty.summary()
    assert summary["tokens"] == 0 and math.isnan(summary["token_peak_to_rms_max"]) and math.isnan(summary["token_peak_to_rms_p50"])
    assert math.isnan(histogram_quantile(torch.zeros(5, dtype=torch.int64), 0.5))


def test_summary_pools_the_token_histograms_of_a_kind():
    _, stats = _stats("llama")
    summary = summarize_by_kind(stats, stats)
    for kind, row in summary.items():
        names = [n for n in stats if leaf_name(n) == kind]
        pooled = sum(stats[n]["token_peak_to_rms_hist"] for n in names)
        assert row["before"]["token_peak_to_rms_p50"] == histogram_quantile(pooled, 0.5)
        assert row["before"]["token_peak_to_rms_p99"] == histogram_quantile(pooled, 0.99)
        assert row["before"]["token_peak_to_rms_max"] == max(stats[n]["token_peak_to_rms_max"] for n in names)
    no_tokens = {n: {k: v for k, v in s.items() if not k.startswith("token")} for n, s in stats.items()}
    assert "token_peak_to_rms_p50" not in summarize_by_kind(no_tokens, no_tokens)["q_proj"]["before"]  # older stats


def test_rotation_narrows_the_per_token_range_of_a_model_with_an_outlier_channel():
    from rolora_plugin import RotationConfig, rotate_model_

    model = tiny_model("llama", hidden=64, intermediate=128)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30.0  # an outlier channel in the residual stream
    ids = random_ids(batch=4, seq=32)
    before = activation_stats(model, [ids], progress=False)
    rotate_model_(model, RotationConfig(seed=0), progress=False)
    after = activation_stats(model, [ids], progress=False)
    q = "model.layers.0.self_attn.q_proj"
    assert before[q]["token_peak_to_rms_p50"] > 6  # close to sqrt(64) = 8: the outlier channel is every token's peak
    assert after[q]["token_peak_to_rms_max"] < before[q]["token_peak_to_rms_p50"] / 1.5


# ---------------------------------------------------------------------------------------------- plots


def test_plots_of_a_fused_family_replace_older_files_atomically(tmp_path):
    _, stats = _stats("phi3", layers=3)
    (tmp_path / "k.png").write_bytes(b"an older plot")
    assert plot_kurtosis_per_layer(tmp_path / "k.png", stats, stats).read_bytes()[:8] == PNG_MAGIC
    assert plot_channel_magnitudes(tmp_path / "m.png", stats, stats).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.png", "m.png"]


def test_write_plots_with_loss_curves(tmp_path):
    model, stats = _stats("llama")
    curve = [(s, 3.0 - 0.1 * s) for s in range(1, 17)]
    tuned = {"lora": {"loss_curve": curve}, "rolora": {"loss_curve": [(s, v - 0.05) for s, v in curve]}}
    paths = write_plots(tmp_path, stats, stats, tuned, input_kinds(model))
    assert set(paths) == {"kurtosis", "activation_magnitude", "training_loss"}
    assert all(open(p, "rb").read(8) == PNG_MAGIC for p in paths.values())
    assert len(list(tmp_path.iterdir())) == 3


def test_write_plots_with_demo_results_adds_the_w4a4_chart(tmp_path):
    model, stats = _stats("llama")
    results = _fake_results()
    paths = write_plots(tmp_path, stats, stats, results["finetune"], input_kinds(model), results)
    assert set(paths) == {"kurtosis", "activation_magnitude", "training_loss", "w4a4_perplexity"}
    assert paths["w4a4_perplexity"].endswith("w4a4_perplexity.png") and paths["activation_magnitude"].endswith("activation_magnitude.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(path.rsplit("/", 1)[-1] for path in paths.values())


def _png_size_and_dpi(path) -> tuple[int, int, float]:
    """(width, height, dots per inch) from a PNG's IHDR and pHYs chunks."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])
    at = data.index(b"pHYs")
    per_metre, _, unit = struct.unpack(">IIB", data[at + 4 : at + 13])
    assert unit == 1  # metres
    return width, height, per_metre * 0.0254


def _labelled(fig) -> list:
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert axes and all(ax.get_ylabel() and ax.get_xlabel() for ax in axes), [ax.get_ylabel() for ax in axes]
    return axes


def test_plots_are_readable_sizes_at_the_stated_dpi(tmp_path):
    model, stats = _stats("llama", layers=3)
    kinds = input_kinds(model)
    for plot, min_w, min_h in ((plot_kurtosis_per_layer, 1400, 900), (plot_token_ranges, 2000, 900),
                               (plot_channel_magnitudes, 1400, 500)):  # fmt: skip
        w, h, dpi = _png_size_and_dpi(plot(tmp_path / f"{plot.__name__}.png", stats, stats, kinds))
        assert w >= min_w and h >= min_h and dpi == pytest.approx(DPI, abs=0.1), (plot.__name__, w, h, dpi)
        assert w / h < 2.5, plot.__name__  # not a thin strip (the old kurtosis plot was 1772 x 408)


def test_token_ranges_plot_shows_the_per_token_distribution_and_per_layer_worst_tokens():
    from rolora_plugin.app.plots import token_ranges_figure

    model, stats = _stats("llama", layers=3)
    kinds = input_kinds(model)
    fig = token_ranges_figure(stats, stats, kinds)
    axes = _labelled(fig)
    assert len(axes) == 2 * len(kinds)
    top, bottom = axes[: len(kinds)], axes[len(kinds) :]
    for ax, kind in zip(top, kinds):
        assert "per-token" in ax.get_xlabel() and kind in ax.get_title()
        ecdf = ax.get_lines()[0]
        y = ecdf.get_ydata()
        assert list(ecdf.get_xdata()) == TOKEN_RATIO_EDGES.tolist() and y[0] == 0 and y[-1] == pytest.approx(1.0)
        assert all(b >= a for a, b in zip(y, y[1:]))  # a distribution function
    for ax, kind in zip(bottom, kinds):
        names = sorted((n for n in stats if leaf_name(n) == kind), key=lambda n: int(n.split(".")[2]))
        worst = ax.get_lines()[0]
        assert list(worst.get_xdata()) == [0, 1, 2]
        assert list(worst.get_ydata()) == [stats[n]["token_peak_to_rms_max"] for n in names]
    agg_close(fig)


def agg_close(fig) -> None:
    from rolora_plugin.app.plots import agg_pyplot

    agg_pyplot().close(fig)


def test_every_panel_is_labelled():
    from rolora_plugin.app.plots import channel_magnitudes_figure, kurtosis_figure, losses_figure, w4a4_figure

    model, stats = _stats("phi3", layers=2)
    kinds = input_kinds(model)
    for fig in (kurtosis_figure(stats, stats, kinds), channel_magnitudes_figure(stats, stats),
                losses_figure(_fake_results()["finetune"]), w4a4_figure(_fake_results())):  # fmt: skip
        _labelled(fig)
        agg_close(fig)


def _fake_results(steps: int = 16) -> dict:
    """The parts of run_demo's results the table and the bar chart read, with made-up numbers."""
    curve = [(s, 3.0 - 0.1 * s + (0.4 if s % 2 else -0.4)) for s in range(1, steps + 1)]  # swings ±0.4

    def tuned(shift, w4a4_resp, w4a4_text):
        history = [{"step": s, "loss": v - shift} for s, v in curve]
        return {"loss_curve": [(s, v - shift) for s, v in curve], **_loss_summary(history, 3.0 + shift),
                "fp": {"response_ppl": 3.0 + shift, "text_ppl": 20.0}, "w4a4": {"response_ppl": w4a4_resp, "text_ppl": w4a4_text}}  # fmt: skip

    return {
        "model": {"name": "TinyLM", "note": "made up"}, "data": {"perplexity": "BoolQ validation passages, 2 x 128 tokens"},
        "rotation": {"rotations": ["r1", "r2", "r4"]},
        "exactness": {"max_abs_logit_diff": 1e-5, "max_abs_logit": 30.0, "argmax_agreement": 1.0, "ppl_fp": 20.0, "ppl_rotated": 20.0},
        "kurtosis": {"summary": {"q_proj": {tag: {"kurtosis_mean": k, "kurtosis_max": 2 * k, "token_peak_to_rms_p50": r,
                                                   "token_peak_to_rms_max": 2 * r} for tag, k, r in (("before", 100.0, 16.0), ("after", 3.0, 3.0))}}},
        "quantization": [{"setting": "FP", "rotation": "none", "perplexity": 20.0},
                         {"setting": "FP", "rotation": "rotated", "perplexity": 20.0},
                         {"setting": "W4A4", "rotation": "none", "recipe": "RTN", "perplexity": 5000.0},
                         {"setting": "W4A4", "rotation": "rotated", "recipe": "RTN", "perplexity": 60.0},
                         {"setting": "W4A4", "rotation": "rotated", "recipe": "GPTQ+clip", "perplexity": 40.0}],
        "finetune": {"train_examples": 32, "eval_examples": 8, "base_fp_response_ppl": 5.0,
                     "lora": tuned(0.0, 900.0, 3000.0), "rolora": tuned(0.05, 9.0, 55.0)},
        "deploy": {"model": "RoLoRA merged", "fp": {"text_ppl": 20.0, "response_ppl": 3.05}, "export_kept": False,
                   "rows": [_deploy_row("w4a4-int", 30.0, 30.0, 4.0, "CompressedTensorsWNA4Int", None),
                            _deploy_row("nvfp4", 24.0, 24.2, 3.5, "CompressedTensorsW4A4Fp4", 3e-3)]},
        "config": {"method": "rtn", "clip_search": False, "train_steps": steps, "lora_r": 16, "lora_targets": ["q_proj", "v_proj"],
                   "batch_size": 2},
        "timings_s": {"total": 547.0},
    }  # fmt: skip


def _deploy_row(preset, ppl, consumer, response, scheme, bf16_rel):
    check = {"consumer": {"rel_err": 0.0 if bf16_rel is None else 2e-2}, "ppl": {"rolora": ppl, "consumer": consumer}}
    if bf16_rel is not None:
        check["bf16_weights"] = {"rel_err": bf16_rel}
    return {"preset": preset, "recipe": "GPTQ+clip (50-pt grid), 4x128 calib. tokens", "config": {"method": "gptq"},
            "text_ppl": ppl, "consumer_text_ppl": consumer,
            "ratio_to_fp": ppl / 20.0, "response_ppl": response, "engine": {"servable": True, "scheme": scheme, "reasons": []},
            "check": check, "same_model": (bf16_rel or 0.0) <= 1e-4, "consumer_rel_err": bf16_rel or 0.0,
            "compared_with": "exact weights" if bf16_rel is None else "bf16-rounded weights",
            "export": {"path": None, "bytes": 281_000_000, "files": {}}}  # fmt: skip


def test_w4a4_chart_has_one_point_per_model_and_recipe_as_a_ratio_to_fp(tmp_path):
    from rolora_plugin.app.plots import CONSUMER_DX, ROTATED, UNROTATED, w4a4_figure

    results = _fake_results()
    text, response = w4a4_points(results)
    assert [(p["label"].replace("\n", " "), p["ppl"], p["fp"], p["kind"]) for p in text] == [
        ("base, no rotation RTN", 5000.0, 20.0, "rtn"), ("base, rotated RTN", 60.0, 20.0, "rtn"),
        ("base, rotated GPTQ+clip", 40.0, 20.0, "calibrated"), ("LoRA merged RTN", 3000.0, 20.0, "rtn"),
        ("RoLoRA merged RTN", 55.0, 20.0, "rtn"), ("RoLoRA merged w4a4-int, GPTQ", 30.0, 20.0, "servable"),
        ("RoLoRA merged nvfp4, GPTQ", 24.0, 20.0, "servable")]  # fmt: skip
    assert [p["ratio"] for p in text] == [p["ppl"] / p["fp"] for p in text]
    assert [p["consumer_ratio"] for p in text][-2:] == [30.0 / 20.0, 24.2 / 20.0] and text[0]["consumer_ratio"] is None
    assert [(p["label"].replace("\n", " "), p["ppl"], p["fp"]) for p in response] == [
        ("LoRA merged RTN", 900.0, 3.0), ("RoLoRA merged RTN", 9.0, 3.05), ("RoLoRA merged w4a4-int, GPTQ", 4.0, 3.05),
        ("RoLoRA merged nvfp4, GPTQ", 3.5, 3.05)]  # fmt: skip
    # colours as in the loss and kurtosis plots: not rotated (base, LoRA) blue, rotated (base, RoLoRA) orange
    assert [p["color"] for p in text] == [UNROTATED, ROTATED, ROTATED, UNROTATED, ROTATED, ROTATED, ROTATED]
    assert (UNROTATED, ROTATED) == ("tab:blue", "tab:orange")
    fig = w4a4_figure(results)
    text_ax, response_ax = fig.axes
    assert not text_ax.patches[1:] and not response_ax.patches[1:]  # no bars (one shaded span of the servable presets)
    drawn = [line for line in text_ax.get_lines() if line.get_marker() not in ("None", "+") and len(line.get_xdata()) == 1]
    assert [line.get_ydata()[0] for line in drawn] == [p["ratio"] for p in text]
    assert [line.get_color() for line in drawn] == [p["color"] for p in text]
    consumer = [line for line in text_ax.get_lines() if line.get_marker() == "+"]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in consumer] == [(5 + CONSUMER_DX, 1.5), (6 + CONSUMER_DX, 24.2 / 20.0)]
    assert text_ax.get_yscale() == "log" and "FP perplexity" in text_ax.get_ylabel()
    assert any(line.get_ydata()[0] == 1.0 and line.get_linestyle() == "--" for line in text_ax.get_lines())  # the FP line
    lo, hi = text_ax.get_ylim()
    assert lo < 1.0 and hi > 5000 / 20  # every point and the FP line inside, no arbitrary floor
    agg_close(fig)
    no_deploy = {k: v for k, v in results.items() if k != "deploy"}
    assert [p["kind"] for p in w4a4_points(no_deploy)[0]] == ["rtn", "rtn", "calibrated", "rtn", "rtn"]
    agg_close(w4a4_figure(no_deploy))
    path = plot_w4a4_perplexity(tmp_path / "w4a4.png", results)
    assert _png_size_and_dpi(path)[2] == pytest.approx(DPI, abs=0.1)
    only_fp = {**results, "quantization": results["quantization"][:2], "finetune": {}, "deploy": {}}
    with pytest.raises(ValueError, match="no W4A4 rows"):
        w4a4_figure(only_fp)


def test_loss_plot_marks_the_held_out_loss_and_smooths_the_swings():
    from rolora_plugin.app.plots import losses_figure, smoothed

    tuned = _fake_results()["finetune"]
    fig = losses_figure(tuned)
    ax, low_bit = fig.axes
    points = {line.get_label(): line for line in low_bit.get_lines()}
    assert list(points["FP"].get_ydata()) == [tuned["lora"]["held_out_loss"]]
    assert list(points["W4A4"].get_ydata()) == [pytest.approx(math.log(tuned["lora"]["w4a4"]["response_ppl"]))]
    assert [line.get_ydata()[0] for label, line in points.items() if label == "_w4a4"] == [
        pytest.approx(math.log(tuned["rolora"]["w4a4"]["response_ppl"]))]  # RoLoRA's W4A4 point
    lines = {line.get_label(): line for line in ax.get_lines()}
    raw = [v for _, v in tuned["rolora"]["loss_curve"]]
    assert list(lines["RoLoRA: 4-step moving average"].get_ydata()) == smoothed(raw, 4)
    marker = next(line for label, line in lines.items() if label.startswith("RoLoRA: held-out loss"))
    assert list(marker.get_ydata()) == [tuned["rolora"]["held_out_loss"]] and list(marker.get_xdata()) == [16]
    base = next(line for label, line in lines.items() if label.startswith("base model: held-out loss before"))
    assert base.get_ydata()[0] == pytest.approx(math.log(5.0))
    swing = max(abs(a - b) for a, b in zip(raw, raw[1:]))
    sm = smoothed(raw, 4)[4:]
    assert max(abs(a - b) for a, b in zip(sm, sm[1:])) < swing / 4  # the moving average does not swing like single steps
    agg_close(fig)
    short = {name: {"loss_curve": [(1, 3.0), (2, 2.5), (3, 2.7), (4, 2.6)]} for name in ("lora", "rolora")}
    fig = losses_figure(short)  # 4 steps: a "1-step moving average" would say nothing, so there is none
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["LoRA: each step (one batch)", "RoLoRA: each step (one batch)"]
    agg_close(fig)


def test_loss_summary_averages_the_last_quarter_and_takes_the_held_out_loss():
    history = [{"step": s, "loss": float(s), "learning_rate": 1e-4} for s in range(1, 13)] + [{"step": 13, "loss": float("nan")}]
    summary = _loss_summary(history + [{"step": 13, "train_loss": 5.0}], math.e**2)
    assert summary == {"train_loss_smoothed": (10 + 11 + 12) / 3, "train_loss_steps": [10, 12], "held_out_loss": pytest.approx(2.0)}
    assert _loss_summary([], 1.0)["train_loss_smoothed"] is None


def test_demo_table_explains_its_columns_and_reports_no_single_batch_loss():
    results = _fake_results()
    table = format_demo_table(results)
    for needle in ("exactness", "Perplexity (RTN)", "W4A4", "RoLoRA", "wall time: 547 s", "Per-token max|x|/rms",
                   "train loss: mean training loss over steps 13-16", "held-out loss / answer ppl:", "text ppl:",
                   "WxAy: weights x-bit per output channel", "base (no fine-tune)"):  # fmt: skip
        assert needle in table, needle
    assert "final loss" not in table and "resp ppl" not in table
    rolora = next(line for line in table.splitlines() if line.strip().startswith("RoLoRA"))
    want = results["finetune"]["rolora"]
    assert rolora.split()[1:] == [f"{want['train_loss_smoothed']:.3f}", f"{want['held_out_loss']:.3f}", "3.05", "9.00", "20.00", "55.00"]
    assert max(len(line) for line in table.splitlines()) <= 110
    assert "rotated, GPTQ+clip" in table  # a second recipe gets its own row, not the RTN row's place


def test_demo_table_ends_with_the_deploy_recipe_and_labels_rtn_as_not_it():
    results = _fake_results()
    table = format_demo_table(results)
    lines = table.splitlines()
    assert "Quantization grid: RTN (no calibration) — not the deploy recipe (see Deploy below)" in lines
    assert any("(smoothed)" in line and line.count("W4A4 RTN") == 2 for line in lines)  # the fine-tune table's header
    deploy = lines.index(next(line for line in lines if line.startswith("Deploy: the fine-tuned RoLoRA model")))
    assert deploy > lines.index(next(line for line in lines if line.strip().startswith("RoLoRA")))  # the demo ends with it
    rows = {line.split()[0]: line.split()[1:] for line in lines[deploy:] if line.startswith("  ") and line.split()[0] in
            ("FP", "w4a4-int", "nvfp4", "W4A4")}  # fmt: skip
    assert rows["FP"] == ["(float32)", "20.00", "1.00x", "3.05"]
    assert rows["w4a4-int"] == ["30.00", "1.50x", "30.00", "4.00", "0.0e+00", "yes"]
    assert rows["nvfp4"] == ["24.00", "1.20x", "24.20", "3.50", "3.0e-03", "NO*"]  # bf16-weight comparison above 1e-4
    assert rows["W4A4"] == ["RTN", "(no", "calib.)", "55.00", "2.75x", "9.00"]
    text = " ".join(" ".join(lines[deploy:]).split())
    for needle in ("w4a4-int: GPTQ+clip (50-pt grid), 4x128 calib. tokens; servable, vLLM CompressedTensorsWNA4Int; export 281 MB",
                   "temporary folder, removed", "vLLM CompressedTensorsW4A4Fp4", "rounded to bf16", "rel. 2.0e-02",
                   "RTN (no calibration) — not the deploy recipe", "compressed-tensors' own"):  # fmt: skip
        assert needle in text, needle
    assert max(len(line) for line in lines) <= 110 and lines[-1] == "wall time: 547 s"
    no_deploy = format_demo_table({k: v for k, v in results.items() if k != "deploy"})
    assert "Deploy:" not in no_deploy and "(see Deploy below)" not in no_deploy


def test_compared_recipes_add_rotated_w4a4_rows():
    from rolora_plugin import RotationConfig, rotate_model_
    from rolora_plugin.app.demo import DemoConfig, _quant_grid

    with pytest.raises(ValueError, match="unknown recipe"):
        DemoConfig(compare_recipes=["awq"])
    assert DemoConfig(compare_recipes=["gptq"], servable=[]).needs_calibration()
    assert not DemoConfig(compare_recipes=["rtn+clip"], servable=[]).needs_calibration()
    assert DemoConfig.for_size("full").compare_recipes == ["gptq+clip"] and DemoConfig.for_size("small").compare_recipes == []
    fp = tiny_model("llama")
    rotated = tiny_model("llama")
    rotate_model_(rotated, RotationConfig(seed=0), progress=False)
    chunks = random_ids(batch=2, seq=16)
    rows = _quant_grid(fp, rotated, DemoConfig(quant_bits=[4], compare_recipes=["rtn", "rtn+clip"]), chunks, None)
    assert [(r["rotation"], r["recipe"]) for r in rows] == [("none", "RTN"), ("rotated", "RTN"), ("rotated", "RTN+clip")]
    assert all(math.isfinite(r["perplexity"]) and r["setting"] == "W4A4" for r in rows)
    assert rows[2]["perplexity"] != rows[1]["perplexity"]  # the clip search changed the weights


# ---------------------------------------------------------------------------------------------- response perplexity


def test_response_perplexity_over_padded_batches_matches_unpadded_reference():
    model = tiny_model("llama", dtype=torch.float64).train()
    g = torch.Generator().manual_seed(4)
    rows = []
    for length, n_prompt in ((9, 4), (14, 6), (5, 2), (11, 10)):  # different lengths: padding in every batch
        ids = torch.randint(3, 101, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    got = response_perplexity(model, SimpleNamespace(pad_token_id=0, eos_token_id=2), rows, batch_size=3)
    assert model.training  # the caller's mode is restored
    total, count = 0.0, 0
    with torch.no_grad():
        model.eval()
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            keep = labels != -100
            total -= logp[keep].gather(-1, labels[keep, None]).sum().item()
            count += int(keep.sum())
    assert got == pytest.approx(math.exp(total / count), rel=1e-10)


# ---------------------------------------------------------------------------------------------- build_once


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_build_once_removes_staging_left_by_a_killed_build(tmp_path):
    stale = tmp_path / ".asset.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.bin").write_text("half")
    (stale / STAGING_MARKER).write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    foreign = tmp_path / ".asset.tmp-notours"  # no marker: not created by this tool, never touched
    foreign.mkdir()
    def build(tmp):
        (tmp / "model.bin").write_text("full")
        return {}

    build_once(tmp_path / "asset", build)
    assert (tmp_path / "asset" / "model.bin").read_text() == "full" and (tmp_path / "asset" / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".asset.tmp-notours", "asset"]


def test_build_once_never_replaces_a_folder_that_appears_meanwhile(tmp_path):
    target = tmp_path / "asset"

    def build(tmp):  # while we build, someone else puts their own files at the target
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        (tmp / "model.bin").write_text("weights")
        return {}

    with pytest.raises(AssetError, match="incomplete"):
        build_once(target, build)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]  # our staging copy is gone
