"""Rotation-aware LoRA: plain peft configs on rotated models, rotating PeftModels, peft variants after rotation."""

import pytest
import torch
from tests.helpers import F64_NORM_RTOL, FAMILIES, float64_norms, random_ids, rel_err, tiny_model

from rolora_plugin import RotationConfig, RotationError, get_rotation_record, install_online_rotations, rotate_model_
from rolora_plugin.lora.adapters import (
    check_online_rotations,
    get_rolora_peft_model,
    lora_layer_names,
    map_target_modules,
    rolora_lora_config,
)
from rolora_plugin.model.online import remove_online_rotations

FP32_MERGE_RTOL = 1e-5  # issue 4 acceptance: LoRA forward vs merged forward in float32
ALL_ROTATIONS = RotationConfig(r2=True, r3=True)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _lora(model, targets, **kw):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False draws B ≠ 0, so the LoRA branch really contributes
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw))


def _assert_b_nonzero(peft_model):
    names = lora_layer_names(peft_model)
    assert names
    for name in names:
        for b in peft_model.get_submodule(name).lora_B.values():
            assert b.weight.abs().max() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_after_rotation_equals_merged(family, targets):
    ids = random_ids()
    model = tiny_model(family)
    rotate_model_(model, ALL_ROTATIONS, progress=False)
    peft_model = _lora(model, map_target_modules(model, targets))
    _assert_b_nonzero(peft_model)
    leaves = {n.rsplit(".", 1)[-1] for n in lora_layer_names(peft_model)}
    if targets == "all-linear":
        assert "down_proj" in leaves and "lm_head" not in leaves
    out = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert rel_err(_logits(peft_model, ids), out) > 100 * FP32_MERGE_RTOL  # the adapters matter
    merged = peft_model.merge_and_unload()
    assert rel_err(_logits(merged, ids), out) <= FP32_MERGE_RTOL


@pytest.mark.parametrize(
    "targets, extra",
    [
        (["q_proj", "v_proj"], {}),
        ("all-linear", {}),
        (["q_proj", "down_proj", "lm_head", "embed_tokens"], {}),
        ("all-linear", {"lora_bias": True}),
    ],
    ids=["qv", "all-linear", "embed+lm_head", "lora_bias"],
)
def test_rotating_peft_model_keeps_function_float64(targets, extra):
    ids = random_ids()
    model = tiny_model("llama", dtype=torch.float64)
    peft_model = _lora(model, targets, **extra)
    with float64_norms(model):
        ref = _logits(peft_model, ids)
        rotate_model_(peft_model, ALL_ROTATIONS, progress=False)
        assert rel_err(_logits(peft_model, ids), ref) <= F64_NORM_RTOL
        if not extra.get("lora_bias"):  # peft cannot merge a LoRA bias into a base layer without bias
            assert rel_err(_logits(peft_model.merge_and_unload(), ids), ref) <= F64_NORM_RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_rotating_peft_model_keeps_function_every_family(family):
    ids = random_ids()
    model = tiny_model(family, dtype=torch.float64)
    peft_model = _lora(model, "all-linear")
    with float64_norms(model):
        ref = _logits(peft_model, ids)
        rotate_model_(peft_model, ALL_ROTATIONS, progress=False)
        assert rel_err(_logits(peft_model, ids), ref) <= F64_NORM_RTOL
        assert rel_err(_logits(peft_model.merge_and_unload(), ids), ref) <= F64_NORM_RTOL


def test_rotating_peft_model_really_rotates_lora_matrices():
    """A and B of an input/output-rotated layer change (they are not left behind in the old basis)."""
    peft_model = _lora(tiny_model("llama", dtype=torch.float64), ["o_proj"])
    o = peft_model.base_model.model.model.layers[0].self_attn.o_proj
    a0, b0 = o.lora_A["default"].weight.clone(), o.lora_B["default"].weight.clone()
    rotate_model_(peft_model, ALL_ROTATIONS, progress=False)
    assert not torch.allclose(o.lora_A["default"].weight, a0)
    assert not torch.allclose(o.lora_B["default"].weight, b0)


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_rotating_peft_model_with_modules_to_save_is_refused_untouched(module):
    peft_model = _lora(tiny_model("llama"), ["q_proj"], modules_to_save=[module])
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    with pytest.raises(RotationError, match="modules_to_save"):
        rotate_model_(peft_model, progress=False)
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert get_rotation_record(peft_model.base_model.model) is None


