"""``benchmarks/finetune_table.py``'s FP4 rows (issue 30): what ``--fp4`` plans, the evaluation configs, cache keys
(new settings get new keys, existing ones stay valid), when a merged model is deleted, and the FP4 table and goal
lines read back from a cache. No training here: the stages are replaced by functions returning fixed numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _finetune as ft  # noqa: E402
import finetune_table  # noqa: E402

from rolora_plugin import QuantConfig  # noqa: E402
from rolora_plugin.app.train import settings_callbacks  # noqa: E402
from rolora_plugin.lora.config import fake_quant_preset  # noqa: E402


def _args(*argv):
    return finetune_table.parse_args(list(argv))


def test_fp4_plans_lora_rolora_and_rolora_qat_nvfp4_with_the_nvfp4_evaluations():
    args = _args("--quick", "--fp4")
    runs = finetune_table.planned(args)
    assert [s.method for s in runs] == ["lora", "rolora", "rolora-qat-nvfp4"]
    assert {(s.targets, s.seed, s.steps, s.task_limit) for s in runs} == {("qv", 0, 20, 10)}
    assert finetune_table.evals(args) == ("fp", "nvfp4-rtn", "nvfp4-gptq")
    assert finetune_table.evals(_args("--fp4", "--evals", "fp,mxfp4-rtn")) == ("fp", "mxfp4-rtn")
    assert finetune_table.evals(_args()) == ft.EVAL_SETTINGS  # the default table is unchanged
    assert not set(ft.FP4_METHODS) & set(ft.DEFAULT_METHODS)  # the FP4 runs are on request only
    with pytest.raises(SystemExit, match="invalid value"):
        finetune_table.evals(_args("--evals", "fp,nvfp4"))


def test_fp4_method_trains_with_the_preset_and_evaluations_use_the_presets():
    (callback,) = settings_callbacks(ft.RunSettings(method="rolora-qat-nvfp4", targets="qv", seed=0).finetune_settings())
    assert callback.config.qat.enabled and callback.config.qat.quant == fake_quant_preset("nvfp4")
    assert settings_callbacks(ft.RunSettings(method="rolora-qat", targets="qv", seed=0).finetune_settings())[0].config.qat.preset is None  # int W4A4
    assert ft.eval_quant("nvfp4-gptq") == QuantConfig.preset("nvfp4")
    assert ft.eval_quant("nvfp4-rtn") == QuantConfig.preset("nvfp4", method="rtn", w_clip_search=False)
    assert ft.eval_quant("mxfp4-rtn").w_format == "mxfp4" and ft.eval_quant("fp") is None
    assert ft.eval_quant("rtn") == QuantConfig(w_bits=4, a_bits=4) and ft.eval_quant("gptq") == QuantConfig.preset("w4a4")
    assert ft.default_settings("rolora-qat-mxfp4") == ("fp", "mxfp4-rtn", "mxfp4-gptq")


def test_keys_of_committed_runs_stay_valid_and_fp4_settings_get_their_own():
    run = ft.RunSettings(method="lora-qat", targets="all-linear", seed=0, task_limit=0)
    assert (ft.RESULTS_DIR / f"{run.train_key()}.train.json").is_file()  # a committed run still found by its key
    s = ft.RunSettings(method="lora", targets="qv", seed=0)
    keys = {k: s.eval_key(k) for k in ft.ALL_SETTINGS}
    assert len(set(keys.values())) == len(keys)
    calib = ft.RunSettings(method="lora", targets="qv", seed=0, calib_chunks=4)
    changed = {k for k in ft.ALL_SETTINGS if calib.eval_key(k) != keys[k]}
    assert changed == {"gptq", "nvfp4-rtn", "nvfp4-gptq", "mxfp4-gptq"}  # NVFP4 RTN reads calibration (global scales)
    assert ft.RunSettings(method="rolora-qat-nvfp4", targets="qv", seed=0).train_key() != ft.RunSettings(
        method="rolora-qat", targets="qv", seed=0).train_key()  # fmt: skip


def _fake_stages(tmp_path, monkeypatch, numbers):
    monkeypatch.setenv("FT_TABLE_CACHE", str(tmp_path))
    trained = []

    def train_stage(s, data):
        trained.append(s.method)
        ft._model_dir(s).mkdir(parents=True)
        (ft._model_dir(s) / "config.json").write_text("{}")
        return {"losses": [[1, 2.0]], "curves": [{"step": 0, "heldout_fp": 2.0, "ppl_fp": 20.0}], "seconds": 1.0}

    def eval_stage(s, data, setting):
        return dict(numbers[(s.method, setting)], seconds=1.0)

    monkeypatch.setattr(ft, "_data", lambda s, cache: None)
    monkeypatch.setattr(ft, "_train_stage", train_stage)
    monkeypatch.setattr(ft, "_eval_stage", eval_stage)
    return trained


def test_a_merged_model_is_kept_until_its_method_s_evaluations_and_the_asked_ones_are_cached(tmp_path, monkeypatch):
    numbers = {(m, k): {"ppl": 30.0, "heldout_loss": 2.0} for m in ft.METHODS for k in ft.ALL_SETTINGS}
    _fake_stages(tmp_path, monkeypatch, numbers)
    qat = ft.RunSettings(method="rolora-qat-nvfp4", targets="qv", seed=0, task_limit=0)
    ft.run_one(qat, {}, ("fp", "nvfp4-rtn"))
    assert ft._model_dir(qat).is_dir()  # its own NVFP4 GPTQ is missing
    ft.run_one(qat, {}, ("nvfp4-gptq",))
    assert not ft._model_dir(qat).exists()  # fp + nvfp4-rtn + nvfp4-gptq: done, without the int evaluations
    lora = ft.RunSettings(method="lora", targets="qv", seed=0, task_limit=0)
    ft.run_one(lora, {}, ft.EVAL_SETTINGS)
    for posthoc in ft.EVAL_SETTINGS:
        ft.run_one(ft.RunSettings(method="lora-posthoc", targets="qv", seed=0, task_limit=0), {}, (posthoc,))
    assert not ft._model_dir(lora).exists()  # as before: deleted once LoRA and its control are evaluated
    ft.run_one(lora, {}, ("nvfp4-rtn",))  # re-trained for the new evaluation, deleted again once it is cached
    assert ft._read(ft._eval_path(lora, "nvfp4-rtn"))["ppl"] == 30.0 and not ft._model_dir(lora).exists()


def test_cached_only_prints_the_fp4_table_and_goal_lines(tmp_path, monkeypatch, capsys):
    limit = ft.docs_for_stderr(0.015, 7)
    avg = {"fp": 0.45, "nvfp4-rtn": 0.40, "nvfp4-gptq": 0.44}
    numbers = {(m, k): {"ppl": 30.0 + i, "heldout_loss": 2.0, "avg": avg[k] - (0.05 if m == "lora" and k != "fp" else 0), "avg_stderr": 0.014}
               for m in ("lora", "rolora", "rolora-qat-nvfp4") for i, k in enumerate(avg)}  # fmt: skip
    _fake_stages(tmp_path, monkeypatch, numbers)
    monkeypatch.setattr(ft, "chance_level", lambda n: 0.35)
    monkeypatch.setattr(finetune_table, "plot_curves", lambda results, path: None)
    argv = ["--fp4", "--targets", "qv", "--seeds", "0", "--task-limit", str(limit), "--no-append"]
    finetune_table.main(argv)
    finetune_table.main(argv + ["--cached-only"])
    out = capsys.readouterr().out.split("machine:")[-2]  # the second (cached-only) report
    assert "Runs complete: 3/3" in out
    fp4 = out.split("FP4 (issue 30")[1]
    assert "| held-out NVFP4 RTN | ppl NVFP4 RTN | avg NVFP4 RTN | recovery NVFP4 RTN |" in fp4
    row = next(line for line in fp4.splitlines() if line.startswith("| rolora-qat-nvfp4 | qv |"))
    assert "| 50.0% (1 seed) |" in row and "| 90.0% (1 seed) |" in row  # (40-35)/(45-35), (44-35)/(45-35)
    assert "RoLoRA+QAT in NVFP4, recovery ≥ 95%: **not met** on 1 seed(s) of 3 — NVFP4 RTN 50.0% (1 seed) / GPTQ 90.0% (1 seed)" in out
    assert "[qv] at NVFP4 RTN: lora ppl 31.00 (1.03× its FP), avg 35.0, recovery 0.0% (1 seed); rolora ppl 31.00" in out
