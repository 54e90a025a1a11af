"""RoLoRACallback with a real transformers.Trainer on tiny models: rotation timing, resume, records, QAT, monitor."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from tests.helpers import random_ids, rel_err, tiny_model

from rolora_plugin import RotationConfig, RotationError, get_rotation_record, rotate_model_
from rolora_plugin.io.export import RECORD_FILE, read_rotation_record
from rolora_plugin.quant import enable_fake_quant_, fake_quant_active
from rolora_plugin.lora.config import ExportConfig, MonitorConfig, QATConfig, RoLoRAConfig

FP32_FUNCTION_RTOL = 1e-5
NO_MONITOR = MonitorConfig(every_n_steps=0)


def _pattern_data(n=8, seq=16, vocab=101, seed=0):
    """Learnable sequences (arithmetic progressions mod the vocabulary), labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start, step = torch.randint(0, vocab - 3, (2,), generator=g).tolist()
        ids = torch.tensor([3 + (start + i * (step % 5 + 1)) % (vocab - 3) for i in range(seq)])
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _peft(model, targets="all-linear"):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))


def _trainer(model, out_dir, callbacks, **kw):
    from transformers import Trainer, TrainingArguments

    defaults = dict(
        output_dir=str(out_dir), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2, logging_steps=2,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, lr_scheduler_type="constant",
    )  # fmt: skip
    defaults.update(kw)
    return Trainer(model=model, args=TrainingArguments(**defaults), train_dataset=_pattern_data(), callbacks=callbacks)


def _callback(**kw):
    from rolora_plugin.integrations.hf_trainer import RoLoRACallback

    kw.setdefault("monitor", NO_MONITOR)
    return RoLoRACallback(RoLoRAConfig(**kw))


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


# ---------------------------------------------------------------------------------------------- rotation timing


def test_rotates_in_init_end_before_optimizer_function_unchanged(tmp_path):
    model = tiny_model("llama")
    peft_model = _peft(model)
    with torch.no_grad():  # LoRA B starts at 0: give the adapters a non-trivial function first
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    ids = random_ids()
    with torch.no_grad():
        ref = peft_model(ids).logits
    trainer = _trainer(peft_model, tmp_path, [_callback()])
    assert trainer.optimizer is None
    assert get_rotation_record(model) is not None
    with torch.no_grad():
        assert rel_err(peft_model(ids).logits, ref) <= FP32_FUNCTION_RTOL


def test_already_rotated_model_is_not_rotated_again(tmp_path):
    model = tiny_model("llama")
    record = rotate_model_(model, RotationConfig(seed=5), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = _callback()
    _trainer(model, tmp_path, [cb])
    assert cb.record == record
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RotationError, match="already rotated"):
        _trainer(model, tmp_path, [_callback(rotation=RotationConfig(seed=6))])


def test_import_does_not_pull_in_transformers_or_peft():
    code = (
        "import sys, rolora_plugin.callbacks, rolora_plugin.io.export, rolora_plugin.lora, rolora_plugin.lora.monitor\n"
        "import rolora_plugin.lora.config\n"
        "bad = [m for m in ('transformers', 'peft', 'accelerate', 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- records, resume


def test_checkpoints_and_saved_adapter_carry_the_record(tmp_path):
    model = tiny_model("llama")
    peft_model = _peft(model)
    trainer = _trainer(peft_model, tmp_path, [_callback()], save_strategy="steps", save_steps=3)
    trainer.train()
    record = get_rotation_record(model)
    for step in (3, 6):
        assert read_rotation_record(tmp_path / f"checkpoint-{step}") == record
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    assert read_rotation_record(tmp_path / "final") == record
    assert json.loads((tmp_path / "final" / RECORD_FILE).read_text())["config"]["seed"] == 0


def test_resume_same_rotation_no_double_rotation_training_continues(tmp_path):
    """Resuming from step 3 with a fresh model reproduces the uninterrupted run's adapter at step 6."""
    full = _peft(tiny_model("llama"))
    _trainer(full, tmp_path / "a", [_callback()], save_strategy="steps", save_steps=3).train()
    expected = _adapter_state(full)

    fresh_base = tiny_model("llama")
    resumed = _peft(fresh_base)
    trainer = _trainer(resumed, tmp_path / "a", [_callback()], save_strategy="no")
    rotated_base = {k: v.clone() for k, v in fresh_base.state_dict().items() if "lora_" not in k}
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    assert get_rotation_record(fresh_base) == read_rotation_record(tmp_path / "a" / "checkpoint-3")
    # the base was rotated once (in on_init_end) and not touched by resume: same bits as run A's base
    for k, v in fresh_base.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, rotated_base[k]), k
            assert torch.equal(v, full.base_model.model.state_dict()[k]), k
    got = _adapter_state(resumed)
    assert got.keys() == expected.keys()
    for k in expected:
        assert rel_err(got[k], expected[k]) <= FP32_FUNCTION_RTOL, k
    assert _losses(trainer), "the resumed run logged no training loss"


