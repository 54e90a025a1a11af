"""lora_lr_scale='norm-rms': the folded norms' rms in the record, a function-preserving re-parametrisation of the LoRA
factors that equals a per-layer learning rate k·lr under Adam (float64 reference), saved adapters, refusals."""

import json

import pytest
import torch
from tests.helpers import lora, random_ids, rel_err, tiny_model

from rolora_plugin import RotationConfig, RotationError, RotationRecord, get_rotation_record, rotate_model_, scale_lora_lr_
from rolora_plugin.model.architectures import get_architecture, get_submodule
from rolora_plugin.lora.config import RoLoRAConfig

F64 = torch.float64


def _gain_rms(model) -> list[list[float]]:
    spec = get_architecture(model)
    return [
        [float(get_submodule(layer, n).weight.detach().double().pow(2).mean().sqrt()) for n in (spec.input_norm, spec.post_attention_norm)]
        for layer in spec.decoder_layers(model)
    ]


def _rotated_lora(seed=0, dtype=F64, targets="all-linear"):
    model = tiny_model("llama", dtype=dtype, seed=seed)
    rotate_model_(model, RotationConfig(seed=seed), progress=False)
    torch.manual_seed(seed + 10)
    return lora(model, targets)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _delta(module) -> torch.Tensor:
    """The effective ``s B A`` of a LoRA layer's default adapter."""
    return module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight


def test_record_holds_the_folded_norm_rms_before_the_fold():
    model = tiny_model("llama", dtype=F64)
    expected = _gain_rms(model)
    record = rotate_model_(model, RotationConfig(), progress=False)
    assert len(record.norm_rms) == len(expected) == 2
    for got, want in zip(record.norm_rms, expected):
        assert got == pytest.approx(want, rel=1e-12)
        assert all(abs(v - 1.0) > 1e-3 for v in got)  # the perturbed gains are not 1: the values are the folded ones
    again = RotationRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again.norm_rms == record.norm_rms and again == record
    assert get_rotation_record(model).norm_rms == record.norm_rms


def test_norm_rms_is_not_part_of_the_rotations_identity():
    model = tiny_model("llama")
    record = rotate_model_(model, RotationConfig(), progress=False)
    data = record.to_dict()
    data.pop("norm_rms")
    older = RotationRecord.from_dict(data)  # a record written before the field existed (or by rotate_checkpoint)
    assert older.norm_rms is None and older == record


@pytest.mark.parametrize("bad", [[[1.0]], [[1.0, -2.0]], "x", [[1.0, float("inf")]]])
def test_malformed_norm_rms_is_refused(bad):
    data = rotate_model_(tiny_model("llama"), RotationConfig(), progress=False).to_dict()
    data["norm_rms"] = [bad[0]] * 2 if isinstance(bad, list) else bad
    with pytest.raises(RotationError, match="norm_rms"):
        RotationRecord.from_dict(data)


def test_scaling_keeps_the_function_and_scales_only_folded_norm_readers():
    peft_model = _rotated_lora()
    ids = random_ids()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    scaled = scale_lora_lr_(peft_model)
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    assert rel_err(after, before) <= 1e-12
    leaves = {name.rsplit(".", 1)[-1] for name in scaled}
    assert leaves == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # never o_proj / down_proj
    rms = get_rotation_record(peft_model.base_model.model).norm_rms
    assert scaled["model.layers.1.self_attn.q_proj"] == rms[1][0]
    assert scaled["model.layers.0.mlp.up_proj"] == rms[0][1]
    assert scale_lora_lr_(peft_model) == {}  # idempotent
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, after)


