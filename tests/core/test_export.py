"""merge_and_export / load_rotated: verified merges, atomic output, second process, compressed-tensors check."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.helpers import logits, lora, random_ids, rel_err, tiny_model

from rolora_plugin import RotationConfig, RotationError, get_rotation_record, rotate_model_
from rolora_plugin.io.export import (
    RECORD_FILE,
    TRANSFORM_CONFIG_FILE,
    load_rotated,
    load_with_compressed_tensors,
    merge_and_export,
    read_rotation_record,
    write_rotation_record,
)

FP32_RTOL = 1e-5  # merged vs unmerged LoRA in float32 (issue 4 acceptance)
ALL_ROTATIONS = RotationConfig(r2=True, r3=True)


def _lora(model, targets="all-linear"):
    return lora(model, targets)


def _rotated_peft(family="llama", targets="all-linear", rotation=ALL_ROTATIONS, **kw):
    model = tiny_model(family, **kw)
    rotate_model_(model, rotation, progress=False)
    return _lora(model, targets)


def _listing(path):
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family, targets", [("llama", ["q_proj", "v_proj"]), ("llama", "all-linear"), ("phi3", "all-linear")])
def test_export_live_peft_model_load_rotated_samelogits(tmp_path, family, targets):
    ids = random_ids()
    peft_model = _rotated_peft(family, targets)
    ref = logits(peft_model, ids)
    out = merge_and_export(peft_model, tmp_path / "export")
    assert {"config.json", "model.safetensors", RECORD_FILE} <= set(_listing(out))
    assert rel_err(logits(peft_model, ids), ref) == 0  # the live PeftModel is not merged in place
    loaded = load_rotated(out)
    assert rel_err(logits(loaded, ids), ref) <= FP32_RTOL
    assert read_rotation_record(out) == get_rotation_record(loaded) == get_rotation_record(peft_model.base_model.model)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_second_process_loading_the_export_gets_the_samelogits(tmp_path):
    ids = random_ids()
    peft_model = _rotated_peft()
    ref = logits(peft_model, ids)
    out = merge_and_export(peft_model, tmp_path / "export")
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(
        f"""
        import torch
        from rolora_plugin.io.export import load_rotated
        model = load_rotated({str(out)!r})
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert rel_err(torch.load(tmp_path / "logits.pt"), ref) <= FP32_RTOL


