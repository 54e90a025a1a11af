"""FP4 QAT through the hosts (issue 30): ``QATConfig(preset="nvfp4" / "mxfp4")`` in RoLoRACallback and the Axolotl
args. The fake-quant forward of a LoRA model is the merged model quantized by ``quantize_model_`` with the same
preset at RTN; a Trainer run in NVFP4 / MXFP4 trains the LoRA factors; bad settings say what to do."""

from __future__ import annotations

import copy
import math
import sys
import types

import pytest
import torch
import yaml
from tests.helpers import logits, lora, random_ids, rel_err, tiny_model

from rolora_plugin import MonitorConfig, QATConfig, QuantConfig, RoLoRAConfig, RotationConfig, rotate_model_
from rolora_plugin.quant import fake_quant_active, fake_quantized, quantize_model_
from rolora_plugin.quant.model import QuantizationRecord, install_activation_quantizers
from rolora_plugin.lora.config import fake_quant_config, fake_quant_preset

FP4 = ("nvfp4", "mxfp4")
FP32_MERGE_RTOL = 1e-5  # as tests/quant/test_qat.py: fake-quant LoRA forward vs merged + quantize_model_, float32
ALL_ROTATIONS = RotationConfig(r2=True, r3=True)


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("fmt", FP4)
def test_a_preset_gives_its_format_rounded_to_nearest(fmt):
    cfg = QATConfig(enabled=True, preset=fmt)
    want = QuantConfig(w_format=fmt, a_format=fmt, skip=())  # RTN, max-scaled, the format's own group size
    assert cfg.quant == fake_quant_preset(fmt) == want and cfg.preset == fmt
    assert cfg.quant.weight_spec().is_fp4 and cfg.quant.activation_spec().is_fp4
    assert cfg.quant.label() == f"{fmt.upper()} W4A4"
    # the PTQ preset minus its post-training steps: same formats and numerics
    ptq = QuantConfig.preset(fmt)
    assert (ptq.weight_spec(), ptq.activation_spec()) == (cfg.quant.weight_spec(), cfg.quant.activation_spec())
    assert RoLoRAConfig.from_json(RoLoRAConfig(qat=cfg).to_json()).qat == cfg  # round trip (nested form)
    assert QATConfig().preset is None and QATConfig(a_bits=8).preset is None
    assert QATConfig(preset="w4a4-int").quant == fake_quant_config(int_grid="full")


def test_yaml_preset_key_in_the_qat_and_monitor_sections():
    """The YAML form shared by ``rolora train`` and the Axolotl ``rolora:`` section."""
    data = yaml.safe_load("qat: {enabled: true, start_step: 3, preset: nvfp4}\nmonitor: {every_n_steps: 5, preset: nvfp4}\n")
    cfg = RoLoRAConfig.from_dict(data)
    assert cfg.qat == QATConfig(enabled=True, start_step=3, quant=fake_quant_preset("nvfp4"))
    assert cfg.monitor.quant == fake_quant_preset("nvfp4") and cfg.monitor.preset == "nvfp4"
    assert QATConfig(preset="w4a4-int", a_bits=8).quant == fake_quant_config(int_grid="full", a_bits=8)  # flat keys override


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # the PTQ preset itself: refused (its GPTQ would be skipped silently), naming the key that does it
        (dict(quant=QuantConfig.preset("nvfp4")), r"does not support method='gptq'.*pass preset='nvfp4' instead of quant="),
        (dict(quant=QuantConfig.preset("mxfp4", skip=())), r"pass preset='mxfp4'"),
        (dict(quant=QuantConfig(method="gptq")), r"does not support method='gptq'.*pass preset=<name> \(e\.g\. nvfp4"),
        (dict(preset="nvfp4", quant=QuantConfig()), r"either quant=QuantConfig\(...\) or preset='nvfp4', not both"),
        (dict(preset="fp4"), r"QATConfig.preset must be one of \[.*'mxfp4', 'nvfp4'.*got 'fp4'"),
        (dict(preset="nvfp4", w_bits=8), r"preset='nvfp4' with w_bits=8: .*4-bit format; set w_bits=4"),
        (dict(preset="nvfp4", w_group_size=32), r"uses groups of 16; leave w_group_size unset"),
        (dict(preset="w4a4kv4"), r"preset='w4a4kv4' needs what the fake-quant forward does not do: kv_bits=4"),
    ],
)
def test_bad_fp4_qat_settings_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QATConfig(enabled=True, **kwargs)