def test_adam_on_the_scaled_factors_equals_a_per_layer_learning_rate():
    """Float64 reference: AdamW(lr) on the re-parametrised model moves every ``s B A`` exactly as AdamW with a param
    group of lr·k per scaled layer moves the unscaled model (Adam's eps negligible and no weight decay: the equality
    holds up to eps, and decoupled decay stays at lr·wd instead of k·lr·wd)."""
    lr, steps = 1e-2, 4
    ref, ours = _rotated_lora(), _rotated_lora()
    scales = scale_lora_lr_(ours)
    ids = random_ids(seed=3)

    def groups(model):
        out = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                layer = name.split(".lora_")[0].removeprefix("base_model.model.")
                out.setdefault(scales.get(layer, 1.0), []).append(p)
        return [{"params": ps, "lr": lr * k} for k, ps in out.items()]

    opt_ref = torch.optim.AdamW(groups(ref), lr=lr, eps=1e-30, weight_decay=0.0)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=lr, eps=1e-30, weight_decay=0.0)
    for _ in range(steps):
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            _loss(model, ids).backward()
            opt.step()
    worst = 0.0
    for name in scales:
        a, b = _delta(ref.base_model.model.get_submodule(name)), _delta(ours.base_model.model.get_submodule(name))
        worst = max(worst, rel_err(b, a))
    assert worst <= 1e-9
    moved = _delta(ref.base_model.model.get_submodule("model.layers.0.self_attn.o_proj"))
    assert rel_err(_delta(ours.base_model.model.get_submodule("model.layers.0.self_attn.o_proj")), moved) <= 1e-9


def test_a_saved_scaled_adapter_reloads_with_its_scaling(tmp_path):
    from peft import PeftModel

    peft_model = _rotated_lora(dtype=torch.float32)
    scale_lora_lr_(peft_model)
    ids = random_ids()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(saved["alpha_pattern"]) == 10  # 2 layers × q, k, v, gate, up

    base = tiny_model("llama", dtype=torch.float32)
    rotate_model_(base, RotationConfig(seed=0), progress=False)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, want) <= 1e-6
    assert scale_lora_lr_(loaded) == {}  # already scaled: its alpha_pattern says so
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, want) <= 1e-6


def test_merge_after_scaling_matches_the_adapter_forward(tmp_path):
    from rolora_plugin import load_rotated, merge_and_export

    peft_model = _rotated_lora(dtype=torch.float32, targets=["q_proj", "v_proj", "up_proj"])
    scale_lora_lr_(peft_model)
    ids = random_ids()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    merge_and_export(peft_model, tmp_path / "merged")
    with torch.no_grad():
        assert rel_err(load_rotated(tmp_path / "merged", dtype=torch.float32)(input_ids=ids).logits, want) <= 1e-5


def test_refusals():
    unrotated = lora(tiny_model("llama"))
    with pytest.raises(RotationError, match="not rotated"):
        scale_lora_lr_(unrotated)
    no_r1 = tiny_model("llama")
    rotate_model_(no_r1, RotationConfig(r1=False, r4=True), progress=False)
    with pytest.raises(RotationError, match="without R1"):
        scale_lora_lr_(lora(no_r1))
    bare = tiny_model("llama")
    rotate_model_(bare, RotationConfig(), progress=False)
    with pytest.raises(ValueError, match="no LoRA layer"):
        scale_lora_lr_(bare)
    with pytest.raises(ValueError, match="must be one of"):
        scale_lora_lr_(bare, "sqrt")
    assert scale_lora_lr_(bare, "none") == {}
    only_o = lora(bare, ["o_proj", "down_proj"])
    with pytest.raises(ValueError, match="no LoRA layer"):
        scale_lora_lr_(only_o)


def test_config_field_round_trips_and_is_validated():
    cfg = RoLoRAConfig(lora_lr_scale="norm-rms")
    assert RoLoRAConfig.from_dict(cfg.to_dict()).lora_lr_scale == "norm-rms"
    assert RoLoRAConfig.from_json(cfg.to_json()) == cfg
    assert RoLoRAConfig().lora_lr_scale == "none"
    with pytest.raises(ValueError, match="lora_lr_scale"):
        RoLoRAConfig(lora_lr_scale="rms")
