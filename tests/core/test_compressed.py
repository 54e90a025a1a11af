"""format='compressed-tensors': packed W4A4 checkpoints that compressed-tensors reads, bit-exact round trips, refusals.

Acceptance (issue 14): in-memory W4A4 (RTN and GPTQ) → export → load_rotated gives the same logits (fp32, rel ≤ 1e-5;
with the same attention implementation they are identical); compressed-tensors' own decompression gives our
fake-quantized weights bit for bit; packed linears ≤ 0.14× their fp32 bytes; tampered tensors or a disagreeing
quantization_config are refused before anything is loaded.
"""

import json
import re

import pytest
import torch
from tests.helpers import FAMILIES, logits, random_ids, rel_err, tiny_model

from rolora_plugin import QuantConfig, QuantizationError, RotationConfig, RotationError, quantize_model_, rotate_model_
from rolora_plugin.io.compressed import QUANT_RECORD_FILE, tensor_digests
from rolora_plugin.io.export import load_rotated, load_with_compressed_tensors, merge_and_export, quantize_and_export
from rolora_plugin.quant import quantize_weight, quantize_with_scales
from rolora_plugin.quant.rtn import weight_quant_params
from rolora_plugin.io.transform_config import TRANSFORMS_FILE

pytest.importorskip("compressed_tensors")

FP32_RTOL = 1e-5
CT = "compressed-tensors"
ALL_ROTATIONS = RotationConfig(r2=True, r3=True)
W4A4_CONFIGS = {
    "rtn": QuantConfig(),
    "rtn-asym-g32-clip-kv4": QuantConfig(w_sym=False, w_group_size=32, w_clip_search=True, kv_bits=4),
    "gptq": QuantConfig(method="gptq"),
    "gptq-actorder-g16": QuantConfig(method="gptq", w_group_size=16, gptq_act_order=True),
}


def _quantized(family="llama", config=None, rotation=ALL_ROTATIONS, **kw):
    """A tiny rotated model quantized with ``config`` (default W4A4 RTN); GPTQ / clip searches get 2 calibration batches."""
    model = tiny_model(family, **kw)
    rotate_model_(model, rotation, progress=False)
    vocab = model.config.vocab_size if not hasattr(model.config, "text_config") else model.config.text_config.vocab_size
    quantize_model_(model, config or QuantConfig(), [random_ids(vocab, seed=s) for s in (1, 2)], progress=False)
    return model


def _linears(model, record_names):
    return {name: model.get_submodule(name) for name in record_names}


def _quantized_names(model):
    return json.loads(model.config.to_json_string())["rolora_quant"]["quantized"]


# ---------------------------------------------------------------------------------------------- scales kept by RTN / GPTQ


@pytest.mark.parametrize("name", list(W4A4_CONFIGS))
def test_kept_scales_reproduce_the_fake_quant_weights_bit_exactly(name):
    """Ŵ = (clamp(round(Ŵ/s) + z) − z)·s with the scales RTN/GPTQ recorded; RTN equals quantize_weight exactly."""
    config = W4A4_CONFIGS[name]
    model = _quantized(config=config)
    for lin_name, lin in _linears(model, _quantized_names(model)).items():
        p = weight_quant_params(lin)
        assert (p.bits, p.group_size, p.sym) == (config.w_bits, config.w_group_size, config.w_sym)
        w = lin.weight.detach()
        grouped = w.to(p.scale.dtype).reshape(w.shape[0], p.scale.shape[1], -1)
        again = quantize_with_scales(grouped, p.scale.unsqueeze(-1), p.zero.unsqueeze(-1), p.bits, p.sym).reshape(w.shape)
        assert torch.equal(again.to(w.dtype), w), lin_name


