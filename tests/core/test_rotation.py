import itertools
import json

import pytest
import torch
from tests.helpers import F64_NORM_RTOL, FAMILIES, float64_norms, logits, random_ids, rel_err, tiny_model

from rolora_plugin import (
    NoHadamardError,
    RotationConfig,
    RotationError,
    RotationRecord,
    UnsupportedArchitectureError,
    get_rotation_record,
    rotate_model_,
)
from rolora_plugin.model.online import add_attention_transform

COMBOS = [c for c in itertools.product([False, True], repeat=4) if any(c)]  # (r1, r2, r3, r4)
STOCK_NORM_RTOL = 1e-6  # stock RMSNorm computes in float32 even for float64 inputs: floor ~1e-7


def _cfg(combo, seed=0):
    r1, r2, r3, r4 = combo
    return RotationConfig(seed=seed, r1=r1, r2=r2, r3=r3, r4=r4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "".join(f"r{i+1}" for i, on in enumerate(c) if on))
def test_rotation_exact_float64(family, combo):
    ids = random_ids()
    model = tiny_model(family, dtype=torch.float64, tie=(family != "qwen2"))
    with float64_norms(model):
        ref = logits(model, ids)
        rotate_model_(model, _cfg(combo), progress=False)
        assert rel_err(logits(model, ids), ref) <= F64_NORM_RTOL
    assert rel_err(logits(model, ids), ref) <= STOCK_NORM_RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_fp32_all_rotations(family):
    ids = random_ids()
    model = tiny_model(family, dtype=torch.float32)
    ref = logits(model, ids)
    rotate_model_(model, RotationConfig(r2=True, r3=True), progress=False)
    assert rel_err(logits(model, ids), ref) <= 1e-5


def test_rotation_changes_weights_and_unties():
    model = tiny_model("llama", dtype=torch.float64)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rotate_model_(model, RotationConfig(r2=True), progress=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    after = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.allclose(before[name], after[name])
    for name, t in after.items():
        if "norm" in name:
            assert torch.equal(t, torch.ones_like(t)), f"{name} not folded"
    # orthogonal edits preserve the Frobenius norm of every matrix that was only rotated
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight"):
        assert abs(before[name].norm() - after[name].norm()) / before[name].norm() < 1e-12


def test_online_r3_path_is_live():
    """R3 runs inside the attention function: a deliberately non-orthogonal extra transform must change logits."""
    model = tiny_model("llama", dtype=torch.float64)
    ids = random_ids()
    rotate_model_(model, RotationConfig(r3=True), progress=False)
    ref = logits(model, ids)
    attn = model.model.layers[0].self_attn
    add_attention_transform(attn, "probe", lambda q, k, v: (q, 2 * k, v))
    assert rel_err(logits(model, ids), ref) > 1e-3


def test_same_seed_bit_identical_different_seed_differs():
    states = []
    for seed in (0, 0, 1):
        model = tiny_model("qwen2", dtype=torch.float32, seed=11)
        rotate_model_(model, RotationConfig(seed=seed, r2=True), progress=False)
        states.append(model.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    assert not torch.equal(states[0]["model.embed_tokens.weight"], states[2]["model.embed_tokens.weight"])


def test_record_roundtrip_and_refuses_second_rotation():
    model = tiny_model("mistral")
    record = rotate_model_(model, RotationConfig(seed=3, r2=True), progress=False)
    stored = get_rotation_record(model)
    assert stored.to_dict() == record.to_dict()
    assert RotationRecord.from_dict(json.loads(json.dumps(record.to_dict()))).to_dict() == record.to_dict()
    assert set(record.rotations) == {"r1", "r2", "r4"}
    assert json.loads(model.config.to_json_string())["rolora"] == record.to_dict()
    with pytest.raises(RotationError, match="already rotated"):
        rotate_model_(model, progress=False)


def test_record_verify_detects_tampering():
    model = tiny_model("llama")
    record = rotate_model_(model, progress=False).to_dict()
    record["rotations"]["r1"]["checksum"] = "0" * 16
    with pytest.raises(RotationError, match="does not match"):
        RotationRecord.from_dict(record).verify()
    record = rotate_model_(tiny_model("llama"), progress=False).to_dict()
    record["config"]["seed"] = 99
    with pytest.raises(RotationError, match="does not match"):
        RotationRecord.from_dict(record).verify()
    with pytest.raises(RotationError, match="malformed"):
        RotationRecord.from_dict({"format_version": 1})


def test_config_json_roundtrip_and_validation():
    cfg = RotationConfig(seed=5, r2=True, r3=True, compute_dtype="float32")
    assert RotationConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="seed"):
        RotationConfig(seed=-1)
    with pytest.raises(ValueError, match="enable at least one"):
        RotationConfig(r1=False, r4=False)
    with pytest.raises(ValueError, match="unknown field"):
        RotationConfig.from_dict({"sead": 1})
    with pytest.raises(ValueError, match="compute_dtype"):
        RotationConfig(compute_dtype="float16")


def test_unknown_family_error_names_class_and_fix():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match=r"GPT2LMHeadModel.*rolora_register_architectures"):
        rotate_model_(model, progress=False)


