"""Issue 30 acceptance on the real SmolLM2-135M (``-m real``): every servable preset, exported, is computed by
compressed-tensors' own code (decompression, quantized forward, transforms) exactly as by ``load_rotated``, and vLLM
0.34's own scheme selection (``benchmarks/vllm_scheme.py``, run from its wheel) names a W4A4 scheme for it.

RTN weights keep it to ~1 min per preset on 2 cores (GPTQ changes the weights, not the format's numerics: the GPTQ
presets are checked on tiny models in tests/core/test_check.py). NVFP4: compressed-tensors 0.20 decompresses FP4
weights to bf16; its forward is compared with ours with bf16-rounded weights (exact) and the fp32 difference is
reported by the check, not hidden.
"""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

SCHEMES = {"w4a4-int": "CompressedTensorsWNA4Int", "nvfp4": "CompressedTensorsW4A4Fp4", "mxfp4": "CompressedTensorsW4A4Mxfp4"}


@pytest.fixture(scope="module")
def smollm2():
    from rolora_plugin.app.assets import calibration_chunks, load_smollm2, text_chunks

    model, tok = load_smollm2()
    return tok, text_chunks(tok, 2, 128), list(calibration_chunks(tok, 4, 128).split(1))


@pytest.mark.parametrize("preset", list(SCHEMES))
def test_smollm2_servable_export_is_computed_by_compressed_tensors_and_selected_by_vllm(tmp_path, smollm2, preset):
    from rolora_plugin import QuantConfig, RotationConfig, quantize_model_, rotate_model_
    from rolora_plugin.app.assets import load_smollm2
    from rolora_plugin.io.check import check_export
    from rolora_plugin.io.export import merge_and_export

    tok, chunks, calib = smollm2
    model, _ = load_smollm2()
    rotate_model_(model, RotationConfig.preset("w4a4-hadamard"), progress=False)
    quantize_model_(model, QuantConfig.preset(preset, method="rtn", w_clip_search=False), calib, progress=False)
    out = merge_and_export(model, tmp_path / preset, format="compressed-tensors", tokenizer=tok)
    r = check_export(out, chunks)
    exact = r["bf16_weights"] if preset == "nvfp4" else r["consumer"]
    assert exact["rel_err"] <= 1e-4 and exact["argmax_agreement"] == 1.0, r
    assert r["engine"] == {"servable": True, "scheme": SCHEMES[preset], "reasons": []}

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import vllm_scheme

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert vllm_scheme.select_schemes(qc, 100)["group_0"] == SCHEMES[preset]