def test_rtn_with_kept_scales_equals_quantize_weight():
    base = tiny_model("llama")
    rotate_model_(base, RotationConfig(), progress=False)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    config = QuantConfig(w_sym=False, w_group_size=16)
    quantize_model_(base, config, progress=False)
    for name in _quantized_names(base):
        expected = quantize_weight(originals[name], 4, 16, False)
        assert torch.equal(base.get_submodule(name).weight.detach(), expected), name


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", FAMILIES + ("gemma",))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w4a4_round_trip_every_family(tmp_path, family, method):
    ids = random_ids()
    model = _quantized(family, W4A4_CONFIGS[method])
    ref = logits(model, ids)
    out = merge_and_export(model, tmp_path / "w4a4", format=CT, not_servable_ok=True)
    assert (out / QUANT_RECORD_FILE).is_file() and not (out / "transform_config.json").exists()
    same_attention = load_rotated(out, attn_implementation="eager")  # tiny models run eager attention
    assert rel_err(logits(same_attention, ids), ref) == 0.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_default_attention_round_trip_within_fp32_tolerance(tmp_path):
    ids = random_ids()
    model = _quantized("llama", W4A4_CONFIGS["rtn"])
    out = merge_and_export(model, tmp_path / "w4a4", format=CT, not_servable_ok=True)
    assert rel_err(logits(load_rotated(out), ids), logits(model, ids)) <= FP32_RTOL  # sdpa after loading, eager before


def test_llava_language_tower_round_trip_and_reexport(tmp_path):
    """A VLM: transformers saves LLaVA under its legacy key names; load_rotated maps the kept scales back."""
    from tests.helpers import tiny_llava

    model, ids, pixels = tiny_llava()
    rotate_model_(model, ALL_ROTATIONS, progress=False)
    quantize_model_(model, QuantConfig(w_sym=False), progress=False)
    out = merge_and_export(model, tmp_path / "a", format=CT, not_servable_ok=True)
    loaded = load_rotated(out)
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids, pixel_values=pixels).logits, model(input_ids=ids, pixel_values=pixels).logits) == 0.0
    assert tensor_digests(merge_and_export(loaded, tmp_path / "b", format=CT, not_servable_ok=True)) == tensor_digests(out)


@pytest.mark.parametrize("name", ["rtn-asym-g32-clip-kv4", "gptq-actorder-g16", "preset-w4a4kv4"])
def test_round_trip_asymmetric_groups_clip_search_kv_act_order_and_presets(tmp_path, name):
    """Also the w4a4kv4 recipe: per-linear activation clip ratios searched on calibration data come back from the record."""
    ids = random_ids()
    config = QuantConfig.preset("w4a4kv4", w_clip_grid=10) if name.startswith("preset") else W4A4_CONFIGS[name]
    model = _quantized("qwen2", config)
    out = merge_and_export(model, tmp_path / "w4a4", format=CT, not_servable_ok=True)
    loaded = load_rotated(out, attn_implementation="eager")
    assert rel_err(logits(loaded, ids), logits(model, ids)) == 0.0
    assert json.loads(json.dumps(loaded.config.rolora_quant)) == json.loads(json.dumps(model.config.rolora_quant))


def test_reexport_of_a_loaded_export_writes_the_same_tensors(tmp_path):
    out = merge_and_export(_quantized(config=W4A4_CONFIGS["rtn-asym-g32-clip-kv4"]), tmp_path / "a", format=CT, not_servable_ok=True)
    again = merge_and_export(out, tmp_path / "b", format=CT, not_servable_ok=True)  # a directory source: load_rotated, then export
    assert tensor_digests(again) == tensor_digests(out)
    assert json.loads((again / "config.json").read_text())["quantization_config"] == json.loads((out / "config.json").read_text())["quantization_config"]


def test_quantize_and_export_from_an_original_checkpoint_dir(tmp_path):
    ids = random_ids()
    tiny_model("phi3").save_pretrained(tmp_path / "base")
    config, calib = QuantConfig(method="gptq"), [random_ids(seed=1)]
    out = quantize_and_export(tmp_path / "base", tmp_path / "w4a4", config, calibration=calib, rotation=ALL_ROTATIONS, progress=False, not_servable_ok=True)
    from transformers import AutoModelForCausalLM

    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    rotate_model_(in_memory, ALL_ROTATIONS, progress=False)
    quantize_model_(in_memory, config, calib, progress=False)
    assert rel_err(logits(load_rotated(out), ids), logits(in_memory, ids)) == 0.0  # both default (sdpa) attention
    with pytest.raises(FileExistsError):  # checked before any work
        quantize_and_export(tmp_path / "base", out, config, calibration=calib, not_servable_ok=True)


