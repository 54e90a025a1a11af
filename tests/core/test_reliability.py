"""Reliability guarantees of the core (issue 12): nothing the user had is lost, never a silently wrong model.

Each test here failed on the code before the fix: publishing replaced a folder that appeared while staging, an
adapter merged into any same-shaped base, a quantized model exported as FP reloaded without its activation
quantizers, NaN weights were rotated into whole NaN rows, killed runs left staging folders behind forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rolora_plugin import RotationConfig, RotationError, merge_and_export, rotate_model_
from rolora_plugin.io.export import load_rotated, write_rotation_record
from rolora_plugin.rotate.fingerprint import weights_fingerprint
from rolora_plugin.io.publish import (
    STAGING_MARKER,
    OutputExistsError,
    atomic_output_dir,
    atomic_write_text,
    clean_stale_staging,
    publish_path,
)
from rolora_plugin.rotate.rotation import RotationRecord, get_rotation_record
from tests.helpers import logits, lora, random_ids, rel_err, tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------------------------------------- publishing


def test_folder_appearing_while_staging_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared"):
        with atomic_output_dir(out) as tmp:
            (tmp / "model.safetensors").write_text("new")
            out.mkdir()  # the user (or another run) creates the folder while we stage
            (out / "thesis.txt").write_text("draft")
    assert (out / "thesis.txt").read_text() == "draft"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_merge_and_export_never_replaces_a_folder_that_appears_mid_export(tmp_path):
    """The tokenizer is saved while staging: a tokenizer whose save creates the target stands for a racing user."""
    model = tiny_model("llama")
    rotate_model_(model, progress=False)
    out = tmp_path / "out"

    class RacingTokenizer:
        def save_pretrained(self, directory):
            out.mkdir()
            (out / "thesis.txt").write_text("draft")

    with pytest.raises(OutputExistsError):
        merge_and_export(model, out, tokenizer=RacingTokenizer())
    assert (out / "thesis.txt").read_text() == "draft"
    assert _leftovers(tmp_path, "out") == []


_RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rolora_plugin.io.publish import atomic_output_dir, OutputExistsError
    target, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    try:
        with atomic_output_dir(target) as tmp:
            (tmp / "who.txt").write_text(me)
            (target.parent / f"ready-{me}").touch()
            while not (target.parent / f"ready-{other}").exists():  # both have staged before either publishes
                time.sleep(0.01)
    except OutputExistsError as e:
        print("LOST", e)
        sys.exit(3)
    print("WON")
    """
)