def test_gemma_refused_with_reason():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                       num_hidden_layers=1, vocab_size=50, head_dim=16)
    with pytest.raises(UnsupportedArchitectureError, match="sandwich norms"):
        rotate_model_(Gemma2ForCausalLM(cfg), progress=False)


def test_fallback_disabled_width_error_and_model_untouched():
    model = tiny_model("llama", intermediate=172)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NoHadamardError, match="172"):
        rotate_model_(model, RotationConfig(allow_fallback=False), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} modified by a failed rotation"
    assert get_rotation_record(model) is None


def test_fallback_width_still_exact():
    ids = random_ids()
    model = tiny_model("llama", dtype=torch.float64, intermediate=172)
    with float64_norms(model):
        ref = logits(model, ids)
        record = rotate_model_(model, progress=False)
        assert rel_err(logits(model, ids), ref) <= F64_NORM_RTOL
    assert record.rotations["r4"]["exact"] is False


def test_integer_weights_refused():
    model = tiny_model("llama")
    lin = model.model.layers[0].mlp.up_proj
    lin.weight = torch.nn.Parameter(lin.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(RotationError, match="quantized or integer"):
        rotate_model_(model, progress=False)


def test_meta_device_refused():
    from transformers import AutoModelForCausalLM
    from tests.helpers import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(RotationError, match="meta device"):
        rotate_model_(model, progress=False)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_lora_after_rotation_merges_exactly(targets):
    from peft import LoraConfig, get_peft_model

    ids = random_ids()
    model = tiny_model("llama", dtype=torch.float32)
    rotate_model_(model, RotationConfig(r2=True), progress=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    down = peft_model.base_model.model.model.layers[0].mlp.down_proj
    if targets == "all-linear":
        assert hasattr(down, "lora_A"), "down_proj must be a LoRA target under all-linear"
    lora_out = logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert rel_err(logits(merged, ids), lora_out) <= 1e-5


def test_online_r4_acts_on_lora_branch_of_down_proj():
    """With B ≠ 0 on down_proj only, LoRA output must equal W·H·x + B·A·H·x (H before both branches)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", dtype=torch.float64)
    rotate_model_(model, progress=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    mlp = peft_model.base_model.model.model.layers[0].mlp
    x = torch.randn(3, 64, dtype=torch.float64)
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    hr = mlp.rolora_r4(h)
    down = mlp.down_proj
    expected = down.base_layer(hr) + down.lora_B["default"](down.lora_A["default"](hr)) * down.scaling["default"]
    assert rel_err(mlp(x), expected) <= 1e-12


def test_rotating_peft_model_keeps_function():
    from peft import LoraConfig, get_peft_model

    ids = random_ids()
    model = tiny_model("qwen2", dtype=torch.float64, tie=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with float64_norms(model):
        ref = logits(peft_model, ids)
        rotate_model_(peft_model, RotationConfig(r2=True, r3=True), progress=False)
        assert rel_err(logits(peft_model, ids), ref) <= F64_NORM_RTOL
        merged = peft_model.merge_and_unload()
        assert rel_err(logits(merged, ids), ref) <= F64_NORM_RTOL


def test_dora_before_rotation_refused():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(RotationError, match="DoRA"):
        rotate_model_(peft_model, progress=False)


def test_memory_is_not_a_full_float64_copy(monkeypatch):
    """Large matrices are edited in chunks: no float64 temporary bigger than the chunk budget (the fast engine's
    workspaces, and the reference path's temporaries when an op falls back to it)."""
    import rolora_plugin.hadamard.edits as edits

    monkeypatch.setattr(edits, "_CHUNK_ELEMENTS", 64 * 8)
    monkeypatch.setattr(edits, "_SINGLE_PASS_ELEMENTS", 64 * 8)
    seen = []
    real_ws, real_scaled = edits._Workspaces, edits._scaled

    def spy_ws(n, dtype, device, **kw):
        seen.append(n)
        return real_ws(n, dtype, device, **kw)

    def spy_scaled(x, scale, right):
        seen.append(x.numel())
        return real_scaled(x, scale, right)

    monkeypatch.setattr(edits, "_Workspaces", spy_ws)
    monkeypatch.setattr(edits, "_scaled", spy_scaled)
    ids = random_ids()
    model = tiny_model("llama", dtype=torch.float64)
    ref = logits(model, ids)
    rotate_model_(model, progress=False)
    assert seen and max(seen) <= 64 * 8 and rel_err(logits(model, ids), ref) <= STOCK_NORM_RTOL


def test_cuda_rotation_stays_on_device(cuda_device):
    model = tiny_model("llama").to(cuda_device)
    ids = random_ids().to(cuda_device)
    ref = logits(model, ids)
    rotate_model_(model, RotationConfig(r2=True, r3=True), progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert rel_err(logits(model, ids), ref) <= 1e-4
