"""Mixture-of-Experts families (Mixtral, Qwen2-MoE with shared expert, Qwen3-MoE, OLMoE): exact rotation, online R4
on every expert for each experts implementation that takes it, refusals, LoRA on experts through peft."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.errors import RotationError
from rolora_plugin._peft import base_experts
from rolora_plugin.model.online import expert_gate_transforms, remove_online_rotations
from rolora_plugin.rotate.rotation import missing_online_rotations
from tests.core.moe_helpers import MOE_FAMILIES, tiny_moe
from tests.helpers import F64_NORM_RTOL, TRANSFORM_RTOL, float64_norms, logits, random_ids, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: fastest (and polite) on one thread
COMBOS = [c for c in itertools.product([False, True], repeat=4) if any(c)]


def _cfg(combo):
    r1, r2, r3, r4 = combo
    return RotationConfig(r1=r1, r2=r2, r3=r3, r4=r4)


def _combo_id(c):
    return "".join(f"r{i + 1}" for i, on in enumerate(c) if on)


def _experts(model):
    return [base_experts(layer.mlp.experts) for layer in model.model.layers if hasattr(layer.mlp, "experts")]


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_moe_rotation_exact_float64_norms(family, combo):
    ids = random_ids()
    model = tiny_moe(family, dtype=torch.float64)
    with float64_norms(model):
        ref = logits(model, ids)
        rotate_model_(model, _cfg(combo), progress=False)
        assert rel_err(logits(model, ids), ref) <= F64_NORM_RTOL


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_rotation_stock_modules_and_every_weight_rotated(family):
    ids = random_ids()
    model = tiny_moe(family, dtype=torch.float64)
    ref = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = rotate_model_(model, RotationConfig(r2=True), progress=False)
    assert rel_err(logits(model, ids), ref) <= 1e-6  # stock RMSNorms compute in float32
    assert record.family == family and "r4_experts" in record.rotations
    for name, value in model.state_dict().items():
        if name.endswith(("gate.weight", "gate_up_proj", "experts.down_proj", "shared_expert_gate.weight")):
            assert not torch.allclose(value, before[name]), name  # router, every expert, shared-expert gate rotated
    assert all(expert_gate_transforms(e) == ("r4",) for e in _experts(model))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_online_expert_r4_is_needed_and_reinstalled(family):
    from rolora_plugin.rotate.rotation import get_rotation_record, install_online_rotations

    ids = random_ids()
    model = tiny_moe(family, dtype=torch.float64)
    with float64_norms(model):
        ref = logits(model, ids)
        rotate_model_(model, RotationConfig(r1=False, r4=True), progress=False)
        remove_online_rotations(model)
        assert missing_online_rotations(model) == ["r4"]
        assert rel_err(logits(model, ids), ref) > 1e-3  # without the online Hadamard the function changes
        install_online_rotations(model, get_rotation_record(model))
        assert missing_online_rotations(model) == []
        assert rel_err(logits(model, ids), ref) <= F64_NORM_RTOL


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_grouped_mm_float32(family):
    ids = random_ids()
    model = tiny_moe(family, impl="grouped_mm")
    ref = logits(model, ids)
    rotate_model_(model, RotationConfig(r2=True, r3=True), progress=False)
    assert rel_err(logits(model, ids), ref) <= 50 * TRANSFORM_RTOL[torch.float32]


def test_eager_experts_refused_with_r4_accepted_without():
    model = tiny_moe("mixtral", impl="eager")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RotationError, match="batched_mm.*grouped_mm"):
        rotate_model_(model, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # refused before any edit
    ids = random_ids()
    ref = logits(model, ids)
    rotate_model_(model, RotationConfig(r4=False, r2=True), progress=False)  # nothing online on the experts
    assert rel_err(logits(model, ids), ref) <= 50 * TRANSFORM_RTOL[torch.float32]


def test_switching_to_eager_after_rotation_raises_at_forward():
    model = tiny_moe("qwen3_moe")
    rotate_model_(model, progress=False)
    model.set_experts_implementation("eager")
    with pytest.raises(RuntimeError, match="experts_implementation='eager'"):
        logits(model, random_ids())


def test_olmoe_clip_qkv_refuses_r2_only():
    model = tiny_moe("olmoe", dtype=torch.float64)
    model.config.clip_qkv = 0.5
    with pytest.raises(RotationError, match="clip_qkv"):
        rotate_model_(model, RotationConfig(r2=True), progress=False)
    ids = random_ids()
    with float64_norms(model):
        ref = logits(model, ids)
        rotate_model_(model, RotationConfig(r3=True), progress=False)
        assert rel_err(logits(model, ids), ref) <= F64_NORM_RTOL


# ---------------------------------------------------------------------------------------------- LoRA on experts


def _moe_lora(model, *, r=4):
    from peft import LoraConfig, get_peft_model

    from rolora_plugin.lora.adapters import map_target_modules, map_target_parameters

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=map_target_modules(model, "all-linear"),
                     target_parameters=map_target_parameters(model, "experts"), init_lora_weights=False)  # fmt: skip
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_on_experts_then_rotate_is_exact_float64(family):
    ids = random_ids()
    model = _moe_lora(tiny_moe(family, dtype=torch.float64))
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrapped) == 2 * sum(1 for layer in model.base_model.model.model.layers if hasattr(layer.mlp, "experts"))
    with float64_norms(model):
        ref = logits(model, ids)
        rotate_model_(model, RotationConfig(r2=True, r3=True), progress=False)  # rotates the experts' A and B too
        assert rel_err(logits(model, ids), ref) <= F64_NORM_RTOL


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_rotated_moe_lora_forward_equals_merged_float32(family):
    from rolora_plugin.lora.adapters import get_rolora_peft_model, rolora_lora_config

    ids = random_ids()
    model = tiny_moe(family)
    cfg = rolora_lora_config(model, r=4, lora_alpha=8, target_modules="all-linear", target_parameters="experts",
                             init_lora_weights=False)  # fmt: skip
    assert cfg.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    peft_model = get_rolora_peft_model(model, cfg, RotationConfig(r2=True))
    unmerged = logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert all(expert_gate_transforms(e) == ("r4",) for e in _experts(merged))  # the online R4 survives the merge
    assert rel_err(logits(merged, ids), unmerged) <= 1e-5


def test_lora_changes_the_experts_and_bad_target_parameters_are_refused():
    from rolora_plugin.lora.adapters import map_target_parameters

    ids = random_ids()
    model = tiny_moe("olmoe")
    ref = logits(model, ids)
    peft_model = _moe_lora(model)
    assert rel_err(logits(peft_model, ids), ref) > 1e-3  # the expert adapters (B != 0) really contribute
    with pytest.raises(ValueError, match="gate_up_proj"):
        map_target_parameters(model, ["up_proj"])
    with pytest.raises(ValueError, match="MoE families only"):
        from tests.helpers import tiny_model

        map_target_parameters(tiny_model("llama"), "experts")


# ---------------------------------------------------------------------------------------------- host paths


def test_hf_trainer_callback_rotates_and_trains_a_moe_with_expert_lora(tmp_path):
    from transformers import Trainer, TrainingArguments

    from rolora_plugin.integrations.hf_trainer import RoLoRACallback
    from rolora_plugin.lora.config import MonitorConfig, RoLoRAConfig

    ids = random_ids()
    model = _moe_lora(tiny_moe("qwen2_moe"))
    ref = logits(model, ids)
    data = [{"input_ids": row, "labels": row.clone()} for row in random_ids(batch=8, seed=3)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    callback = RoLoRACallback(RoLoRAConfig(monitor=MonitorConfig(every_n_steps=0)))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    assert rel_err(logits(model, ids), ref) <= 1e-5  # rotated at init, adapters included, function unchanged
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if "lora_" in k)  # experts too
    model.eval()
    unmerged = logits(model, ids)
    assert rel_err(logits(model.merge_and_unload(), ids), unmerged) <= 1e-5


def _moe_trainer(tmp_path, config, max_steps=2):
    from transformers import Trainer, TrainingArguments

    from rolora_plugin.integrations.hf_trainer import RoLoRACallback

    model = _moe_lora(tiny_moe("qwen2_moe"))
    data = [{"input_ids": row, "labels": row.clone()} for row in random_ids(batch=8, seed=3)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    return model, Trainer(model=model, args=args, train_dataset=data, callbacks=[RoLoRACallback(config)])


def test_qat_on_a_moe_is_refused_before_training_and_the_monitor_leaves_out_the_w4a4_loss(tmp_path, caplog):
    """Fake quant reaches nn.Linear layers only: W4A4 QAT would leave the experts in full precision under a W4A4
    label (refused at train begin, before any step); the monitor logs no W4A4 eval loss for an MoE (warned)."""
    from rolora_plugin.lora.config import MonitorConfig, QATConfig, RoLoRAConfig

    model, trainer = _moe_trainer(tmp_path / "qat", RoLoRAConfig(qat=QATConfig(enabled=True), monitor=MonitorConfig(every_n_steps=0)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fused experts"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert trainer.state.global_step == 0

    _, trainer = _moe_trainer(tmp_path / "monitor", RoLoRAConfig(monitor=MonitorConfig(every_n_steps=1, num_batches=1)))
    with caplog.at_level(logging.WARNING, logger="rolora_plugin.lora.monitor"):
        trainer.train()
    logged = {k for e in trainer.state.log_history for k in e}
    assert any(k.startswith("rolora/kurtosis/") for k in logged)  # activation statistics still logged
    assert not any(k.startswith("rolora/eval_loss_w") for k in logged)
    assert sum("no fake-quant eval loss for this MoE model" in r.getMessage() for r in caplog.records) == 1


def test_merge_export_and_load_rotated_moe(tmp_path):
    from rolora_plugin.io.export import load_rotated, merge_and_export

    ids = random_ids()
    model = _moe_lora(tiny_moe("mixtral"))
    rotate_model_(model, RotationConfig(r2=True), progress=False)
    out = merge_and_export(model, tmp_path / "export")
    loaded = load_rotated(out)
    assert missing_online_rotations(loaded) == []
    assert rel_err(logits(loaded, ids), logits(model, ids)) <= 1e-5


def test_rotated_moe_survives_deepcopy_and_pickling():
    import copy
    import io

    ids = random_ids()
    model = tiny_moe("olmoe")
    ref = logits(model, ids)
    rotate_model_(model, progress=False)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        experts = _experts(clone)
        assert all(e._apply_gate.experts is e for e in experts)  # the gate hook follows its own experts module
        assert rel_err(logits(clone, ids), ref) <= 50 * TRANSFORM_RTOL[torch.float32]