def test_two_concurrent_publishers_one_wins_one_fails_cleanly(tmp_path):
    target = tmp_path / "out"
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(target), me, other], stdout=subprocess.PIPE, text=True)
        for me, other in (("a", "b"), ("b", "a"))
    ]
    results = [(p.wait(timeout=60), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 3], results
    winner = next(out for code, out in results if code == 0)
    assert "WON" in winner
    assert (target / "who.txt").read_text() in ("a", "b")
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_overwrite_replaces_and_leaves_no_old_copy(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "folder":
        out.mkdir()
        (out / "old.txt").write_text("old")
    else:
        out.write_text("old file")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_overwrite_restores_the_old_content_when_the_final_rename_fails(tmp_path, monkeypatch):
    import rolora_plugin.io.publish as publish

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staged = tmp_path / "staged"
    staged.mkdir()
    real = publish.rename_noreplace
    calls = []

    def failing_first(src, dst):  # fault injection: the first rename into place fails (e.g. disk error)
        calls.append(src)
        if len(calls) == 1:
            raise OSError(5, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(publish, "rename_noreplace", failing_first)
    with pytest.raises(OSError, match="I/O error"):
        publish_path(staged, out, overwrite=True)
    assert (out / "old.txt").read_text() == "old"
    assert _leftovers(tmp_path, "out") == []


def test_atomic_write_text_create_exclusive(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_text(path, "1")
    with pytest.raises(OutputExistsError):
        atomic_write_text(path, "2", overwrite=False)
    assert path.read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rolora_plugin.io.publish import atomic_output_dir
    with atomic_output_dir(Path(sys.argv[1])) as tmp:
        (tmp / "big.bin").write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(120)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_staging_left_by_a_killed_run_is_removed_by_the_next_run(tmp_path, sig):
    target = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target)], stdout=subprocess.PIPE, text=True)
    staging = Path(proc.stdout.readline().strip())
    assert (staging / STAGING_MARKER).is_file()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    foreign = tmp_path / ".out.tmp-notours"  # same name pattern, no marker: not ours, never touched
    foreign.mkdir()
    if staging.exists():  # SIGTERM without a handler kills without cleanup too
        with atomic_output_dir(target) as tmp:
            (tmp / "ok").write_text("1")
    assert not staging.exists()
    assert foreign.is_dir()
    assert (target / "ok").read_text() == "1" or sig == signal.SIGTERM


def test_staging_of_a_live_process_is_kept(tmp_path):
    target = tmp_path / "out"
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    (live / STAGING_MARKER).write_text(f"{os.getppid()} {os.uname().nodename}\n")
    assert clean_stale_staging(target) == []
    assert live.is_dir()


# ---------------------------------------------------------------------------------------------- base fingerprint


def _adapter_dir(tmp_path, base_seed=0):
    from transformers import AutoModelForCausalLM

    base = tmp_path / f"base{base_seed}"
    tiny_model("llama", seed=base_seed).save_pretrained(base)
    peft_model = lora(AutoModelForCausalLM.from_pretrained(base))
    record = rotate_model_(peft_model, RotationConfig(r2=True), progress=False)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    write_rotation_record(tmp_path / "adapter", record)
    return base, peft_model


def test_export_refuses_a_base_that_is_not_the_adapters(tmp_path):
    base, peft_model = _adapter_dir(tmp_path)
    other = tmp_path / "other"
    tiny_model("llama", seed=7).save_pretrained(other)  # same shapes, different weights
    with pytest.raises(RotationError, match="not the model this adapter was trained on"):
        merge_and_export(tmp_path / "adapter", tmp_path / "export", base_model=str(other))
    assert not (tmp_path / "export").exists()
    out = merge_and_export(tmp_path / "adapter", tmp_path / "export", base_model=str(base))
    ids = random_ids()
    assert rel_err(logits(load_rotated(out), ids), logits(peft_model, ids)) <= 1e-5


def test_fingerprint_is_dtype_robust_and_weight_sensitive():
    model = tiny_model("llama")
    fp = weights_fingerprint(model)
    assert weights_fingerprint(tiny_model("llama").to(torch.bfloat16)) == fp
    assert weights_fingerprint(lora(tiny_model("llama"))) == fp  # LoRA factors and peft's names do not count
    assert weights_fingerprint(tiny_model("llama", seed=1)) != fp


def test_record_refuses_unknown_keys():
    model = tiny_model("llama")
    record = rotate_model_(model, progress=False)
    data = {**record.to_dict(), "surprise": 1}
    with pytest.raises(RotationError, match="unknown key"):
        RotationRecord.from_dict(data)
    assert RotationRecord.from_dict(record.to_dict()) == record


# ---------------------------------------------------------------------------------------------- quantized export


def test_quantized_model_is_not_exported_as_full_precision(tmp_path):
    from rolora_plugin import QuantConfig, quantize_model_

    model = tiny_model("llama")
    rotate_model_(model, progress=False)
    quantize_model_(model, QuantConfig(w_bits=4, a_bits=4), progress=False)
    with pytest.raises(RotationError, match="compressed-tensors"):
        merge_and_export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp_export_carrying_a_quant_record_is_refused_at_load(tmp_path):
    from rolora_plugin.config import QUANT_RECORD_KEY

    model = tiny_model("llama")
    rotate_model_(model, progress=False)
    out = merge_and_export(model, tmp_path / "out")
    import json

    cfg = json.loads((out / "config.json").read_text())
    cfg[QUANT_RECORD_KEY] = {"config": {"w_bits": 4, "a_bits": 4}}  # what the old code wrote for a W4A4 model
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RotationError, match="different model"):
        load_rotated(out)


# ---------------------------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_any_edit(bad):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RotationError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN or Inf"):
        rotate_model_(model, progress=False)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)
    assert get_rotation_record(model) is None


def test_rotation_record_timestamps_nothing_volatile():
    """Two rotations of the same weights with the same config give equal records (fingerprint included)."""
    a, b = tiny_model("llama"), tiny_model("llama")
    assert rotate_model_(a, progress=False) == rotate_model_(b, progress=False)


def test_fingerprint_samples_tensors_beyond_float32_index_range():
    """Sample positions of a tensor with more than 2**24 elements (SmolLM2's embedding has 28M) stay in range."""
    from rolora_plugin.rotate.fingerprint import fingerprint_tensors

    big = torch.zeros(2**24 + 7, dtype=torch.bfloat16)
    big[-1] = 1.0  # the last element is sampled: the fingerprint must see it
    assert fingerprint_tensors([("w", big)]) != fingerprint_tensors([("w", torch.zeros_like(big))])
