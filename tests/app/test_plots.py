"""Input kinds of the activation statistics (taken from each family's ArchitectureSpec, fused Phi-3 included), the
app's plots, the demo's response perplexity over padded batches, and build_once on the shared publisher."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rolora_plugin import get_architecture
from rolora_plugin.app.assets import COMPLETE_MARKER, AssetError, build_once
from rolora_plugin.app.demo import response_perplexity
from rolora_plugin.app.plots import plot_channel_magnitudes, plot_kurtosis_per_layer, write_plots
from rolora_plugin.kurtosis import activation_stats, input_kinds, kinds_from_names, leaf_name, summarize_by_kind
from rolora_plugin.publish import STAGING_MARKER
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