def test_resume_with_a_different_rotation_is_refused(tmp_path):
    _trainer(_peft(tiny_model("llama")), tmp_path, [_callback()], save_strategy="steps", save_steps=3, max_steps=3).train()
    other = _trainer(_peft(tiny_model("llama")), tmp_path, [_callback(rotation=RotationConfig(seed=1))], max_steps=6)
    with pytest.raises(RotationError, match="differs"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def _checkpoint_3(out_dir):
    """A 3-step RoLoRA run (rotation seed 0) with its checkpoint at step 3; returns the checkpoint folder."""
    _trainer(_peft(tiny_model("llama")), out_dir, [_callback()], save_strategy="steps", save_steps=3, max_steps=3).train()
    return out_dir / "checkpoint-3"


def test_resume_from_another_folder_checks_the_checkpoint_resumed(tmp_path):
    """The record read is the one of the checkpoint passed to train(), not <output_dir>/checkpoint-<step>."""
    checkpoint = _checkpoint_3(tmp_path / "a")
    other = _trainer(_peft(tiny_model("llama")), tmp_path / "b", [_callback(rotation=RotationConfig(seed=1))], max_steps=6)
    with pytest.raises(RotationError, match="differs"):
        other.train(resume_from_checkpoint=str(checkpoint))
    same = _trainer(_peft(tiny_model("llama")), tmp_path / "c", [_callback()], max_steps=6)
    same.train(resume_from_checkpoint=str(checkpoint))
    assert same.state.global_step == 6


def test_resume_without_a_record_is_refused_unless_allowed(tmp_path, caplog):
    from rolora_plugin.integrations.hf_trainer import RoLoRACallback

    checkpoint = _checkpoint_3(tmp_path / "a")
    (checkpoint / RECORD_FILE).unlink()
    refused = _trainer(_peft(tiny_model("llama")), tmp_path / "a", [_callback()], max_steps=6)
    with pytest.raises(RotationError, match="allow_unverified_resume=True"):
        refused.train(resume_from_checkpoint=True)  # the newest checkpoint of output_dir
    allowed = RoLoRACallback(RoLoRAConfig(monitor=NO_MONITOR), allow_unverified_resume=True)
    trainer = _trainer(_peft(tiny_model("llama")), tmp_path / "b", [allowed], max_steps=6)
    with caplog.at_level(logging.WARNING, logger="rolora_plugin.integrations.hf_trainer"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6 and "cannot verify the rotation" in caplog.text


def test_resumed_checkpoint_outside_trainer_train_needs_the_saved_state(tmp_path):
    """Without a Trainer.train frame, <output_dir>/checkpoint-<step> counts only if it saved this very state."""
    from transformers import TrainerState, TrainingArguments

    from rolora_plugin.integrations.hf_trainer import resumed_checkpoint

    checkpoint = _checkpoint_3(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    assert resumed_checkpoint(args, state) == checkpoint
    state.log_history.append({"loss": 1.0, "step": state.global_step})
    assert resumed_checkpoint(args, state) is None
    assert resumed_checkpoint(args, TrainerState()) is None  # global step 0: not resuming


def test_save_hook_outlives_train_until_removed(tmp_path):
    """on_train_end runs inside train(), so the hook stays for a save_model() after it; remove_save_hook undoes it."""
    from rolora_plugin.integrations.hf_trainer import install_save_hook, remove_save_hook

    peft_model = _peft(tiny_model("llama"))
    trainer = _trainer(peft_model, tmp_path / "run", [_callback()], max_steps=1)
    trainer.train()
    assert "save_pretrained" in vars(peft_model)
    remove_save_hook(peft_model)
    assert "save_pretrained" not in vars(peft_model)
    trainer.save_model(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "adapter_config.json").is_file() and read_rotation_record(tmp_path / "plain") is None
    install_save_hook(peft_model)  # e.g. left by an earlier run: a callback told not to write records removes it
    _trainer(peft_model, tmp_path / "run2", [_callback(export=ExportConfig(save_rotation_record=False))], max_steps=1)
    assert "save_pretrained" not in vars(peft_model)


# ---------------------------------------------------------------------------------------------- QAT


def test_qat_changes_the_forward_trains_and_is_undone(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append((state.global_step, fake_quant_active(model)))

    model = tiny_model("llama")
    peft_model = _peft(model)
    qat = QATConfig(enabled=True, start_step=2, w_bits=4, a_bits=4)
    trainer = _trainer(peft_model, tmp_path, [_callback(qat=qat), Probe()], max_steps=12, logging_steps=2)
    trainer.train()
    assert [active for _, active in seen] == [step > 2 for step, _ in seen]  # on from the step after step 2
    assert not fake_quant_active(peft_model)  # every patch undone at the end
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.1, losses
    ids = random_ids()
    with torch.no_grad():
        fp = peft_model(ids).logits
        handle = enable_fake_quant_(peft_model, qat_quant_config(qat))
        q = peft_model(ids).logits
        handle.remove()
        assert rel_err(peft_model(ids).logits, fp) == 0
    assert rel_err(q, fp) > 1e-3  # W4A4 fake quant really changes the forward


def qat_quant_config(qat):
    return qat.quant


# ---------------------------------------------------------------------------------------------- monitor


def _monitor_keys(entry):
    return {k for k in entry if k.startswith("rolora/")}


def test_monitor_metrics_land_in_log_history(tmp_path):
    monitor = MonitorConfig(every_n_steps=3, layers=[1], num_batches=1)
    trainer = _trainer(_peft(tiny_model("llama")), tmp_path, [_callback(monitor=monitor)], logging_steps=100)
    trainer.train()
    entries = [e for e in trainer.state.log_history if _monitor_keys(e)]
    assert [e["step"] for e in entries] == [3, 6]
    keys = _monitor_keys(entries[-1])
    for kind in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        assert {f"rolora/kurtosis/{kind}_in/mean", f"rolora/kurtosis/{kind}_in/max", f"rolora/max_abs/{kind}_in/max"} <= keys
        assert f"rolora/kurtosis/layer1/{kind}_in" in keys
    assert {"rolora/eval_loss_fp", "rolora/eval_loss_w4a4"} <= keys
    assert len(keys) <= 24  # summaries, not one key per linear
    e = entries[-1]
    assert e["rolora/eval_loss_w4a4"] != e["rolora/eval_loss_fp"]
    assert all(v > 0 for k, v in e.items() if k.startswith("rolora/kurtosis"))


def test_monitor_uses_given_eval_batches_and_reaches_reporters_when_attached_first(tmp_path):
    from transformers import TrainerCallback

    from rolora_plugin.integrations.hf_trainer import RoLoRACallback, add_rolora_callback

    received = []

    class Reporter(TrainerCallback):  # stands in for TensorBoard/W&B, which run before user callbacks
        def on_log(self, args, state, control, logs=None, **kwargs):
            received.append(dict(logs))

    eval_batches = [{"input_ids": random_ids(batch=2, seed=7)}]
    cb = RoLoRACallback(RoLoRAConfig(monitor=MonitorConfig(every_n_steps=2, activation_stats=False)), eval_batches=eval_batches)
    model = tiny_model("llama")
    trainer = _trainer(_peft(model), tmp_path, [Reporter()], max_steps=2, logging_steps=100)
    add_rolora_callback(trainer, cb)
    assert get_rotation_record(model) is not None
    trainer.train()
    got = [r for r in received if "rolora/eval_loss_fp" in r]
    assert len(got) == 1 and "loss" in got[0]
    with torch.no_grad():  # the logged FP loss is the loss on the given batches
        ids = eval_batches[0]["input_ids"]
        expected = trainer.model(input_ids=ids, labels=ids).loss.item()
    assert got[0]["rolora/eval_loss_fp"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- configs


def test_rolora_config_roundtrip_and_validation():
    cfg = RoLoRAConfig(
        rotation=RotationConfig(seed=3, r2=True),
        monitor=MonitorConfig(every_n_steps=10, layers=[0, 5]),
        qat=QATConfig(enabled=True, start_step=100, w_bits=4, a_bits=8, targets=["q_proj", "v_proj"]),
        export=ExportConfig(merged_output_dir="out"),
    )
    assert RoLoRAConfig.from_json(cfg.to_json()) == cfg
    assert RoLoRAConfig.from_dict(RoLoRAConfig().to_dict()) == RoLoRAConfig()
    with pytest.raises(ValueError, match="unknown section"):
        RoLoRAConfig.from_dict({"rotations": {}})
    with pytest.raises(ValueError, match="w_bits"):
        QATConfig(w_bits=1)
    with pytest.raises(ValueError, match="targets"):
        QATConfig(targets="everything")
    with pytest.raises(ValueError, match="every_n_steps"):
        MonitorConfig(every_n_steps=-1)
    with pytest.raises(ValueError, match="unknown field"):
        RoLoRAConfig.from_dict({"qat": {"bits": 4}})


def test_merged_export_at_train_end(tmp_path):
    from rolora_plugin.io.export import load_rotated

    ids = random_ids()
    peft_model = _peft(tiny_model("llama"))
    export = ExportConfig(merged_output_dir=str(tmp_path / "merged"))
    _trainer(peft_model, tmp_path / "run", [_callback(export=export)], max_steps=2).train()
    with torch.no_grad():
        assert rel_err(load_rotated(tmp_path / "merged")(ids).logits, peft_model(ids).logits) <= FP32_FUNCTION_RTOL


def test_callback_is_picklable_and_lazy():
    import pickle

    from rolora_plugin.integrations.hf_trainer import RoLoRACallback

    cb = pickle.loads(pickle.dumps(_callback(qat=QATConfig(enabled=True))))
    assert isinstance(cb, RoLoRACallback) and cb.config.qat.enabled


def test_nonempty_merged_output_dir_is_refused_before_training(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    export = ExportConfig(merged_output_dir=str(target))
    with pytest.raises(FileExistsError, match="not empty"):
        _trainer(_peft(tiny_model("llama")), tmp_path / "run", [_callback(export=export)], max_steps=2)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_adapter_state_export_path_matches_the_live_model(tmp_path):
    """The ZeRO-3 export path (gathered adapter -> staging dir -> merge into the re-rotated base), on one process."""
    from transformers import AutoModelForCausalLM

    from rolora_plugin.integrations.deepspeed import export_adapter_state, gather_trainable
    from rolora_plugin.io.export import load_rotated

    tiny_model("llama").save_pretrained(tmp_path / "base")
    peft_model = _peft(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32))
    cb = _callback(rotation=RotationConfig(r2=True))
    _trainer(peft_model, tmp_path / "run", [cb], max_steps=2).train()
    adapter = gather_trainable(peft_model, keep=True)
    assert adapter and all("lora_" in k for k in adapter)
    export_adapter_state(peft_model, adapter, cb.record, tmp_path / "merged", None, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged", "run"]  # staging dir removed
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(load_rotated(tmp_path / "merged")(ids).logits, peft_model(ids).logits) <= FP32_FUNCTION_RTOL


# ---------------------------------------------------------------------------------------------- lora_lr_scale


def test_lora_lr_scale_in_the_callback_scales_before_the_optimizer_and_resumes(tmp_path):
    """lora_lr_scale='norm-rms': the factors are scaled in on_init_end (function unchanged), the run trains, and a
    resume from step 3 reproduces the uninterrupted run (the re-applied scaling matches the checkpoint's factors)."""
    model = tiny_model("llama")
    peft_model = _peft(model)
    ids = random_ids()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    trainer = _trainer(peft_model, tmp_path / "a", [_callback(lora_lr_scale="norm-rms")], save_strategy="steps", save_steps=3)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q._rolora_lr_scale == get_rotation_record(model).norm_rms[0][0]
    assert not hasattr(peft_model.base_model.model.model.layers[0].self_attn.o_proj, "_rolora_lr_scale")
    with torch.no_grad():
        assert rel_err(peft_model(input_ids=ids).logits, before) <= FP32_FUNCTION_RTOL
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0]
    expected = _adapter_state(peft_model)

    resumed = _peft(tiny_model("llama"))
    again = _trainer(resumed, tmp_path / "a", [_callback(lora_lr_scale="norm-rms")], save_strategy="no")
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    got = _adapter_state(resumed)
    for k in expected:
        assert rel_err(got[k], expected[k]) <= FP32_FUNCTION_RTOL, k


def test_lora_lr_scale_without_a_peft_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a peft model"):
        _trainer(tiny_model("llama"), tmp_path, [_callback(lora_lr_scale="norm-rms")])


# ---------------------------------------------------------------------------------------------- learned rotations


def test_learned_rotations_from_the_callback_with_calibration_and_resume(tmp_path):
    """RoLoRACallback(calibration=...) learns R1 in on_init_end (function unchanged), checkpoints carry the learned
    matrices, and a resume with the same calibration learns the same matrix, so the record check passes."""
    from rolora_plugin.rotate.learned import LEARNED_FILE

    rot = RotationConfig(learn=("r1",), learn_steps=4, learn_tokens=32, learn_lr=3e-3)
    calib = [random_ids(seed=7), random_ids(seed=8)]
    peft_model = _peft(tiny_model("llama"))
    ids = random_ids()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    callback = _callback(rotation=rot)
    callback.calibration = calib
    trainer = _trainer(peft_model, tmp_path / "a", [callback], save_strategy="steps", save_steps=3)
    record = get_rotation_record(peft_model.base_model.model)
    assert record.rotations["r1"].get("learned")
    assert callback.calibration is None
    with torch.no_grad():
        assert rel_err(peft_model(input_ids=ids).logits, before) <= FP32_FUNCTION_RTOL
    trainer.train()
    assert (tmp_path / "a" / "checkpoint-3" / LEARNED_FILE).is_file()

    from rolora_plugin.integrations.hf_trainer import RoLoRACallback

    again = RoLoRACallback(RoLoRAConfig(rotation=rot, monitor=NO_MONITOR), calibration=calib)
    resumed = _peft(tiny_model("llama"))
    _trainer(resumed, tmp_path / "a", [again], save_strategy="no").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert get_rotation_record(resumed.base_model.model) == record


def test_learning_rotation_config_without_calibration_says_how(tmp_path):
    rot = RotationConfig(learn=("r1",), learn_steps=4)
    with pytest.raises(RotationError, match="calibration="):
        _trainer(_peft(tiny_model("llama")), tmp_path, [_callback(rotation=rot)])