# ---------------------------------------------------------------------------------------------- compressed-tensors itself


def test_transformers_loads_the_packed_weights_and_decompresses_them_bit_exactly(tmp_path):
    """Plain from_pretrained with compressed-tensors installed: no missing keys, and the only unexpected one is the
    stored R4 matrix (transformers ignores transform_config; vLLM and compressed-tensors' transforms read it from the
    model's weight files); its decompression = ours."""
    from transformers import AutoModelForCausalLM

    model = _quantized(config=W4A4_CONFIGS["gptq"], intermediate=96)  # R4 width 96: a stored (Paley) matrix
    out = merge_and_export(model, tmp_path / "w4a4", format=CT, not_servable_ok=True)
    ct_model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert set(info["unexpected_keys"]) == {"model.layers.0.mlp.down_proj.rolora_r4_input.weight"}
    names = _quantized_names(model)
    assert {n for n, _ in ct_model.named_parameters() if n.endswith("weight_packed")} == {f"{n}.weight_packed" for n in names}
    with torch.no_grad():
        ct_model(random_ids())  # compressed-tensors decompresses on the first forward (ModelCompressor.decompress_model)
    for name in names:
        assert torch.equal(ct_model.get_submodule(name).weight, model.get_submodule(name).weight), name


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_asymmetric_weights_decompress_bit_exactly_with_dequantize_true(tmp_path):
    """transformers 5.23's compressed path does not size packed zero points (llm-compressor#1618); dequantize=True does."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = _quantized(config=W4A4_CONFIGS["rtn-asym-g32-clip-kv4"])
    out = merge_and_export(model, tmp_path / "w4a4", format=CT, not_servable_ok=True)
    dense, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(".rolora_r4_input." in k for k in info["unexpected_keys"])  # the stored R4 matrix only
    for name in _quantized_names(model):
        assert torch.equal(dense.get_submodule(name).weight, model.get_submodule(name).weight), name


@pytest.mark.parametrize("family, intermediate", [("llama", 96), ("phi3", 96), ("qwen3", 128)])
def test_compressed_tensors_consumer_reproduces_weights_and_stored_transforms(tmp_path, family, intermediate):
    """A W4A16 export through compressed-tensors only (its quantized forward, apply_transform_config, the stored R4
    matrix): same logits as our model. With activations quantized the grids differ (7 vs 7.5; module doc)."""
    ids = random_ids()
    model = _quantized(family, QuantConfig(a_bits=16), intermediate=intermediate)
    out = merge_and_export(model, tmp_path / "w4a16", format=CT, not_servable_ok=True)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]
    assert groups["rolora_r4"]["type"] == ("hadamard" if intermediate == 128 else "random-hadamard")
    assert groups["rolora_r3"]["type"] == "hadamard" and groups["rolora_r3"]["head_dim"] == 16
    stored = [k for k in _tensors(out / "model.safetensors") if ".rolora_r" in k]  # in the model's own weight file
    assert stored == (["model.layers.0.mlp.down_proj.rolora_r4_input.weight"] if intermediate != 128 else [])
    assert not (out / TRANSFORMS_FILE).exists()
    assert rel_err(logits(load_with_compressed_tensors(out), ids), logits(model, ids)) <= FP32_RTOL


def test_stored_transform_is_sqrt_n_times_our_matrix(tmp_path):
    from safetensors.torch import load_file

    from rolora_plugin import get_rotation_record

    model = _quantized(intermediate=96)
    out = merge_and_export(model, tmp_path / "w4a4", format=CT, not_servable_ok=True)
    stored = {k: v for k, v in load_file(out / "model.safetensors").items() if ".rolora_r" in k}
    assert list(stored) == ["model.layers.0.mlp.down_proj.rolora_r4_input.weight"]  # one per group, shared by its targets
    r4 = get_rotation_record(model).verify()["r4"].matrix(torch.float64)
    assert torch.equal(stored["model.layers.0.mlp.down_proj.rolora_r4_input.weight"], (r4 * 96**0.5).float())


def test_quantization_config_describes_the_record(tmp_path):
    out = merge_and_export(_quantized(config=QuantConfig(w_group_size=32, a_sym=False, kv_bits=8)), tmp_path / "q", format=CT, not_servable_ok=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"], qc["ignore"]) == (CT, "pack-quantized", "compressed", ["lm_head"])
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")} == dict(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32, dynamic=False
    )
    assert {k: group["input_activations"][k] for k in ("num_bits", "symmetric", "strategy", "dynamic")} == dict(num_bits=4, symmetric=False, strategy="token", dynamic=True)
    assert {k: qc["kv_cache_scheme"][k] for k in ("num_bits", "symmetric", "strategy", "group_size", "dynamic")} == dict(
        num_bits=8, symmetric=False, strategy="group", group_size=16, dynamic=True
    )


def test_packed_linears_take_at_most_0_14_of_their_fp32_bytes(tmp_path):
    from safetensors import safe_open

    for config in (QuantConfig(), QuantConfig(w_group_size=128)):
        model = _quantized(config=config, hidden=128, intermediate=256)
        names = _quantized_names(model)
        fp32 = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
        out = merge_and_export(model, tmp_path / f"g{config.w_group_size}", format=CT, not_servable_ok=True)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            packed = sum(f.get_tensor(k).nbytes for k in f.keys() if k.rsplit(".", 1)[0] in names)
        assert packed <= 0.14 * fp32, (config.w_group_size, packed / fp32)


# ---------------------------------------------------------------------------------------------- refusals


def _export(tmp_path, **kw):
    return merge_and_export(_quantized(**kw), tmp_path / "w4a4", format=CT, not_servable_ok=True)


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def _edit_tensor(path, key, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors[key] = fn(tensors[key].clone())
    save_file(tensors, path, metadata={"format": "pt"})


def _load_spy(monkeypatch):
    """Count calls of transformers' from_pretrained (still the real one) to show nothing was loaded."""
    from transformers import AutoModelForCausalLM

    calls, real = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