@pytest.mark.parametrize(
    "variant",
    [{"use_dora": True}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}],
    ids=["dora", "pissa", "olora"],
)
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_variants_after_rotation_equal_merged(variant, targets):
    from peft import LoraConfig

    ids = random_ids()
    model = tiny_model("llama")
    rotate_model_(model, ALL_ROTATIONS, progress=False)
    w_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    peft_model = get_rolora_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **variant))
    # give every adapter a non-trivial state (PiSSA/OLoRA start from B ≠ 0; DoRA from B = 0)
    with torch.no_grad():
        for name in lora_layer_names(peft_model):
            b = peft_model.get_submodule(name).lora_B["default"].weight
            b.add_(0.05 * torch.randn_like(b))
    if "init_lora_weights" in variant:  # PiSSA / OLoRA rewrite the base weight into a residual
        assert not torch.equal(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, w_before)
    out = _logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert rel_err(_logits(merged, ids), out) <= FP32_MERGE_RTOL


def test_map_target_modules_all_linear_and_fused_names():
    llama = tiny_model("llama")
    rotate_model_(llama, progress=False)
    assert map_target_modules(llama, "all-linear") == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert map_target_modules(llama, ["v_proj", "q_proj"]) == ["q_proj", "v_proj"]
    assert map_target_modules(llama, r".*\.q_proj") == r".*\.q_proj"  # regex strings pass through
    phi3 = tiny_model("phi3")
    assert map_target_modules(phi3, ["q_proj", "v_proj", "gate_proj"]) == ["gate_up_proj", "qkv_proj"]
    assert map_target_modules(phi3, "all-linear") == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    with pytest.raises(ValueError, match="valid names"):
        map_target_modules(llama, ["q_prj"])


def test_all_linear_never_targets_online_modules_or_lm_head():
    model = tiny_model("llama")
    rotate_model_(model, ALL_ROTATIONS, progress=False)
    peft_model = get_rolora_peft_model(model, rolora_lora_config(model, target_modules="all-linear"))
    names = lora_layer_names(peft_model)
    assert len(names) == 7 * model.config.num_hidden_layers
    assert not any("rolora" in n or "lm_head" in n for n in names)


def test_rolora_lora_config_refuses_weight_dependent_variants_before_rotation():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="rotate_model_"):
        rolora_lora_config(model, use_dora=True)
    with pytest.raises(ValueError, match="rotate_model_"):
        rolora_lora_config(model, init_lora_weights="pissa")
    cfg = rolora_lora_config(model, target_modules=["q_proj", "v_proj"])  # plain LoRA may go first
    assert sorted(cfg.target_modules) == ["q_proj", "v_proj"] and cfg.r == 16 and cfg.lora_alpha == 16


def test_get_rolora_peft_model_rotates_once_and_checks_config():
    model = tiny_model("llama")
    peft_model = get_rolora_peft_model(model, rolora_lora_config(model), RotationConfig(seed=3))
    assert get_rotation_record(peft_model.base_model.model).config.seed == 3
    other = tiny_model("llama")
    rotate_model_(other, RotationConfig(seed=1), progress=False)
    with pytest.raises(RotationError, match="already rotated"):
        get_rolora_peft_model(other, rolora_lora_config(other), RotationConfig(seed=2))


def test_check_online_rotations_detects_missing_modules():
    model = tiny_model("llama")
    with pytest.raises(RotationError, match="not rotated"):
        check_online_rotations(model)
    rotate_model_(model, ALL_ROTATIONS, progress=False)
    check_online_rotations(model)
    remove_online_rotations(model)
    with pytest.raises(RotationError, match=r"\['r4', 'r3'\]"):
        check_online_rotations(model)
    install_online_rotations(model, get_rotation_record(model))
    check_online_rotations(model)
