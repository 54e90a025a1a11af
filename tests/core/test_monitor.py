"""rolora_plugin.lora.monitor without a Trainer: per-kind activation summaries, fake-quant eval loss, batch capture."""

import pytest
import torch
from tests.helpers import random_ids, tiny_model

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.metrics import mean_loss
from rolora_plugin.lora.monitor import BatchCapture, activation_metrics, measured_kinds, monitor_metrics
from rolora_plugin.quant import enable_fake_quant_, fake_quant_active
from rolora_plugin.lora.config import MonitorConfig, fake_quant_config


@pytest.mark.parametrize(("family", "kinds"), [("llama", ("q_proj", "o_proj", "gate_proj", "down_proj")),
                                               ("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))])  # fmt: skip
def test_activation_metrics_summarise_each_input_kind(family, kinds):
    model = tiny_model(family)
    assert measured_kinds(model)[0] == kinds
    out = activation_metrics(model, [random_ids(batch=2)], layers=[1])
    expected = {f"rolora/{stat}/{kind}_in/{agg}" for kind in kinds for stat, agg in (("kurtosis", "mean"), ("kurtosis", "max"), ("max_abs", "max"))}
    expected |= {f"rolora/{stat}/layer1/{kind}_in" for kind in kinds for stat in ("kurtosis", "max_abs")}
    assert set(out) == expected
    for kind in kinds:
        assert out[f"rolora/kurtosis/{kind}_in/mean"] <= out[f"rolora/kurtosis/{kind}_in/max"]
        assert out[f"rolora/max_abs/{kind}_in/max"] >= out[f"rolora/max_abs/layer1/{kind}_in"] > 0


def test_monitor_metrics_fp_loss_is_mean_loss_and_mode_is_restored():
    model = tiny_model("llama").train()
    batches = [{"input_ids": random_ids(batch=2, seed=s)} for s in range(2)]
    out = monitor_metrics(model, batches, MonitorConfig(activation_stats=False, quant=fake_quant_config(w_bits=4, a_bits=8)))
    assert set(out) == {"rolora/eval_loss_fp", "rolora/eval_loss_w4a8"}
    assert out["rolora/eval_loss_fp"] == pytest.approx(mean_loss(model, batches), rel=1e-6)
    assert out["rolora/eval_loss_w4a8"] != out["rolora/eval_loss_fp"]
    assert model.training and not fake_quant_active(model)


def test_activation_metrics_are_full_precision_while_qat_is_on():
    model = tiny_model("llama")
    rotate_model_(model, RotationConfig(), progress=False)
    ids = [random_ids(batch=2)]
    fp = activation_metrics(model, ids)
    handle = enable_fake_quant_(model, fake_quant_config(w_bits=4, a_bits=4))
    try:
        assert activation_metrics(model, ids) == fp
    finally:
        handle.remove()


def test_batch_capture_keeps_the_first_batches_then_removes_itself():
    model = tiny_model("llama")
    capture = BatchCapture(model, 2)
    calls = [random_ids(batch=1, seed=s) for s in range(3)]
    with torch.no_grad():
        for ids in calls:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert capture.handle is None and len(capture.batches) == 2
    for kept, ids in zip(capture.batches, calls):
        assert set(kept) == {"input_ids", "attention_mask"} and torch.equal(kept["input_ids"], ids)