def test_rolora_config_with_the_ptq_preset_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"pass preset='nvfp4'"):
        RoLoRAConfig(qat=QATConfig(quant=QuantConfig.preset("nvfp4")))
    with pytest.raises(ValueError, match=r"MonitorConfig.preset must be one of"):
        RoLoRAConfig.from_dict({"monitor": {"preset": "NVFP4"}})


# ---------------------------------------------------------------------------------------------- forward == PTQ


def _rtn(fmt: str) -> QuantConfig:
    """``QuantConfig.preset(fmt)`` with RTN and no clip search: the PTQ model a fake-quant forward stands for."""
    return QuantConfig.preset(fmt, method="rtn", w_clip_search=False)


@pytest.mark.parametrize("fmt", FP4)
def test_fp4_fake_quant_forward_equals_merged_then_quantize_model(fmt):
    """QAT's forward (after the online R4 and R3) == merge + quantize_model_ with the same preset at RTN.

    NVFP4 activations: quantize_model_ calibrates a static per-linear ``input_global_scale`` (what an engine
    loads), while QAT computes the global scale of each input tensor on the fly (448·6 / max|x| of the tensor).
    The two agree only where the calibration maximum is the tensor's own, so the comparison removes the calibrated
    scales from the PTQ record (the quantizers then fall back to the same dynamic per-tensor scale); weights,
    group scales (FP8-E4M3) and E2M1 codes are the PTQ model's exactly. MXFP4 has no global scale: compared as is.
    """
    ids = random_ids()
    model = tiny_model("llama")
    rotate_model_(model, ALL_ROTATIONS, progress=False)
    peft_model = lora(model, "all-linear")
    fp = logits(peft_model, ids)
    with fake_quantized(peft_model, QATConfig(preset=fmt).quant):
        fq = logits(peft_model, ids)
    assert not fake_quant_active(peft_model) and rel_err(logits(peft_model, ids), fp) == 0
    merged = copy.deepcopy(peft_model).merge_and_unload()
    calibration = [random_ids(seed=5)] if fmt == "nvfp4" else None  # NVFP4 PTQ refuses to run without it
    record = quantize_model_(merged, _rtn(fmt), calibration=calibration, progress=False)
    if fmt == "nvfp4":
        static = logits(merged, ids)
        assert len(record.input_global_scales) == len(record.quantized)
        dynamic = QuantizationRecord.from_dict({**record.to_dict(), "input_global_scales": {}})
        install_activation_quantizers(merged, dynamic)
        assert rel_err(static, logits(merged, ids)) > 100 * FP32_MERGE_RTOL  # the global scale matters at all
    assert rel_err(fq, logits(merged, ids)) <= FP32_MERGE_RTOL
    assert rel_err(fq, fp) > 100 * FP32_MERGE_RTOL


# ---------------------------------------------------------------------------------------------- Trainer


def _pattern_data(n=8, seq=16, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start, step = torch.randint(0, vocab - 3, (2,), generator=g).tolist()
        ids = torch.tensor([3 + (start + i * (step % 5 + 1)) % (vocab - 3) for i in range(seq)])
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _trainer(model, out_dir, callbacks, **kw):
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(out_dir), max_steps=12, per_device_train_batch_size=4, learning_rate=2e-2, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, lr_scheduler_type="constant")  # fmt: skip
    args.update(kw)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=_pattern_data(), callbacks=callbacks)


@pytest.mark.parametrize("fmt", FP4)
def test_trainer_with_rolora_callback_trains_in_fp4(tmp_path, fmt):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    from rolora_plugin import RoLoRACallback

    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(fake_quant_active(model))

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    factors = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    monitor = MonitorConfig(every_n_steps=6, activation_stats=False, num_batches=1, preset=fmt)
    eval_batches = [{"input_ids": random_ids(batch=2, seed=7)}]
    callback = RoLoRACallback(RoLoRAConfig(qat=QATConfig(enabled=True, preset=fmt), monitor=monitor), eval_batches=eval_batches)
    trainer = _trainer(peft_model, tmp_path, [callback, Probe()])
    trainer.train()
    assert all(seen) and len(seen) == 12 and not fake_quant_active(peft_model)  # on from step 0, undone at the end
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses) and min(losses[-3:]) < losses[0] - 0.1, losses
    moved = [n for n, p in peft_model.named_parameters() if "lora_" in n and not torch.equal(p.detach(), factors[n])]
    assert sorted(moved) == sorted(factors)  # gradients reached every LoRA factor, A and B, through the FP4 STE
    logged = [e for e in trainer.state.log_history if "rolora/eval_loss_fp" in e]
    assert [e["step"] for e in logged] == [6, 12]
    with torch.no_grad(), fake_quantized(peft_model, QATConfig(preset=fmt).quant):  # the monitor's number, recomputed
        ids = eval_batches[0]["input_ids"]
        want = peft_model(input_ids=ids, labels=ids).loss.item()
    got = logged[-1]["rolora/eval_loss_w4a4"]  # the monitor names the key by bits: NVFP4 / MXFP4 log as w4a4
    assert got == pytest.approx(want, rel=1e-5) and got != logged[-1]["rolora/eval_loss_fp"]


