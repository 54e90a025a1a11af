"""Never a model built from an incomplete or inconsistent checkpoint (issue 31, kind 2, and its load-side kind 3).

A generator damages good checkpoints the way the hostile probe did (a tensor dropped, a layer added to config.json,
a stale ``model.safetensors`` beside an index + shards, an index naming the wrong shard, a huge ``hidden_size``,
weights that overflow float16 when rotated or cast, an edited config field, a swapped weights file, a compressed
export without its ``quantization_config``), and each damaged folder goes through every entry point that reads
it: ``rolora rotate``, ``rotate --streaming``, ``quantize``, ``export``, ``eval`` and Python ``load_rotated``.
Each must refuse: exit status 2, exactly one line on stderr (``rolora <command>: error: ...``), no traceback,
nothing written next to the output path. Before the fix every in-memory case here exited 0 with random or
infinite weights (or a traceback).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rolora_plugin import QuantizationError, RotationConfig, RotationError, rotate_model_
from rolora_plugin.app.cli import EXIT_BAD_INPUT, main
from rolora_plugin.io.export import RECORD_FILE, load_rotated, merge_and_export, write_rotation_record
from rolora_plugin.io.loading import CheckpointError, load_causal_lm
from rolora_plugin.io.streaming import rotate_checkpoint
from tests.app.fixtures import save_tiny
from tests.helpers import lora, tiny_model

DROPPED = "model.layers.1.mlp.down_proj.weight"


# ---------------------------------------------------------------------------------------------- the generator


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def _reshard(folder: Path) -> tuple[list[str], list[str]]:
    """Rewrite the weights as two shards + index (what save_pretrained writes for a big model)."""
    tensors = _tensors(folder)
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    weight_map = {}
    for i, half in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in half}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(half, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return halves


def drop_tensor(folder: Path) -> None:
    tensors = _tensors(folder)
    del tensors[DROPPED]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def add_layer(folder: Path) -> None:
    _edit_config(folder, num_hidden_layers=json.loads((folder / "config.json").read_text())["num_hidden_layers"] + 1)


def stale_single_beside_shards(folder: Path) -> None:
    stale = {n: t * 1.5 for n, t in _tensors(folder).items()}  # an older save: same names and shapes, other values
    _reshard(folder)
    save_file(stale, str(folder / "model.safetensors"), metadata={"format": "pt"})


def wrong_shard_in_index(folder: Path) -> None:
    first, _ = _reshard(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][first[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def huge_hidden_size(folder: Path) -> None:
    _edit_config(folder, hidden_size=1 << 20)  # q_proj alone would be 4 TiB in float32


def edited_config_field(folder: Path) -> None:
    _edit_config(folder, rms_norm_eps=1e-2)


def swapped_weights(folder: Path, other: Path) -> None:
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")


def rotation_overflows_fp16(folder: Path) -> None:
    """float16 weights, every one finite: layer 0's norm gain (300) folded into q_proj (300) makes 90000 > 65504."""
    tensors = _tensors(folder)
    tensors["model.layers.0.input_layernorm.weight"].fill_(300.0)
    tensors["model.layers.0.self_attn.q_proj.weight"].fill_(300.0)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def cast_overflows_fp16(folder: Path) -> None:
    """A finite float32 value beyond float16's range: rotating with --dtype float16 must say so, not 're-download'."""
    tensors = _tensors(folder)
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def pickle_bin(folder: Path) -> None:
    """pytorch_model.bin whose pickle holds an object that is not a tensor: refused unread, in one line."""
    import fractions

    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": fractions.Fraction(1, 2)}, folder / "pytorch_model.bin")


