"""Issue 30 acceptance on tiny models: for every servable preset, compressed-tensors' own load + decompression +
quantized forward + transforms (rolora_plugin.io.check.consumer_model, no rolora code in its forward) computes the logits
of load_rotated (fp32, rel ≤ 1e-4; bit for bit here), and a non-servable quantization is refused at export.
NVFP4: compressed-tensors 0.20 decompresses FP4 weights to bf16 — equal to ours with bf16-rounded weights, and
that difference is reported, not hidden."""

import json

import pytest
import torch
from tests.helpers import FAMILIES, random_ids, tiny_model

from rolora_plugin import QuantConfig, QuantizationError, RotationConfig, quantize_model_, rotate_model_
from rolora_plugin.io.export import load_rotated, merge_and_export

pytest.importorskip("compressed_tensors")
CT = "compressed-tensors"


def _export(tmp_path, family, preset, **overrides):
    model = tiny_model(family)
    rotate_model_(model, RotationConfig(r2=True), progress=False)
    quantize_model_(model, QuantConfig.preset(preset, **overrides), [random_ids(model.config.vocab_size, seed=s) for s in (1, 2)], progress=False)
    return model, merge_and_export(model, tmp_path / f"{family}-{preset}", format=CT)


def _chunks(vocab):
    return torch.cat([random_ids(vocab, seed=5), random_ids(vocab, seed=6)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["w4a4-int", "nvfp4", "mxfp4", "w4a8"])
def test_compressed_tensors_forward_computes_the_exported_model(tmp_path, family, preset):
    from rolora_plugin.io.check import check_export

    model, out = _export(tmp_path, family, preset)
    r = check_export(out, _chunks(model.config.vocab_size))
    assert r["engine"]["servable"] and r["engine"]["scheme"] == QuantConfig.preset(preset).engine_contract()["scheme"]
    exact = r["bf16_weights"] if preset == "nvfp4" else r["consumer"]
    assert exact["rel_err"] <= 1e-4 and exact["argmax_agreement"] == 1.0
    if preset == "nvfp4":  # the decompressor's bf16 weights are a measurable difference, reported as such
        assert r["consumer"]["rel_err"] > 0
    assert abs(r["ppl"]["rolora"] - r["ppl"]["consumer"]) / r["ppl"]["rolora"] < (0.05 if preset == "nvfp4" else 1e-4)


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4"])
def test_fp4_export_round_trips_exactly_and_stores_the_format(tmp_path, preset):
    model, out = _export(tmp_path, "llama", preset)
    ids = random_ids(model.config.vocab_size, seed=7)
    back = load_rotated(out, attn_implementation=model.config._attn_implementation)
    for name in json.loads((out / "rolora_quantization.json").read_text())["quantization"]["quantized"]:
        assert torch.equal(back.get_submodule(name).weight, model.get_submodule(name).weight), name
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == f"{preset}-pack-quantized" and qc["config_groups"]["group_0"]["weights"]["type"] == "float"
    body = json.loads((out / "rolora_quantization.json").read_text())
    assert body["engine"]["servable"] is True
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    name = "model.layers.0.self_attn.q_proj"
    assert f"{name}.weight_packed" in keys and (f"{name}.input_global_scale" in keys) == (preset == "nvfp4")


def test_a_non_servable_quantization_is_refused_unless_asked_for(tmp_path):
    model = tiny_model("llama")
    rotate_model_(model, RotationConfig(), progress=False)
    quantize_model_(model, QuantConfig.preset("w4a4"), [random_ids(model.config.vocab_size, seed=1)], progress=False)
    with pytest.raises(QuantizationError, match="not servable: asymmetric dynamic activations"):
        merge_and_export(model, tmp_path / "refused", format=CT)
    assert not (tmp_path / "refused").exists()
    out = merge_and_export(model, tmp_path / "research", format=CT, not_servable_ok=True)
    body = json.loads((out / "rolora_quantization.json").read_text())
    assert body["engine"]["servable"] is False and body["engine"]["reasons"]


def test_nvfp4_activations_need_calibration_for_their_global_scale():
    model = tiny_model("llama")
    with pytest.raises(QuantizationError, match="input_global_scale"):
        quantize_model_(model, QuantConfig.preset("nvfp4", method="rtn", w_clip_search=False), progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["w4a4-int", "nvfp4", "mxfp4"])
def test_compressed_tensors_cuda_kernels_compute_the_exported_model(tmp_path, preset):
    """On a GPU compressed-tensors quantizes activations with its Triton kernels (benchmarks/gpu_suite.sh runs this)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from rolora_plugin.io.check import check_export

    model, out = _export(tmp_path, "llama", preset)
    r = check_export(out, _chunks(model.config.vocab_size), device="cuda")
    exact = r["bf16_weights"] if preset == "nvfp4" else r["consumer"]
    assert exact["argmax_agreement"] == 1.0 and exact["rel_err"] <= 1e-4, r


@pytest.mark.parametrize("preset, block", [("nvfp4", 16), ("mxfp4", 32)])
def test_block_diagonal_rotations_export_as_hadamard_head_dim_and_the_consumer_computes_them(tmp_path, preset, block):
    from rolora_plugin.io.check import check_export

    model = tiny_model("llama")
    ids = random_ids(model.config.vocab_size, seed=9)
    with torch.no_grad():
        ref = model(ids).logits
    rotate_model_(model, RotationConfig(r2=True, block_size=block), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)  # still exact in full precision
    quantize_model_(model, QuantConfig.preset(preset), [random_ids(model.config.vocab_size, seed=s) for s in (1, 2)], progress=False)
    out = merge_and_export(model, tmp_path / "blocks", format=CT)
    group = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]["rolora_r4"]
    assert (group["type"], group["head_dim"]) == ("hadamard", block)  # compressed-tensors' own block Hadamard, no stored matrix
    r = check_export(out, _chunks(model.config.vocab_size))
    exact = r["bf16_weights"] if preset == "nvfp4" else r["consumer"]
    assert exact["rel_err"] <= 1e-4 and exact["argmax_agreement"] == 1.0