@pytest.mark.parametrize(
    "key, what",
    [("model.layers.1.mlp.down_proj.weight_packed", "packed"), ("model.layers.0.self_attn.q_proj.weight_scale", "scale"), ("lm_head.weight", "lm_head")],
)
def test_tampered_tensors_are_refused_before_loading(tmp_path, monkeypatch, key, what):
    out = _export(tmp_path)
    _edit_tensor(out / "model.safetensors", key, lambda t: t.flatten().roll(1).reshape(t.shape) if t.dtype == torch.int32 else t * 1.01)
    calls = _load_spy(monkeypatch)
    with pytest.raises(QuantizationError, match="checksums"):
        load_rotated(out)
    assert calls == []


def test_tampered_stored_transform_is_refused(tmp_path):
    out = _export(tmp_path, intermediate=96)
    _edit_tensor(out / "model.safetensors", "model.layers.0.mlp.down_proj.rolora_r4_input.weight", lambda t: -t)
    with pytest.raises(QuantizationError, match="rolora_r4_input"):
        load_rotated(out)


def _edit_config(out, fn):
    path = out / "config.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8),
        lambda d: d["quantization_config"]["config_groups"]["group_0"]["input_activations"].update(symmetric=False),
        lambda d: d["quantization_config"].update(ignore=[]),
        lambda d: d["quantization_config"].update(kv_cache_scheme=None),
        lambda d: d["quantization_config"]["transform_config"].clear(),
    ],
    ids=["weight-bits", "activation-sym", "ignore", "kv", "transforms"],
)
def test_quantization_config_disagreeing_with_the_record_is_refused(tmp_path, monkeypatch, edit):
    out = _export(tmp_path, config=QuantConfig(kv_bits=4))
    _edit_config(out, edit)
    calls = _load_spy(monkeypatch)
    with pytest.raises(QuantizationError, match="disagrees with the quantization and rotation records"):
        load_rotated(out)
    assert calls == []


def test_edited_or_missing_quantization_record_is_refused(tmp_path):
    out = _export(tmp_path)
    _edit_config(out, lambda d: d["rolora_quant"]["config"].update(a_bits=8))
    with pytest.raises(QuantizationError, match="differs from config.json"):
        load_rotated(out)
    (out / QUANT_RECORD_FILE).unlink()
    with pytest.raises(QuantizationError, match=f"without {QUANT_RECORD_FILE}"):
        load_rotated(out)


