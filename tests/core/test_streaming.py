"""rolora_plugin.io.streaming.rotate_checkpoint against the in-memory path (rotate_model_ on the loaded model).

Every output tensor must be *bit-identical* (torch.equal) to the in-memory model's state dict, the record equal
(base_fingerprint included), config.json equal to what merge_and_export writes; refusals are the in-memory
path's, raised before anything is written; the output is published atomically.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.helpers import FAMILIES, random_ids, tiny_model

from rolora_plugin import (
    NoHadamardError,
    RotationConfig,
    RotationError,
    UnsupportedArchitectureError,
    get_rotation_record,
    merge_and_export,
    rotate_model_,
)
from rolora_plugin.io.export import load_rotated
from rolora_plugin.io.publish import STAGING_MARKER, OutputExistsError
from rolora_plugin.io.streaming import _header, all_finite, rotate_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: fastest and polite on one thread
COMBOS = [c for c in itertools.product([False, True], repeat=4) if any(c)]  # (r1, r2, r3, r4)
SHARD = "20KB"  # forces 6-12 input shards on the tiny models
OUT_SHARD = 30_000  # bytes: several output shards too


def _cfg(combo, **kw):
    r1, r2, r3, r4 = combo
    return RotationConfig(r1=r1, r2=r2, r3=r3, r4=r4, **kw)


def _ckpt(tmp_path, family="llama", *, tie=True, dtype=torch.float32, shard=SHARD, name="src", **kw) -> Path:
    src = tmp_path / name
    tiny_model(family, tie=tie, dtype=dtype, **kw).save_pretrained(src, max_shard_size=shard)
    return src


def _reference(src: Path, config: RotationConfig, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    return model, rotate_model_(model, config, progress=False)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_identical(out: Path, model, tied: bool, r1: bool) -> None:
    got, want = _tensors(out), model.state_dict()
    alias = {"lm_head.weight"} if tied and not r1 else set()  # still tied: saved once, like save_pretrained
    assert set(want) - set(got) == alias and set(got) <= set(want)
    for name, t in got.items():
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name


def _staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def _nothing_written(out: Path) -> None:
    assert not out.exists() and not _staging(out.parent)


# ---------------------------------------------------------------------------------------------- bit identity


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES + ("gemma",))
def test_bit_identical_to_in_memory_every_family(tmp_path, family, tie):
    src = _ckpt(tmp_path, family, tie=tie)
    config = RotationConfig(r2=True, r3=True)
    record = rotate_checkpoint(src, tmp_path / "out", config, max_shard_bytes=OUT_SHARD, progress=False)
    model, ref_record = _reference(src, config, torch.float32)
    assert record == ref_record and record.base_fingerprint == ref_record.base_fingerprint
    _assert_identical(tmp_path / "out", model, tie, r1=True)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "".join(f"r{i + 1}" for i, on in enumerate(c) if on))
def test_bit_identical_every_rotation_combination_bf16_tied(tmp_path, combo):
    src = _ckpt(tmp_path, "qwen2", tie=True, dtype=torch.bfloat16)  # biases, GQA, tied, bf16 rounding
    record = rotate_checkpoint(src, tmp_path / "out", _cfg(combo), max_shard_bytes=OUT_SHARD, progress=False)
    model, ref_record = _reference(src, _cfg(combo), torch.bfloat16)
    assert record == ref_record
    _assert_identical(tmp_path / "out", model, tied=True, r1=combo[0])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    sealed = dict(cfg["rolora"])
    assert set(sealed.pop("integrity")) == {"weights", "config"}  # checksums of what was written (issue 31)
    assert sealed == ref_record.to_dict() and cfg["tie_word_embeddings"] is (not combo[0])


def test_config_and_files_match_merge_and_export(tmp_path):
    src = _ckpt(tmp_path, "llama", tie=True, dtype=torch.bfloat16)
    rotate_checkpoint(src, tmp_path / "stream", RotationConfig(r2=True), progress=False)
    model, _ = _reference(src, RotationConfig(r2=True), torch.bfloat16)
    merge_and_export(model, tmp_path / "memory", inplace=True)
    a, b = tmp_path / "stream", tmp_path / "memory"
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert json.loads((a / "rolora_rotation.json").read_text()) == json.loads((b / "rolora_rotation.json").read_text())
    assert sorted(p.name for p in a.iterdir() if "safetensors" not in p.name) == sorted(
        p.name for p in b.iterdir() if "safetensors" not in p.name
    )


def test_power_of_two_widths_write_the_transform_config_like_merge_and_export(tmp_path):
    src = _ckpt(tmp_path, "llama", intermediate=128)  # R4 width 128: a Sylvester matrix compressed-tensors knows
    rotate_checkpoint(src, tmp_path / "stream", progress=False)
    model, _ = _reference(src, RotationConfig(), torch.float32)
    merge_and_export(model, tmp_path / "memory", inplace=True)
    ct = "transform_config.json"
    assert json.loads((tmp_path / "stream" / ct).read_text()) == json.loads((tmp_path / "memory" / ct).read_text())


def test_cast_on_read_equals_in_memory_in_that_dtype(tmp_path):
    src = _ckpt(tmp_path, "mistral", tie=False, dtype=torch.bfloat16)
    record = rotate_checkpoint(src, tmp_path / "out", RotationConfig(r2=True), dtype=torch.float32, progress=False)
    model, ref_record = _reference(src, RotationConfig(r2=True), torch.float32)
    assert record == ref_record
    _assert_identical(tmp_path / "out", model, tied=False, r1=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_float16_cast_gives_the_in_memory_record(tmp_path):
    """float16 double-rounds a float32 weight's fingerprint samples: they must come from the cast weights."""
    src = _ckpt(tmp_path, "llama", tie=False, dtype=torch.float32)
    record = rotate_checkpoint(src, tmp_path / "out", dtype=torch.float16, progress=False)
    model, ref_record = _reference(src, RotationConfig(), torch.float16)
    assert record == ref_record
    _assert_identical(tmp_path / "out", model, tied=False, r1=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_header_gives_the_tensors_bytes_shapes_and_dtypes(tmp_path, dtype):
    src = _ckpt(tmp_path, "qwen2", dtype=dtype)
    for shard in src.glob("*.safetensors"):
        data, tensors, header = shard.read_bytes(), load_file(shard), _header(shard)
        assert set(header) == set(tensors)
        for name, ((start, stop), shape, dt) in header.items():
            t = tensors[name]
            assert (shape, dt) == (tuple(t.shape), t.dtype)
            assert data[start:stop] == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_load_rotated_gives_the_in_memory_logits(tmp_path):
    src = _ckpt(tmp_path, "phi3", tie=True)
    config = RotationConfig(r2=True, r3=True)
    rotate_checkpoint(src, tmp_path / "out", config, max_shard_bytes=OUT_SHARD, progress=False)
    model, _ = _reference(src, config, torch.float32)
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(load_rotated(tmp_path / "out")(input_ids=ids).logits, model(input_ids=ids).logits)


def test_shards_respect_the_bound_and_the_index_covers_them(tmp_path):
    src = _ckpt(tmp_path, "llama", tie=False)
    rotate_checkpoint(src, tmp_path / "out", max_shard_bytes=OUT_SHARD, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) and len(files) > 1
    total = 0
    for f in files:
        tensors = load_file(tmp_path / "out" / f)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= OUT_SHARD or len(tensors) == 1
        assert all(index["weight_map"][n] == f for n in tensors)
        total += size
    assert index["metadata"]["total_size"] == total


def test_single_file_in_single_file_out_and_source_untouched(tmp_path):
    src = _ckpt(tmp_path, "qwen3", shard="50MB")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    rotate_checkpoint(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_tokenizer_and_generation_files_are_copied(tmp_path):
    src = _ckpt(tmp_path)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "tokenizer_config.json").write_text("{}")
    rotate_checkpoint(src, tmp_path / "out", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_matches_its_reference(dtype):
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 5, 64, 4099, 70_001):
        x = torch.randn(n, generator=g).to(dtype)
        assert all_finite(x) == bool(torch.isfinite(x).all())
        for bad in (float("nan"), float("inf"), -float("inf")):
            for pos in {0, n // 2, n - 1} if n else ():
                y = x.clone()
                y[pos] = bad
                assert all_finite(y) == bool(torch.isfinite(y).all()) is False
                assert all_finite(y.reshape(-1, 1).T) is False  # any layout


def _rewrite_tensor(src: Path, name: str, fn) -> None:
    """Apply ``fn`` to tensor ``name`` in its shard (``fn`` returning None removes it, index included)."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    new = fn(tensors.pop(name))
    if new is not None:
        tensors[name] = new
    else:
        del index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    save_file(tensors, shard, metadata={"format": "pt"})


def _edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_refuses_an_already_rotated_checkpoint(tmp_path):
    src = _ckpt(tmp_path)
    rotate_checkpoint(src, tmp_path / "once", progress=False)
    with pytest.raises(RotationError, match="already rotated"):
        rotate_checkpoint(tmp_path / "once", tmp_path / "twice", progress=False)
    _nothing_written(tmp_path / "twice")


def test_refuses_a_quantized_checkpoint(tmp_path):
    src = _ckpt(tmp_path)
    _edit_config(src, rolora_quant={"config": {"w_bits": 4, "a_bits": 4}})
    with pytest.raises(RotationError, match="W4A4-quantized"):
        rotate_checkpoint(src, tmp_path / "out", progress=False)
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_non_finite_weights_naming_the_tensor(tmp_path, bad):
    src = _ckpt(tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_tensor(src, name, lambda t: t.index_put((torch.tensor([3]), torch.tensor([5])), torch.tensor(bad)))
    with pytest.raises(RotationError, match=f"{name} .*NaN or Inf"):
        rotate_checkpoint(src, tmp_path / "out", progress=False)
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_refuses_integer_or_fp8_weights_naming_the_tensor(tmp_path, dtype):
    src = _ckpt(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_tensor(src, name, lambda t: t.to(dtype))
    with pytest.raises(RotationError, match=f"{name} .*dtype"):
        rotate_checkpoint(src, tmp_path / "out", progress=False)
    _nothing_written(tmp_path / "out")


def test_refuses_missing_tensors(tmp_path):
    src = _ckpt(tmp_path, tie=False)
    _rewrite_tensor(src, "lm_head.weight", lambda t: None)
    with pytest.raises(RotationError, match=r"lacks 1 tensor.*lm_head\.weight"):
        rotate_checkpoint(src, tmp_path / "out", progress=False)
    _nothing_written(tmp_path / "out")


def test_refuses_shapes_the_config_does_not_imply(tmp_path):
    src = _ckpt(tmp_path)
    _edit_config(src, intermediate_size=128)
    with pytest.raises(RotationError, match="gate_proj.weight has shape"):
        rotate_checkpoint(src, tmp_path / "out", progress=False)
    _nothing_written(tmp_path / "out")


def test_refuses_an_unsupported_family_with_the_in_memory_message(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=101, n_positions=32))
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(UnsupportedArchitectureError) as streamed:
        rotate_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    with pytest.raises(UnsupportedArchitectureError) as in_memory:
        rotate_model_(model)
    assert str(streamed.value) == str(in_memory.value)
    _nothing_written(tmp_path / "out")


def test_refuses_a_moe_checkpoint_clearly_and_writes_nothing(tmp_path):
    from tests.core.moe_helpers import tiny_moe

    tiny_moe("mixtral").save_pretrained(tmp_path / "src")
    with pytest.raises(UnsupportedArchitectureError, match="Mixture-of-Experts.*rotate_model_"):
        rotate_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    _nothing_written(tmp_path / "out")


def test_refuses_widths_without_construction_when_fallback_is_off(tmp_path):
    src = _ckpt(tmp_path, intermediate=172)  # 172 = 4·43: no Hadamard construction known
    config = RotationConfig(allow_fallback=False)
    with pytest.raises(NoHadamardError) as streamed:
        rotate_checkpoint(src, tmp_path / "out", config, progress=False)
    with pytest.raises(NoHadamardError) as in_memory:
        _reference(src, config, torch.float32)
    assert str(streamed.value) == str(in_memory.value)
    _nothing_written(tmp_path / "out")


def test_refuses_r1_on_tied_embeddings_without_untying(tmp_path):
    src = _ckpt(tmp_path, tie=True)
    with pytest.raises(RotationError, match="untie_embeddings=True"):
        rotate_checkpoint(src, tmp_path / "out", RotationConfig(untie_embeddings=False), progress=False)
    _nothing_written(tmp_path / "out")


def test_refuses_a_folder_without_safetensors(tmp_path):
    src = _ckpt(tmp_path)
    for f in src.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(RotationError, match="no safetensors weights"):
        rotate_checkpoint(src, tmp_path / "out", progress=False)
    _nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- atomic output


def test_existing_output_is_refused_and_kept(tmp_path):
    src = _ckpt(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        rotate_checkpoint(src, tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    rotate_checkpoint(src, tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "rolora_rotation.json").is_file()


class _InterruptAfterFirstShard(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("wrote shard"):
            raise KeyboardInterrupt  # what Ctrl-C between two shards does


def test_interrupt_mid_write_leaves_nothing(tmp_path):
    src = _ckpt(tmp_path)
    log = logging.getLogger("rolora_plugin.io.streaming")
    handler, level = _InterruptAfterFirstShard(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with pytest.raises(KeyboardInterrupt):
            rotate_checkpoint(src, tmp_path / "out", max_shard_bytes=OUT_SHARD, progress=False)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    _nothing_written(tmp_path / "out")


def test_staging_of_a_killed_run_is_removed(tmp_path):
    src = _ckpt(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".out.tmp-deadbeef"
    stale.mkdir()
    (stale / STAGING_MARKER).write_text(f"{dead.pid} {os.uname().nodename}\n")
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"half")
    rotate_checkpoint(src, tmp_path / "out", progress=False)
    assert not stale.exists() and (tmp_path / "out" / "config.json").is_file()


def test_rotated_output_reloads_with_its_record(tmp_path):
    src = _ckpt(tmp_path, "gemma", tie=True, dtype=torch.bfloat16)
    record = rotate_checkpoint(src, tmp_path / "out", RotationConfig(r2=True), progress=False)
    model = load_rotated(tmp_path / "out")
    assert get_rotation_record(model) == record and model.config.tie_word_embeddings is False
