"""Families beyond the five Llama-like ones: Gemma (1) with its (1 + w) RMSNorm and sqrt(d) embedding scale."""

from __future__ import annotations

import itertools

import pytest
import torch

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.io.export import load_rotated, merge_and_export
from tests.helpers import F64_NORM_RTOL, float64_norms, logits, lora, random_ids, rel_err, tiny_llava, tiny_model

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


# ---------------------------------------------------------------------------------------------- LLaVA


def _vlm_logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "".join(f"r{i + 1}" for i, on in enumerate(c) if on))
def test_llava_language_tower_rotation_exact_with_images(combo):
    model, ids, pixels = tiny_llava(dtype=torch.float64)
    vision_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    with float64_norms(model):
        ref = _vlm_logits(model, ids, pixels)
        record = rotate_model_(model, _cfg(combo), progress=False)
        assert rel_err(_vlm_logits(model, ids, pixels), ref) <= 1e-10  # CLIP's LayerNorms stay stock (untouched)
    assert record.family == "llava/llama"
    assert all(torch.equal(v, vision_before[k]) for k, v in model.model.vision_tower.state_dict().items())


def test_llava_stock_modules_and_projector_rotated():
    model, ids, pixels = tiny_llava(dtype=torch.float64)
    ref = _vlm_logits(model, ids, pixels)
    w2 = model.model.multi_modal_projector.linear_2.weight.clone()
    rotate_model_(model, RotationConfig(r2=True), progress=False)
    assert rel_err(_vlm_logits(model, ids, pixels), ref) <= 1e-6
    assert not torch.allclose(model.model.multi_modal_projector.linear_2.weight, w2)


def test_llava_lora_on_language_tower_only_merges_exactly(tmp_path):
    from rolora_plugin import map_target_modules

    model, ids, pixels = tiny_llava()
    targets = map_target_modules(model, "all-linear")
    peft_model = lora(model, targets)
    names = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert names and all(".language_model.layers." in n for n in names)
    assert len(names) == 2 * 7  # every decoder linear of both layers, nothing in the vision tower or projector
    rotate_model_(peft_model, RotationConfig(r2=True), progress=False)
    unmerged = _vlm_logits(peft_model, ids, pixels)
    merged = peft_model.merge_and_unload()
    assert rel_err(_vlm_logits(merged, ids, pixels), unmerged) <= 1e-5


def test_llava_with_unsupported_tower_is_refused():
    import transformers as tf

    from rolora_plugin import UnsupportedArchitectureError

    text = tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                           num_hidden_layers=1, vocab_size=50, head_dim=16)  # fmt: skip
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8)  # fmt: skip
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=49))
    with pytest.raises(UnsupportedArchitectureError, match="language tower.*gemma2"):
        rotate_model_(model, progress=False)