def test_plain_from_pretrained_without_online_modules_differs(tmp_path):
    """The online rotations are needed: a plain load of the export is *not* the model (so load_rotated matters)."""
    from transformers import AutoModelForCausalLM

    ids = random_ids()
    peft_model = _rotated_peft()
    out = merge_and_export(peft_model, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert rel_err(logits(plain, ids), logits(peft_model, ids)) > 1e-3


def _save_unrotated_base(path, **kw):
    tiny_model("llama", **kw).save_pretrained(path)
    return path


def _adapter_from(base_dir, adapter_dir, rotation=ALL_ROTATIONS, write_record=True):
    """Load the base, attach LoRA, rotate the PeftModel (what RoLoRACallback does), save the adapter."""
    from transformers import AutoModelForCausalLM

    peft_model = _lora(AutoModelForCausalLM.from_pretrained(base_dir))
    record = rotate_model_(peft_model, rotation, progress=False)
    peft_model.save_pretrained(str(adapter_dir))
    if write_record:
        write_rotation_record(adapter_dir, record)
    return peft_model


def test_adapter_dir_on_unrotated_base_is_rotated_from_the_record(tmp_path):
    ids = random_ids()
    base = _save_unrotated_base(tmp_path / "base")
    peft_model = _adapter_from(base, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    out = merge_and_export(tmp_path / "adapter", tmp_path / "export")
    assert rel_err(logits(load_rotated(out), ids), logits(peft_model, ids)) <= FP32_RTOL


def test_adapter_dir_on_rotated_base_export(tmp_path):
    """Adapter trained on an exported rotated base: the base's record must equal the adapter's."""
    ids = random_ids()
    model = tiny_model("llama")
    rotate_model_(model, ALL_ROTATIONS, progress=False)
    base = merge_and_export(model, tmp_path / "rotated-base")
    peft_model = _lora(load_rotated(base))
    peft_model.save_pretrained(str(tmp_path / "adapter"))  # no record file: pass it explicitly
    with pytest.raises(RotationError, match=RECORD_FILE):
        merge_and_export(tmp_path / "adapter", tmp_path / "export")
    out = merge_and_export(tmp_path / "adapter", tmp_path / "export", record=get_rotation_record(model))
    assert rel_err(logits(load_rotated(out), ids), logits(peft_model, ids)) <= FP32_RTOL


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("out_exists", [False, True])
def test_missing_record_refused_and_out_dir_untouched(tmp_path, out_exists):
    base = _save_unrotated_base(tmp_path / "base")
    _adapter_from(base, tmp_path / "adapter", write_record=False)
    out = tmp_path / "export"
    if out_exists:
        out.mkdir()
    before = _listing(tmp_path)
    with pytest.raises(RotationError, match="without rolora_rotation.json"):
        merge_and_export(tmp_path / "adapter", out)
    assert _listing(tmp_path) == before
    assert not out.exists() or _listing(out) == []


def test_mismatched_record_refused_and_out_dir_untouched(tmp_path):
    base_model = tiny_model("llama")
    rotate_model_(base_model, RotationConfig(seed=1), progress=False)
    rotated_base = merge_and_export(base_model, tmp_path / "base-seed1")
    adapter_base = tiny_model("llama")
    record = rotate_model_(adapter_base, RotationConfig(seed=0), progress=False)
    peft_model = _lora(adapter_base)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    write_rotation_record(tmp_path / "adapter", record)
    before = _listing(tmp_path)
    with pytest.raises(RotationError, match="mismatch"):
        merge_and_export(tmp_path / "adapter", tmp_path / "export", base_model=rotated_base)
    assert _listing(tmp_path) == before
    with pytest.raises(RotationError, match="mismatch"):  # a live model with the wrong expected record
        merge_and_export(peft_model, tmp_path / "export", record=get_rotation_record(base_model))
    assert _listing(tmp_path) == before


def test_tampered_record_file_refused(tmp_path):
    base = _save_unrotated_base(tmp_path / "base")
    _adapter_from(base, tmp_path / "adapter")
    path = tmp_path / "adapter" / RECORD_FILE
    data = json.loads(path.read_text())
    data["rotations"]["r1"]["checksum"] = "0" * 16
    path.write_text(json.dumps(data))
    with pytest.raises(RotationError):
        merge_and_export(tmp_path / "adapter", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_unrotated_model_refused(tmp_path):
    with pytest.raises(RotationError, match="not rotated"):
        merge_and_export(_lora(tiny_model("llama")), tmp_path / "export")
    with pytest.raises(RotationError, match="not a rotated checkpoint"):
        load_rotated(_save_unrotated_base(tmp_path / "base"))


def test_non_empty_out_dir_needs_overwrite(tmp_path):
    ids = random_ids()
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    peft_model = _rotated_peft()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_and_export(peft_model, out)
    assert _listing(out) == ["keep.txt"]
    merge_and_export(peft_model, out, overwrite=True)
    assert "keep.txt" not in _listing(out)
    assert rel_err(logits(load_rotated(out), ids), logits(peft_model, ids)) <= FP32_RTOL
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from rolora_plugin.io import records

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(records, "write_rotation_record", boom)  # the record is written last, by seal_export
    with pytest.raises(OSError, match="disk full"):
        merge_and_export(_rotated_peft(), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- compressed-tensors


def _pow2_peft():
    # intermediate 128 and head_dim 16 are powers of two: compressed-tensors' ``hadamard`` can express R4 and R3
    return _rotated_peft("llama", "all-linear", intermediate=128)


@pytest.mark.parametrize("where", ["file", "config"])
def test_compressed_tensors_transform_config_reproduces_the_model(tmp_path, where):
    pytest.importorskip("compressed_tensors")
    ids = random_ids()
    peft_model = _pow2_peft()
    ref = logits(peft_model, ids)
    out = merge_and_export(peft_model, tmp_path / "export", transform_config=where)
    if where == "file":
        groups = json.loads((out / TRANSFORM_CONFIG_FILE).read_text())["config_groups"]
    else:
        groups = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]
    assert set(groups) == {"rolora_r4", "rolora_r3"}
    ct_model = load_with_compressed_tensors(out)  # no rolora code in its forward
    assert rel_err(logits(ct_model, ids), ref) <= FP32_RTOL
    assert rel_err(logits(load_rotated(out), ids), ref) <= FP32_RTOL


def test_no_transform_config_for_widths_compressed_tensors_cannot_express(tmp_path, caplog):
    peft_model = _rotated_peft("llama", intermediate=96)  # R4 width 96 = 12·8: Paley, not Sylvester
    with caplog.at_level(logging.INFO, logger="rolora_plugin"):
        out = merge_and_export(peft_model, tmp_path / "export")
    assert not (out / TRANSFORM_CONFIG_FILE).exists()
    said = [r for r in caplog.records if "no compressed-tensors transform_config" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]  # said once, as information: nothing is lost
    assert "load_rotated" in said[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(RotationError, match="no compressed-tensors transform_config"):
        load_with_compressed_tensors(out)


def test_transform_config_none_writes_nothing_extra(tmp_path):
    out = merge_and_export(_pow2_peft(), tmp_path / "export", transform_config="none")
    assert not (out / TRANSFORM_CONFIG_FILE).exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_tokenizer_is_copied_when_the_source_has_one(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(101)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0")
    base = _save_unrotated_base(tmp_path / "base")
    tok.save_pretrained(str(base))
    _adapter_from(base, tmp_path / "adapter")
    out = merge_and_export(tmp_path / "adapter", tmp_path / "export")  # base found via adapter_config.json
    assert (out / "tokenizer.json").is_file()
    assert not (merge_and_export(_rotated_peft(), tmp_path / "export2") / "tokenizer.json").exists()
