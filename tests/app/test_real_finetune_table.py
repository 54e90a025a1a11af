"""Real fine-tune table at reduced size (benchmarks/_finetune.py): SmolLM2-135M, SciQ, q/v, a few steps.

Asserts only robust facts: after the same fine-tune RoLoRA's W4A4 RTN perplexity is below LoRA's (rotation
removes the outliers that wreck 4-bit activations: ~35× at 200 steps, ~5× at this size), and the W4A4 QAT runs train (finite loss at
every step, finite held-out loss after merge), and the post-hoc control is LoRA's own run rotated after merge
(one training; the same FP function; W4A4 RTN perplexity below LoRA's). The issue's goals (recovery ≥ 85%, FP parity) are benchmarks in
benchmarks/RESULTS.md, never asserted here. The runs go to a temporary cache (``FT_TABLE_CACHE``).
"""

import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

SIZE = {"targets": "qv", "seed": 0, "steps": 2, "eval_every": 1, "batch_size": 2, "max_len": 64, "n_heldout": 4,
        "ppl_chunks": 1, "ppl_seq_len": 64, "task_limit": 0, "curve_ppl_chunks": 1, "curve_heldout_batches": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("peft")
    from rolora_plugin.app.assets import smollm2_ready

    if not smollm2_ready():
        from rolora_plugin.app.assets import smollm2_gguf

        smollm2_gguf()  # clear AssetError with the pip command if the model package is missing
    mp = pytest.MonkeyPatch()
    mp.setenv("FT_TABLE_CACHE", str(tmp_path_factory.mktemp("ft_table")))
    import _finetune as ft

    data: dict = {}
    plan = {"lora": ("fp", "rtn"), "lora-posthoc": ("fp", "rtn"), "rolora": ("rtn",), "rolora-qat": ("fp",), "lora-qat": ("fp",),
            "base": ("fp", "rtn"), "base-posthoc": ("fp", "rtn")}  # fmt: skip
    try:
        yield {m: ft.run_one(ft.RunSettings(method=m, **SIZE), data, settings) for m, settings in plan.items()}
    finally:
        mp.undo()


def test_rolora_w4a4_rtn_perplexity_below_lora(runs):
    lora, rolora = runs["lora"]["rtn"]["ppl"], runs["rolora"]["rtn"]["ppl"]
    assert rolora < lora, (rolora, lora)


@pytest.mark.parametrize("method", ["lora-qat", "rolora-qat"])
def test_qat_runs_train(runs, method):
    run = runs[method]
    losses = [v for _, v in run["train"]["losses"]]
    assert len(losses) == SIZE["steps"] and all(math.isfinite(v) for v in losses), losses
    assert math.isfinite(run["fp"]["heldout_loss"]), run["fp"]
    curves = run["train"]["curves"]
    assert [r["step"] for r in curves] == list(range(SIZE["steps"] + 1)), curves
    assert all(math.isfinite(r["heldout_w4a4"]) for r in curves), curves


def test_posthoc_control_is_the_lora_run_rotated(runs):
    lora, post = runs["lora"], runs["lora-posthoc"]
    import _finetune as ft

    assert ft.RunSettings(method="lora-posthoc", **SIZE).train_key() == ft.RunSettings(method="lora", **SIZE).train_key()
    assert [list(x) for x in post["train"]["losses"]] == [list(x) for x in lora["train"]["losses"]]  # not trained again
    assert post["train"]["settings"]["method"] == "lora"
    assert math.isclose(post["fp"]["ppl"], lora["fp"]["ppl"], rel_tol=1e-3), (post["fp"], lora["fp"])
    assert math.isclose(post["fp"]["heldout_loss"], lora["fp"]["heldout_loss"], rel_tol=1e-3)
    assert post["rtn"]["ppl"] < lora["rtn"]["ppl"]  # rotated at W4A4: the outliers are gone


def test_unfolded_coordinates_follow_plain_lora_under_sgd(tmp_path, monkeypatch):
    """``lora_coords="unfolded"`` trains Â with A' = Â Rᵀ diag(g) R: the unrotated equivalent is A = Â Rᵀ, an
    orthogonal re-parametrisation of LoRA's A, so under SGD the rotated model follows plain LoRA step for step,
    where plain RoLoRA (A' trained directly: A's step preconditioned by diag(1/g²)) does not."""
    monkeypatch.setenv("FT_TABLE_CACHE", str(tmp_path))
    import _finetune as ft

    size = {**SIZE, "steps": 3, "optimizer": "sgd", "lr": 0.1}
    data: dict = {}
    runs = {name: ft.run_one(ft.RunSettings(**kw, **size), data, ("fp",))
            for name, kw in {"lora": {"method": "lora"}, "unfolded": {"method": "rolora", "lora_coords": "unfolded"},
                             "rolora": {"method": "rolora"}}.items()}  # fmt: skip
    last = {k: r["train"]["curves"][-1]["heldout_fp"] for k, r in runs.items()}
    assert math.isclose(last["unfolded"], last["lora"], rel_tol=1e-4), last
    assert abs(last["rolora"] / last["lora"] - 1) > 1e-3, last
    assert math.isclose(runs["unfolded"]["fp"]["ppl"], runs["lora"]["fp"]["ppl"], rel_tol=1e-4), runs


def test_reference_rows_are_the_pretrained_model_and_not_in_the_default_table(runs):
    """``base`` is SmolLM2 itself (no training stage: no losses; the same FP numbers whatever the training
    settings), ``base-posthoc`` the same model rotated R1+R4: the same FP function, far better W4A4 RTN."""
    import _finetune as ft
    import finetune_table

    base, post = runs["base"], runs["base-posthoc"]
    assert base["train"]["losses"] == [] and post["train"]["settings"]["method"] == "base"
    assert ft.RunSettings(method="base", **{**SIZE, "steps": 7, "lr": 1.0}).train_key() == ft.RunSettings(method="base", **SIZE).train_key()
    assert math.isclose(post["fp"]["ppl"], base["fp"]["ppl"], rel_tol=1e-3), (post["fp"], base["fp"])
    assert post["rtn"]["ppl"] < base["rtn"]["ppl"], (post["rtn"], base["rtn"])
    # a rotated fine-tune keeps a W4A4 RTN perplexity of the same order as the rotated pretrained model's
    assert runs["rolora"]["rtn"]["ppl"] < 3 * post["rtn"]["ppl"], (runs["rolora"]["rtn"], post["rtn"])
    default = {s.method for s in finetune_table.planned(finetune_table.parse_args([]))}
    assert default == set(ft.DEFAULT_METHODS) and not default & set(ft.NOT_TRAINED)
