"""Regression guards on the real SmolLM2-135M (``-m real``): rotation must keep working for W4A4 / W6A6 RTN.

Only robust margins are asserted (the issue's acceptance): rotation cuts W4A4 RTN perplexity at least 5× and
brings W6A6 within 1.2× of full precision. The reference naive run on 8×512 tokens gives 7285 → 599 (12×) and
22.3 / 20.37 (1.09×). The ambitious goals (W6A6 ≤ 1.08×, W4A4 ≤ 1.6×) are tracked in benchmarks/RESULTS.md by
``benchmarks/quant_table.py``, never asserted here. Text: 4×256 BoolQ-passage tokens (a shorter slice, ~1-2 min
on 2 CPU cores).

The W4A4 preset (``QuantConfig.preset("w4a4")`` after R1+R2+R4, calibrated on 8×256 disjoint BoolQ tokens) is guarded
at ≤ 3× FP; its goal (≤ 1.6×) and the side-by-side with llm-compressor live in ``benchmarks/peer_llmcompressor.py``.
"""

import copy

import pytest
import torch

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.quant import QuantConfig, quantize_model_

pytestmark = pytest.mark.real

N_CHUNKS, SEQ_LEN = 4, 256


@pytest.fixture(scope="module")
def smollm2():
    from rolora_plugin.app.assets import load_smollm2, text_chunks
    from rolora_plugin.metrics import perplexity

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # big enough matmuls, but the CI box's 2 cores are shared
    model, tok = load_smollm2()
    chunks = text_chunks(tok, N_CHUNKS, SEQ_LEN)
    rotated = copy.deepcopy(model)
    rotate_model_(rotated, RotationConfig(seed=0), progress=False)
    yield {"plain": model, "rotated": rotated, "chunks": chunks, "tok": tok, "ppl": lambda m: perplexity(m, chunks, progress=False)}
    torch.set_num_threads(n)


def _quantized_ppl(env, which: str, bits: int) -> float:
    model = copy.deepcopy(env[which])
    quantize_model_(model, QuantConfig(w_bits=bits, a_bits=bits), progress=False)
    return env["ppl"](model)


def test_rotation_is_exact_in_full_precision(smollm2):
    fp, rot = smollm2["ppl"](smollm2["plain"]), smollm2["ppl"](smollm2["rotated"])
    assert abs(rot - fp) <= 1e-3 * fp, (fp, rot)


def test_rotation_cuts_w4a4_rtn_perplexity_at_least_5x(smollm2):
    plain, rotated = _quantized_ppl(smollm2, "plain", 4), _quantized_ppl(smollm2, "rotated", 4)
    assert plain >= 5 * rotated, f"W4A4 RTN perplexity: unrotated {plain:.1f}, R1+R4 {rotated:.1f}"


def test_rotated_w6a6_rtn_within_1_2x_of_fp(smollm2):
    fp, w6 = smollm2["ppl"](smollm2["plain"]), _quantized_ppl(smollm2, "rotated", 6)
    assert w6 <= 1.2 * fp, f"W6A6 RTN R1+R4 perplexity {w6:.2f} vs FP {fp:.2f}"


def test_w4a4_preset_within_3x_of_fp(smollm2):
    from rolora_plugin.app.assets import calibration_chunks

    model = copy.deepcopy(smollm2["plain"])
    rotate_model_(model, RotationConfig(seed=0, r2=True), progress=False)
    calib = list(calibration_chunks(smollm2["tok"], 8, SEQ_LEN).split(4))
    quantize_model_(model, QuantConfig.preset("w4a4"), calibration=calib, progress=False)
    fp, q = smollm2["ppl"](smollm2["plain"]), smollm2["ppl"](model)
    assert q <= 3 * fp, f"W4A4 preset perplexity {q:.2f} vs FP {fp:.2f} ({q / fp:.2f}x)"
