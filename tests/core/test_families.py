"""Families beyond the five Llama-like ones: Gemma (1) with its (1 + w) RMSNorm and sqrt(d) embedding scale."""

from __future__ import annotations

import itertools

import pytest
import torch

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.export import load_rotated, merge_and_export
from tests.helpers import F64_NORM_RTOL, float64_norms, logits, lora, random_ids, rel_err, tiny_model

COMBOS = [c for c in itertools.product([False, True], repeat=4) if any(c)]


def _cfg(combo):
    r1, r2, r3, r4 = combo
    return RotationConfig(r1=r1, r2=r2, r3=r3, r4=r4)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "".join(f"r{i + 1}" for i, on in enumerate(c) if on))
def test_gemma_rotation_exact_float64(combo):
    ids = random_ids()
    model = tiny_model("gemma", dtype=torch.float64)
    with float64_norms(model):
        ref = logits(model, ids)
        rotate_model_(model, _cfg(combo), progress=False)
        assert rel_err(logits(model, ids), ref) <= F64_NORM_RTOL


def test_gemma_stock_norms_float64_and_folded_weights():
    ids = random_ids()
    model = tiny_model("gemma", dtype=torch.float64)
    ref = logits(model, ids)
    rotate_model_(model, RotationConfig(r2=True), progress=False)
    assert rel_err(logits(model, ids), ref) <= 1e-6  # stock Gemma norms compute in float32
    norms = [m for m in model.modules() if type(m).__name__ == "GemmaRMSNorm"]
    assert norms and all(torch.equal(n.weight, torch.zeros_like(n.weight)) for n in norms)  # gain 1 + 0


def test_gemma_lora_merge_and_reload(tmp_path):
    ids = random_ids()
    model = lora(tiny_model("gemma"), "all-linear")
    rotate_model_(model, RotationConfig(r2=True), progress=False)
    out = merge_and_export(model, tmp_path / "export")
    assert rel_err(logits(load_rotated(out), ids), logits(model, ids)) <= 1e-5