def test_unquantized_or_unexportable_models_are_refused_and_nothing_is_written(tmp_path):
    model = tiny_model("llama")
    rotate_model_(model, RotationConfig(), progress=False)
    with pytest.raises(QuantizationError, match="not quantized"):
        merge_and_export(model, tmp_path / "a", format=CT, not_servable_ok=True)
    with pytest.raises(ValueError, match="format must be one of"):
        merge_and_export(model, tmp_path / "a", format="gguf")
    quantize_model_(model, QuantConfig(w_bits=12, a_bits=4), progress=False)
    with pytest.raises(QuantizationError, match="1-8 bits"):
        merge_and_export(model, tmp_path / "a", format=CT, not_servable_ok=True)
    with pytest.raises(ValueError, match="always writes the transform config"):
        merge_and_export(_quantized(), tmp_path / "a", format=CT, not_servable_ok=True, transform_config="file")
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_moe_is_refused_clearly_and_nothing_is_written(tmp_path):
    from tests.core.moe_helpers import tiny_moe

    model = tiny_moe("qwen2_moe")
    rotate_model_(model, RotationConfig(), progress=False)
    quantize_model_(model, QuantConfig(), progress=False)
    with pytest.raises(QuantizationError, match="fused experts.*format='fp'"):
        merge_and_export(model, tmp_path / "a", format=CT, not_servable_ok=True)
    assert list(tmp_path.iterdir()) == []


def test_weights_changed_after_quantization_are_refused(tmp_path):
    model = _quantized()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(QuantizationError, match="up_proj: 1 weights are not on their quantization grid"):
        merge_and_export(model, tmp_path / "a", format=CT, not_servable_ok=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from rolora_plugin.io import records

    monkeypatch.setattr(records, "write_rotation_record", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        merge_and_export(_quantized(), tmp_path / "a", format=CT, not_servable_ok=True)
    assert list(tmp_path.iterdir()) == []


def test_compressed_checkpoint_without_rotation_record_is_refused(tmp_path):
    out = _export(tmp_path)
    _edit_config(out, lambda d: d.pop("rolora"))
    with pytest.raises((QuantizationError, RotationError)):
        load_rotated(out)


# ---------------------------------------------------------------------------------------------- the real model


@pytest.mark.real
def test_smollm2_w4a4_round_trip_and_size(tmp_path):
    from safetensors import safe_open

    from rolora_plugin.app.assets import calibration_chunks, load_smollm2, text_chunks

    model, tok = load_smollm2()
    rotate_model_(model, RotationConfig(), progress=False)
    quantize_model_(model, QuantConfig(), progress=False)
    ids = text_chunks(tok, 2, 128)
    ref = logits(model, ids)
    out = merge_and_export(model, tmp_path / "w4a4", format=CT, not_servable_ok=True, tokenizer=tok)
    assert rel_err(logits(load_rotated(out), ids), ref) <= FP32_RTOL
    names = _quantized_names(model)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        packed = sum(f.get_tensor(k).nbytes for k in f.keys() if k.rsplit(".", 1)[0] in names)
    assert packed <= 0.14 * sum(model.get_submodule(n).weight.numel() * 4 for n in names)
    from transformers import AutoModelForCausalLM

    ct_model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    # the only keys plain transformers does not place are the stored online-transform matrices (R4 here), which
    # compressed-tensors' transform modules load (test_check.py); nothing of the model is missing
    side = [k for k in info["unexpected_keys"] if re.search(r"\.rolora_r4_input\.weight$", k)]
    assert not info["missing_keys"] and side and set(info["unexpected_keys"]) == set(side)
    with torch.no_grad():
        ct_model(ids[:, :8])
    assert all(torch.equal(ct_model.get_submodule(n).weight, model.get_submodule(n).weight) for n in names)
    gptq = load_smollm2()[0]
    rotate_model_(gptq, RotationConfig(), progress=False)
    quantize_model_(gptq, QuantConfig(method="gptq"), list(calibration_chunks(tok, 4, 128).split(2)), progress=False)
    out = merge_and_export(gptq, tmp_path / "gptq", format=CT, not_servable_ok=True)
    assert rel_err(logits(load_rotated(out), ids), logits(gptq, ids)) <= FP32_RTOL
