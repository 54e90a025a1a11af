"""The demo's deploy stage on a tiny model (fast): each servable preset on the merged model, exported as
compressed-tensors, re-loaded by the consumer-side check; its rows in results, the table and the W4A4 plot."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tests.helpers import random_ids, tiny_model

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.app.demo import CONSUMER_REL, DemoConfig, _deploy, _deploy_lines, response_perplexity
from rolora_plugin.metrics import perplexity

pytest.importorskip("compressed_tensors")


def _tok():  # what _deploy needs of a tokenizer: padding for the answer perplexity, save_pretrained for the export
    return SimpleNamespace(pad_token_id=0, eos_token_id=2, save_pretrained=lambda *a, **k: None)


def _held_out(vocab: int) -> list[dict]:
    ids = random_ids(vocab, batch=3, seq=12, seed=9).tolist()
    return [{"input_ids": row, "labels": [-100] * 4 + row[4:]} for row in ids]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    model = tiny_model("llama")
    rotate_model_(model, RotationConfig(seed=0, r1=True, r2=True, r4=True), progress=False)
    vocab, tok, held_out = model.config.vocab_size, _tok(), _held_out(model.config.vocab_size)
    chunks, calib = random_ids(vocab, batch=2, seq=16, seed=5), random_ids(vocab, batch=2, seq=16, seed=1)
    fp = {"text_ppl": perplexity(model, chunks, progress=False), "response_ppl": response_perplexity(model, tok, held_out)}
    keep = tmp_path_factory.mktemp("report") / "exports"
    dep = _deploy(model, tok, DemoConfig(servable=["w4a4-int", "nvfp4"]), chunks, calib, held_out, fp, keep)
    return dep, model, fp


def test_deploy_exports_each_servable_preset_and_the_consumer_computes_the_same_model(deployed):
    dep, model, fp = deployed
    assert [r["preset"] for r in dep["rows"]] == ["w4a4-int", "nvfp4"] and dep["fp"] == fp and dep["export_kept"]
    for r in dep["rows"]:
        assert r["engine"]["servable"] and r["engine"]["scheme"], r["preset"]
        assert r["same_model"] and r["consumer_rel_err"] <= CONSUMER_REL, r["preset"]
        assert r["recipe"] == "GPTQ+clip (50-pt grid), 2x16 calib. tokens"
        assert math.isfinite(r["text_ppl"]) and r["ratio_to_fp"] == pytest.approx(r["text_ppl"] / fp["text_ppl"])
        assert r["text_ppl"] == r["check"]["ppl"]["rolora"] and r["consumer_text_ppl"] == r["check"]["ppl"]["consumer"]
        assert r["export"]["bytes"] > 0 and "config.json" in r["export"]["files"] and r["export"]["path"].endswith(r["preset"])
    w4, nv = dep["rows"]
    assert w4["compared_with"] == "exact weights" and w4["consumer_rel_err"] == w4["check"]["consumer"]["rel_err"]
    assert nv["compared_with"] == "bf16-rounded weights" and nv["consumer_rel_err"] == nv["check"]["bf16_weights"]["rel_err"]
    assert nv["format"] == "nvfp4" and w4["format"] == "int"
    assert model.config.rolora and not any("quant" in type(m).__name__.lower() for m in model.modules())  # the FP model is untouched


def test_deploy_uses_a_temporary_folder_by_default_and_labels_overrides(tmp_path):
    model = tiny_model("llama")
    rotate_model_(model, RotationConfig(seed=0), progress=False)
    vocab, tok = model.config.vocab_size, _tok()
    chunks, calib = random_ids(vocab, batch=1, seq=16, seed=5), random_ids(vocab, batch=2, seq=16, seed=1)
    cfg = DemoConfig(servable=["w4a4-int"], servable_overrides={"method": "rtn", "w_clip_grid": 10})
    dep = _deploy(model, tok, cfg, chunks, calib, _held_out(vocab), {"text_ppl": 1.0, "response_ppl": 1.0}, None)
    (row,) = dep["rows"]
    assert row["export"]["path"] is None and not dep["export_kept"] and row["recipe"] == "RTN+clip (10-pt grid), no calibration"
    assert row["config"]["method"] == "rtn" and row["same_model"]


def test_demo_config_checks_the_servable_presets():
    assert DemoConfig().servable == ["w4a4-int", "nvfp4"] and DemoConfig(servable=[]).needs_calibration() is False
    assert DemoConfig().needs_calibration()  # GPTQ and NVFP4's activation global scale
    with pytest.raises(ValueError, match="not servable presets"):
        DemoConfig(servable=["w4a4"])
    with pytest.raises((ValueError, TypeError)):
        DemoConfig(servable_overrides={"method": "awq"})