def test_trainer_refuses_an_fp4_group_that_does_not_divide_a_width_before_training(tmp_path):
    from peft import LoraConfig, get_peft_model

    from rolora_plugin import RoLoRACallback

    model = tiny_model("llama", intermediate=72)  # down_proj reads 72 columns: not a multiple of NVFP4's 16
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    cb = RoLoRACallback(RoLoRAConfig(qat=QATConfig(enabled=True, preset="nvfp4"), monitor=MonitorConfig(every_n_steps=0)))
    trainer = _trainer(peft_model, tmp_path, [cb], max_steps=2)
    with pytest.raises(ValueError, match=r"NVFP4 W4A4 quantizes in groups of 16 input columns.*width 72 of .*down_proj.*qat.targets"):
        trainer.train()
    assert trainer.state.global_step == 0 and not fake_quant_active(peft_model)


# ---------------------------------------------------------------------------------------------- Axolotl args


@pytest.fixture
def pydantic():
    return pytest.importorskip("pydantic")


def test_axolotl_args_take_the_preset_key(pydantic):
    from rolora_plugin.integrations.axolotl.args import RoLoRAArgs

    section = yaml.safe_load("qat: {enabled: true, preset: nvfp4}\nmonitor: {every_n_steps: 10, preset: nvfp4}\n")
    cfg = RoLoRAArgs(rolora=section).rolora.to_rolora_config()
    assert cfg.qat == QATConfig(enabled=True, preset="nvfp4") and cfg.qat.preset == "nvfp4"
    assert cfg.monitor.quant == fake_quant_preset("nvfp4")
    assert RoLoRAArgs(rolora={"qat": {"enabled": True, "preset": "mxfp4"}}).rolora.qat.quant.w_format == "mxfp4"


@pytest.mark.parametrize(
    "section, message",
    [
        ({"qat": {"enabled": True, "preset": "fp4"}}, "rolora.qat: QATConfig.preset must be one of"),
        ({"qat": {"enabled": True, "quant": {"w_format": "nvfp4", "a_format": "nvfp4", "method": "gptq"}}},
         "rolora.qat: QATConfig.quant: the fake-quant forward does not support method='gptq'"),
        ({"qat": {"preset": "nvfp4", "quant": {}}}, "rolora.qat: QATConfig: give either quant=QuantConfig(...) or preset='nvfp4'"),
        ({"monitor": {"preset": "w4a4kv4"}}, "rolora.monitor: MonitorConfig: preset='w4a4kv4' needs what the fake-quant forward does not do"),
    ],
)
def test_axolotl_args_errors_on_fp4_qat_say_what_to_do(pydantic, section, message):
    from rolora_plugin.integrations.axolotl.args import RoLoRAArgs

    with pytest.raises(pydantic.ValidationError) as e:
        RoLoRAArgs(rolora=section)
    assert message in str(e.value)


def test_axolotl_plugin_hands_the_fp4_qat_to_the_callback(pydantic, monkeypatch, caplog):
    """The plugin's callback carries the preset's QAT config (stand-in BasePlugin: Axolotl is not installed here)."""
    import logging

    base = types.ModuleType("axolotl.integrations.base")
    base.BasePlugin = type("BasePlugin", (), {})
    for name in ("axolotl", "axolotl.integrations"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "axolotl.integrations.base", base)
    monkeypatch.delitem(sys.modules, "rolora_plugin.integrations.axolotl.plugin", raising=False)
    try:
        from rolora_plugin.integrations.axolotl import plugin as module

        with caplog.at_level(logging.INFO, logger="axolotl.integrations.rolora"):
            (callback,) = module.RoLoRAPlugin().add_callbacks_pre_trainer({"rolora": {"qat": {"enabled": True, "preset": "nvfp4"}}}, None)
    finally:
        sys.modules.pop("rolora_plugin.integrations.axolotl.plugin", None)
    assert callback.config.qat == QATConfig(enabled=True, preset="nvfp4")
    assert "QAT in NVFP4 W4A4 from step 0" in caplog.text and "preset nvfp4" in caplog.text