def no_quantization_config(folder: Path) -> None:
    """A packed export whose config.json lost its quantization blocks: transformers would build dense linears and
    leave every packed one random."""
    data = json.loads((folder / "config.json").read_text())
    del data["quantization_config"], data["rolora_quant"]
    (folder / "config.json").write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("integrity-sources")
    base = save_tiny(root / "base")
    fp16 = save_tiny(root / "base-fp16", dtype=torch.float16)
    assert main(["-q", "rotate", str(base), str(root / "rotated")]) == 0
    other = save_tiny(root / "other", seed=7)
    assert main(["-q", "rotate", str(other), str(root / "other-rotated")]) == 0
    unsealed = root / "rotated-unsealed"  # what an older rolora-plugin exported: no integrity in its records
    shutil.copytree(root / "rotated", unsealed)
    for name in ("config.json", RECORD_FILE):
        data = json.loads((unsealed / name).read_text())
        (data["rolora"] if name == "config.json" else data).pop("integrity", None)
        (unsealed / name).write_text(json.dumps(data, indent=2))
    out = {"base": base, "base-fp16": fp16, "rotated": root / "rotated", "other-rotated": root / "other-rotated",
           "rotated-unsealed": unsealed}  # fmt: skip
    if _has_compressed_tensors():
        assert main(["-q", "quantize", str(base), str(root / "w8a8"), "--recipe", "w8a8", "--rotation", "w4a4-hadamard"]) == 0
        out["compressed"] = root / "w8a8"
    return out


def _has_compressed_tensors() -> bool:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def damaged(good, tmp_path_factory):
    """``damaged(kind, source) -> folder``: a damaged copy of a good source, built once."""
    root = tmp_path_factory.mktemp("integrity-damaged")
    cache = {}

    def make(kind: str, source: str) -> Path:
        if (kind, source) not in cache:
            folder = root / f"{kind}-{source}"
            shutil.copytree(good[source], folder)
            damage = KINDS[kind]
            damage(folder, good["other-rotated"]) if kind == "swapped-weights" else damage(folder)
            cache[kind, source] = folder
        return cache[kind, source]

    return make


KINDS = {
    "drop-tensor": drop_tensor,
    "add-layer": add_layer,
    "stale-single-beside-shards": stale_single_beside_shards,
    "wrong-shard-in-index": wrong_shard_in_index,
    "huge-hidden-size": huge_hidden_size,
    "rotation-overflows-fp16": rotation_overflows_fp16,
    "cast-overflows-fp16": cast_overflows_fp16,
    "edited-config-field": edited_config_field,
    "swapped-weights": swapped_weights,
    "no-quantization-config": no_quantization_config,
    "pickle-bin": pickle_bin,
}

# entry points: argv builders (source, out) -> argv; "load_rotated" is the Python API
ENTRY = {
    "rotate": lambda src, out: ["rotate", str(src), str(out)],
    "rotate-fp16": lambda src, out: ["rotate", str(src), str(out), "--dtype", "float16"],
    "streaming": lambda src, out: ["rotate", str(src), str(out), "--streaming"],
    "streaming-fp16": lambda src, out: ["rotate", str(src), str(out), "--streaming", "--dtype", "float16"],
    "quantize": lambda src, out: ["quantize", str(src), str(out), "--recipe", "w8a8", "--rotation", "w4a4-hadamard"],
    "quantize-rotated": lambda src, out: ["quantize", str(src), str(out), "--recipe", "w8a8"],  # its record fixes the rotation
    "export": lambda src, out: ["export", str(src), str(out)],
    "export-ct": lambda src, out: ["export", str(src), str(out), "--format", "compressed-tensors"],
    "eval": lambda src, out: ["eval", str(src), "--ppl-chunks", "1", "--seq-len", "16"],
}
BASE_ENTRIES = ("rotate", "streaming", "quantize", "eval")
ROTATED_ENTRIES = ("export", "eval", "quantize-rotated", "load_rotated")

