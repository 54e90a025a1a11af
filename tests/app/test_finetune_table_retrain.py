"""``benchmarks/finetune_table.py`` re-trains a cached run when a missing evaluation needs its merged model. The new
evaluations may only join the cached ones if the re-run is the cached run: a W4A4 QAT run trained on another CPU
type is not (measured: LoRA+QAT all-linear seed 0, Intel Xeon cached, AMD EPYC re-run, FP ppl 110 vs 124 after merge), and
the table must then refuse instead of mixing two models' numbers. No training here: the train and evaluation
stages are replaced by functions returning the committed run's real numbers, perturbed."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _finetune as ft  # noqa: E402

RUN = ft.RunSettings(method="lora-qat", targets="all-linear", seed=0, task_limit=0)


@pytest.fixture
def cached_train() -> dict:
    path = ft.RESULTS_DIR / f"{RUN.train_key()}.train.json"  # a committed, real 200-step run
    return json.loads(path.read_text())


def _perturbed(train: dict, rel: float, where: str = "losses") -> dict:
    new = copy.deepcopy(train)
    if where == "losses":
        new["losses"][-1][1] *= 1 + rel
    else:
        new["curves"][-1][where] *= 1 + rel
    for r in new["curves"]:
        r["seconds"] += 3.0  # timings always differ: they must not count
    return new


def _not_listed():
    pytest.fail("the cached files are listed only for the error message")


def test_the_same_run_passes_and_float_noise_too(cached_train):
    ft.check_retrain(cached_train, _perturbed(cached_train, 0.0), RUN.label(), _not_listed)
    ft.check_retrain(cached_train, _perturbed(cached_train, 1e-7), RUN.label(), _not_listed)
    moved = copy.deepcopy(cached_train)
    moved["curves"][3]["heldout_w4a4"] *= 1.02  # the CPU-dependent fake-quant curve of one same model: not compared
    ft.check_retrain(cached_train, moved, RUN.label(), _not_listed)


@pytest.mark.parametrize("where", ["losses", "heldout_fp", "ppl_fp"])
def test_another_trajectory_is_refused_with_what_to_do(cached_train, where):
    with pytest.raises(ft.RetrainMismatch, match=r"did not reproduce the cached run.*relative difference 0\.01.*delete") as e:
        ft.check_retrain(cached_train, _perturbed(cached_train, 1e-2, where), RUN.label(), lambda: [Path("x.train.json")])
    assert RUN.label() in str(e.value) and "x.train.json" in str(e.value) and cached_train["machine"] in str(e.value)


def test_a_run_of_another_length_is_refused(cached_train):
    short = copy.deepcopy(cached_train)
    short["losses"].pop()
    with pytest.raises(ft.RetrainMismatch, match="did not reproduce"):
        ft.check_retrain(cached_train, short, RUN.label(), list)


def _cache_with_a_missing_evaluation(tmp_path, monkeypatch, cached_train, retrained: dict) -> list[str]:
    """A cache holding the run's train stage and no evaluation; re-training returns ``retrained``."""
    monkeypatch.setenv("FT_TABLE_CACHE", str(tmp_path))
    ft._train_path(RUN).parent.mkdir(parents=True)
    ft._train_path(RUN).write_text(json.dumps(cached_train))
    evaluated = []

    def train_stage(s, data):
        (ft._model_dir(s)).mkdir(parents=True)
        (ft._model_dir(s) / "config.json").write_text("{}")  # what the real stage publishes
        return retrained

    def eval_stage(s, data, setting):
        evaluated.append(setting)
        return {"ppl": 1.0}

    monkeypatch.setattr(ft, "_data", lambda s, cache: None)
    monkeypatch.setattr(ft, "_train_stage", train_stage)
    monkeypatch.setattr(ft, "_eval_stage", eval_stage)
    return evaluated


def test_run_one_refuses_an_unreproduced_retrain_and_keeps_the_cache(tmp_path, monkeypatch, cached_train):
    evaluated = _cache_with_a_missing_evaluation(tmp_path, monkeypatch, cached_train, _perturbed(cached_train, 0.05))
    before = ft._train_path(RUN).read_bytes()
    with pytest.raises(ft.RetrainMismatch, match="did not reproduce"):
        ft.run_one(RUN, {}, settings=("fp",))
    assert evaluated == []  # nothing measured on the other model
    assert ft._train_path(RUN).read_bytes() == before  # the cached run is kept as it was
    assert not ft._model_dir(RUN).exists()  # and the other model is not left for a later invocation to evaluate


def test_run_one_evaluates_a_reproduced_retrain(tmp_path, monkeypatch, cached_train):
    evaluated = _cache_with_a_missing_evaluation(tmp_path, monkeypatch, cached_train, _perturbed(cached_train, 0.0))
    out = ft.run_one(RUN, {}, settings=("fp",))
    assert evaluated == ["fp"] and out["fp"]["ppl"] == 1.0
    assert json.loads(ft._eval_path(RUN, "fp").read_text())["ppl"] == 1.0


def test_the_command_stops_with_one_line_saying_what_to_do(tmp_path, monkeypatch, cached_train):
    import finetune_table

    _cache_with_a_missing_evaluation(tmp_path, monkeypatch, cached_train, _perturbed(cached_train, 0.05))
    argv = ["--targets", "all-linear", "--seeds", "0", "--only", "lora-qat", "--task-limit", "0", "--evals", "fp", "--no-append"]
    with pytest.raises(SystemExit, match=r"^finetune_table: lora-qat/all-linear/seed0.*did not reproduce.*delete"):
        finetune_table.main(argv)