# (kind, source, entry points, what the one line must say)
TABLE = [
    *[(k, "base", BASE_ENTRIES, word) for k, word in (
        ("drop-tensor", "lacks 1 tensor"),
        ("add-layer", "lacks"),
        ("stale-single-beside-shards", "holds both model.safetensors and model.safetensors.index.json"),
        ("wrong-shard-in-index", "the index does not describe the shards"),
        ("huge-hidden-size", "does not match its config.json"),
    )],  # fmt: skip
    ("pickle-bin", "base", BASE_ENTRIES, ""),  # --streaming: "reads safetensors checkpoints"
    ("rotation-overflows-fp16", "base-fp16", ("rotate-fp16", "streaming-fp16"), "bfloat16"),
    ("cast-overflows-fp16", "base", ("rotate-fp16", "streaming-fp16"), "bfloat16"),
    *[(k, "rotated", ROTATED_ENTRIES, word) for k, word in (
        ("drop-tensor", "not the ones exported"),
        ("add-layer", "config.json was edited"),
        ("stale-single-beside-shards", "holds both"),
        ("wrong-shard-in-index", "the index does not describe the shards"),
        ("huge-hidden-size", "config.json was edited"),
        ("edited-config-field", "config.json was edited"),
        ("swapped-weights", "not the ones exported"),
    )],  # fmt: skip
    # an older export without checksums: transformers' loading info is the check
    *[(k, "rotated-unsealed", ("load_rotated", "eval"), word) for k, word in (
        ("drop-tensor", "lacks 1 tensor"),
        ("add-layer", "lacks"),
        ("huge-hidden-size", "does not match its config.json"),
    )],  # fmt: skip
    ("no-quantization-config", "compressed", ("load_rotated", "eval", "export-ct", "quantize-rotated"), ""),
]
CASES = [(kind, source, entry, word) for kind, source, entries, word in TABLE for entry in entries]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("kind, source, entry, word", CASES, ids=[f"{k}/{s}/{e}" for k, s, e, _ in CASES])
def test_damaged_checkpoint_is_refused_in_one_line_with_nothing_written(kind, source, entry, word, good, damaged, tmp_path, capsys, monkeypatch):
    if source == "compressed" and "compressed" not in good:
        pytest.skip("compressed-tensors is not installed (pip install -e '.[export]')")
    # eval reads its perplexity text before the model: a short stream instead of tokenizing BoolQ each time (speed only)
    monkeypatch.setattr("rolora_plugin.app.assets.token_stream", lambda tokenizer, source="boolq": torch.arange(4, 84).repeat(4))
    src = damaged(kind, source)
    out = tmp_path / "out"
    before = _listing(tmp_path)
    if entry == "load_rotated":
        with pytest.raises((RotationError, QuantizationError)) as info:
            load_rotated(src)
        message = str(info.value)
        assert "\n" not in message and word in message, message
        return
    capsys.readouterr()
    rc = main(["-q", *ENTRY[entry](src, out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]  # less progress bars
    errors = [line for line in err if line.startswith("rolora ")]
    if source == "rotated-unsealed":  # the one warning that an older export carries no checksums is allowed
        err = [line for line in err if "older rolora-plugin" not in line]
    assert rc == EXIT_BAD_INPUT, (rc, err)
    assert len(err) == 1 and len(errors) == 1, err
    assert errors[0].startswith(f"rolora {ENTRY[entry](src, out)[0]}: error: ") and word in errors[0], errors[0]
    assert "Traceback" not in "\n".join(err), err
    if "overflows-fp16" in kind:  # the values exceed float16's range: nothing to re-download
        assert "re-download" not in errors[0], errors[0]
    assert _listing(tmp_path) == before and not out.exists(), "a refused command wrote something"


def test_every_kind_and_entry_point_is_covered():
    assert {k for k, *_ in CASES} == set(KINDS)
    assert {e for *_, e, _ in CASES} == set(ENTRY) | {"load_rotated"}


# ---------------------------------------------------------------------------------------------- the loader itself


def test_packed_export_without_its_configs_and_record_is_refused_by_the_loading_info(good, damaged, tmp_path):
    if "compressed" not in good:
        pytest.skip("compressed-tensors is not installed")
    folder = tmp_path / "m"
    shutil.copytree(damaged("no-quantization-config", "compressed"), folder)
    (folder / "rolora_quantization.json").unlink()
    with pytest.raises(CheckpointError, match=r"lacks \d+ tensor\(s\)") as info:
        load_rotated(folder)
    assert "weight_packed" in str(info.value) and "quantization_config" in str(info.value) and "\n" not in str(info.value)


def test_loader_accepts_a_tied_head_and_a_complete_checkpoint(good):
    """Legitimately absent: a tied lm_head (tie_word_embeddings). Nothing else is filled in."""
    model = load_causal_lm(good["base"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, _tensors(good["base"])[DROPPED])


def test_loader_names_the_shape_mismatch_in_one_line(good, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(good["base"], folder)
    _edit_config(folder, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"has shape \(96, 64\) in the weights but the config implies \(128, 64\)") as info:
        load_causal_lm(folder)
    assert "\n" not in str(info.value)


def test_a_config_claiming_a_million_layers_is_refused_before_any_skeleton_is_built(good, tmp_path):
    """num_hidden_layers edited to 10**6: refused from the headers' layer indices at once (building even a meta
    skeleton of that many layers took minutes)."""
    import time

    folder = tmp_path / "m"
    shutil.copytree(good["base"], folder)
    _edit_config(folder, num_hidden_layers=10**6)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=1000000 but the weights hold layers 0\.\.1 only"):
        load_causal_lm(folder)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("argv", [["rotate"], ["rotate", "--streaming"], ["quantize"], ["export"]])
def test_a_million_layer_config_is_refused_quickly_by_every_entry_point(argv, good, tmp_path, capsys):
    """The same edit through the CLI: each entry point refuses it in seconds, in one line (a skeleton of what the
    config claims was built first by streaming and by quantize's MoE check, minutes each)."""
    import time

    folder = tmp_path / "m"
    shutil.copytree(good["base"], folder)
    _edit_config(folder, num_hidden_layers=10**6)
    start = time.monotonic()
    code = main(["-q", *argv, str(folder), str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
    assert code == EXIT_BAD_INPUT and len(lines) == 1 and "lacks layers 2..999999" in lines[0], lines
    assert time.monotonic() - start < 30 and not (tmp_path / "out").exists()


def test_untied_config_without_lm_head_is_refused(good, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(good["base"], folder)
    _edit_config(folder, tie_word_embeddings=False)  # the file has no lm_head.weight: it would be random
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_causal_lm(folder)


def test_streaming_and_in_memory_read_the_same_weights_or_refuse(good, damaged):
    """One rule for both paths: the ambiguous folder is refused by each, in the same words."""
    folder = damaged("stale-single-beside-shards", "base")
    with pytest.raises(CheckpointError, match="holds both") as a:
        load_causal_lm(folder)
    with pytest.raises(CheckpointError, match="holds both") as b:
        rotate_checkpoint(folder, folder.parent / "never", progress=False)
    assert str(a.value) == str(b.value)
    assert not (folder.parent / "never").exists()


# ---------------------------------------------------------------------------------------------- records and checksums


def test_export_records_checksums_and_old_records_still_load_with_one_warning(good, caplog):
    sealed = json.loads((good["rotated"] / "config.json").read_text())["rolora"]["integrity"]
    assert set(sealed) == {"weights", "config"} and all(isinstance(v, str) for v in sealed.values())
    assert json.loads((good["rotated"] / RECORD_FILE).read_text())["integrity"] == sealed
    model = load_rotated(good["rotated"])
    assert "integrity" not in model.config.rolora  # a model in memory is no longer that folder
    with caplog.at_level("WARNING", logger="rolora_plugin.io.export"):
        load_rotated(good["rotated-unsealed"])
        load_rotated(good["rotated-unsealed"])
    warnings = [r for r in caplog.records if "older rolora-plugin" in r.getMessage()]
    assert len(warnings) <= 1  # once per folder and process (0 if an earlier test warned already)


def test_records_that_disagree_on_integrity_are_refused(good, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(good["rotated"], folder)
    record = json.loads((folder / RECORD_FILE).read_text())
    record["integrity"]["weights"] = "0" * 16
    (folder / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="different integrity records"):
        load_rotated(folder)


@pytest.mark.parametrize("where", [RECORD_FILE, "compressed"])
def test_deeply_nested_json_in_a_record_is_one_line(good, tmp_path, where):
    if where == "compressed" and "compressed" not in good:
        pytest.skip("compressed-tensors is not installed")
    folder = tmp_path / "m"
    shutil.copytree(good["rotated" if where == RECORD_FILE else "compressed"], folder)
    target = RECORD_FILE if where == RECORD_FILE else "rolora_quantization.json"
    (folder / target).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises((RotationError, QuantizationError)) as info:
        load_rotated(folder)
    assert "\n" not in str(info.value) and "RecursionError" not in type(info.value).__name__


# ---------------------------------------------------------------------------------------------- overflow, in Python


def test_rotate_model_refuses_a_float16_overflow_and_names_the_dtype():
    model = tiny_model("llama", dtype=torch.float16)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.fill_(300.0)
        model.model.layers[0].self_attn.q_proj.weight.fill_(300.0)
    with pytest.raises(RotationError, match="float32 or bfloat16") as info:
        rotate_model_(model, RotationConfig(), progress=False)
    assert "model.layers.0." in str(info.value) and "re-download" not in str(info.value)


# ---------------------------------------------------------------------------------------------- adapters and bases


def _adapter(folder: Path, base: Path, *, drop_fingerprint: bool) -> Path:
    from transformers import AutoModelForCausalLM

    peft_model = lora(AutoModelForCausalLM.from_pretrained(base))
    record = rotate_model_(peft_model, RotationConfig(), progress=False)
    peft_model.save_pretrained(str(folder))
    if drop_fingerprint:
        record.base_fingerprint = None  # an adapter saved by an older rolora-plugin
    write_rotation_record(folder, record)
    return folder


def test_adapter_record_without_base_fingerprint_exports_onto_its_own_base(good, tmp_path, caplog):
    adapter = _adapter(tmp_path / "adapter", good["base"], drop_fingerprint=True)
    with caplog.at_level("WARNING", logger="rolora_plugin.io.export"):
        merge_and_export(adapter, tmp_path / "merged", base_model=good["base"])
    assert any("cannot be checked" in r.getMessage() for r in caplog.records)
    assert load_rotated(tmp_path / "merged") is not None
    merge_and_export(adapter, tmp_path / "merged-rotated-base", base_model=good["rotated"])  # a rotated base too


@pytest.mark.parametrize("kind", ["swapped-weights", "edited-config-field"])
def test_adapter_onto_a_damaged_rotated_base_is_refused(good, damaged, tmp_path, capsys, kind):
    adapter = _adapter(tmp_path / "adapter", good["base"], drop_fingerprint=False)
    capsys.readouterr()
    rc = main(["-q", "export", str(adapter), str(tmp_path / "out"), "--base-model", str(damaged(kind, "rotated"))])
    err = capsys.readouterr().err.splitlines()
    assert rc == EXIT_BAD_INPUT and len(err) == 1 and ("not the ones exported" in err[0] or "was edited" in err[0]), err
    assert not (tmp_path / "out").exists()


def test_adapter_onto_a_quantized_base_is_refused_up_front(good, tmp_path, capsys):
    if "compressed" not in good:
        pytest.skip("compressed-tensors is not installed")
    adapter = _adapter(tmp_path / "adapter", good["base"], drop_fingerprint=False)
    capsys.readouterr()
    rc = main(["-q", "export", str(adapter), str(tmp_path / "out"), "--base-model", str(good["compressed"])])
    err = capsys.readouterr().err.splitlines()
    assert rc == EXIT_BAD_INPUT and len(err) == 1 and "is quantized" in err[0] and "--base-model" in err[0], err
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_an_moe_before_loading_it(tmp_path, capsys, monkeypatch):
    pytest.importorskip("compressed_tensors")
    from tests.core.moe_helpers import tiny_moe

    folder = tmp_path / "moe"
    tiny_moe().save_pretrained(folder)
    import rolora_plugin.io.export
    import rolora_plugin.io.loading

    def never(*a, **k):
        raise AssertionError("the MoE was loaded before the refusal")

    for module in (rolora_plugin.io.loading, rolora_plugin.io.export):
        monkeypatch.setattr(module, "load_causal_lm", never)
    capsys.readouterr()
    rc = main(["-q", "quantize", str(folder), str(tmp_path / "out"), "--recipe", "w8a8", "--rotation", "w4a4-hadamard"])
    err = capsys.readouterr().err.splitlines()
    assert rc == EXIT_BAD_INPUT and len(err) == 1 and "fused experts" in err[0], err
    assert not (tmp_path / "out").exists()
