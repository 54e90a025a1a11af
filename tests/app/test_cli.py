"""The ``rolora`` command on tiny saved models: --help everywhere, rotate/eval/export/train, and bad input.

Bad input must end with exit status 2, one line on stderr, and nothing written next to the output path.
Also the activation statistics helper the demo uses (:mod:`rolora_plugin.lora.kurtosis`) and its plots (:mod:`rolora_plugin.app.plots`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rolora_plugin.app.cli import EXIT_BAD_INPUT, build_parser, main
from rolora_plugin.lora.kurtosis import activation_stats, kurtosis_from_power_sums, kurtosis_ref, layer_index
from rolora_plugin.io.publish import atomic_output_dir
from tests.app.fixtures import save_tiny
from tests.helpers import logits, random_ids, rel_err, tiny_model

SUBCOMMANDS = ("demo", "rotate", "eval", "export", "quantize", "check", "train", "assets")
FP32_REL = 1e-5  # relative logit tolerance of an exact rotation in float32 (stock RMSNorm computes in float32)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_dir(work) -> Path:
    return save_tiny(work / "tiny")


@pytest.fixture(scope="module")
def rotated_dir(work, tiny_dir) -> Path:
    out = work / "tiny-rotated"
    assert main(["-q", "rotate", str(tiny_dir), str(out), "--r2", "--seed", "3"]) == 0
    return out


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def run_bad(capsys, argv: list[str], watch: Path) -> str:
    """Run ``main(argv)``; assert exit 2, a single stderr line, and that ``watch`` gained no entries."""
    before = listing(watch)
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()  # progress bars may precede the message
    err = [line.rsplit("\x1b[A", 1)[-1].strip() for line in err]  # tqdm's cursor-up after clearing a bar
    assert rc == EXIT_BAD_INPUT
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert err[-1].startswith(f"rolora {argv[1] if argv[0] == '-q' else argv[0]}: error: "), err
    assert listing(watch) == before, "a failed command left files behind"
    return err[-1]


# ---------------------------------------------------------------------------------------------- --help


@pytest.mark.parametrize("command", (None,) + SUBCOMMANDS)
def test_help(command, capsys):
    argv = [command, "--help"] if command else ["--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert out.startswith(f"usage: rolora {command or ''}".rstrip())


def test_parser_lists_every_subcommand(capsys):
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(choices) == set(SUBCOMMANDS)
    parser.print_help()
    out = capsys.readouterr().out
    assert all(f"    {name} " in out for name in SUBCOMMANDS)


def test_console_script_help():
    exe = shutil.which("rolora")
    cmd = [exe] if exe else [sys.executable, "-m", "rolora_plugin.app.cli"]
    proc = subprocess.run(cmd + ["rotate", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "MODEL_DIR" in proc.stdout and "--r2" in proc.stdout


def test_missing_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------- rotate


def test_rotate_keeps_function_and_writes_record(tiny_dir, rotated_dir):
    from transformers import AutoModelForCausalLM

    from rolora_plugin.io.export import load_rotated

    assert {"config.json", "model.safetensors", "rolora_rotation.json", "tokenizer.json"} <= set(listing(rotated_dir))
    record = json.loads((rotated_dir / "rolora_rotation.json").read_text())
    assert record["config"]["seed"] == 3 and set(record["rotations"]) == {"r1", "r2", "r4"}
    ids = random_ids()
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    rotated = load_rotated(rotated_dir)
    assert rel_err(logits(rotated, ids), logits(ref, ids)) < FP32_REL
    plain = AutoModelForCausalLM.from_pretrained(rotated_dir).eval()  # no online R4: a different function
    assert rel_err(logits(plain, ids), logits(ref, ids)) > 1e-3


def test_rotate_flags_select_rotations(tiny_dir, work):
    out = work / "r1r3"
    assert main(["-q", "rotate", str(tiny_dir), str(out), "--r3", "--no-r4"]) == 0
    record = json.loads((out / "rolora_rotation.json").read_text())
    assert set(record["rotations"]) == {"r1", "r3"}


def test_rotate_check_prints_small_logit_difference(tiny_dir, work, capsys):
    assert main(["-q", "rotate", str(tiny_dir), str(work / "checked"), "--check"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("exactness"))
    diff, peak = float(line.split("= ")[1].split()[0]), float(line.split("up to ")[1].split(";")[0])
    assert diff < FP32_REL * peak and line.endswith(": exact (the same function up to float rounding)")


def test_rotate_check_refuses_to_publish_a_rotation_that_is_not_exact(tiny_dir, work, capsys, monkeypatch):
    """The verdict is computed: a rotation that changed the function (here: one weight perturbed after rotating)
    fails the check in one line, and nothing is written."""
    import rolora_plugin

    real = rolora_plugin.rotate_model_

    def broken(model, config, **kw):
        record = real(model, config, **kw)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] += 10.0
        return record

    monkeypatch.setattr(rolora_plugin, "rotate_model_", broken)
    assert main(["-q", "rotate", str(tiny_dir), str(work / "not-exact"), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NOT exact" in err[0] and not (work / "not-exact").exists()


def test_interrupted_write_leaves_nothing(tiny_dir, work, monkeypatch):
    from transformers import PreTrainedModel

    def broken_save(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(path, "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    before = listing(work)
    with pytest.raises(OSError, match="disk full"):
        main(["-q", "rotate", str(tiny_dir), str(work / "broken")])
    assert listing(work) == before


def test_atomic_output_dir_publishes_only_on_success(tmp_path):
    with atomic_output_dir(tmp_path / "ok") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "ok" / "f").read_text() == "x"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "failed") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("boom")
    assert listing(tmp_path) == ["ok"]


# ---------------------------------------------------------------------------------------------- eval


def eval_json(argv: list[str], path: Path) -> dict:
    assert main(["-q", "eval", *argv, "--ppl-chunks", "2", "--seq-len", "48", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_eval_fp_rotated_and_quantized(tiny_dir, rotated_dir, work, capsys):
    fp = eval_json([str(tiny_dir)], work / "fp.json")
    rot = eval_json([str(rotated_dir)], work / "rot.json")
    w4 = eval_json([str(tiny_dir), "--w-bits", "4", "--a-bits", "4"], work / "w4.json")
    assert fp["setting"] == "FP" and w4["setting"] == "W4A4" and w4["method"] == "rtn"
    assert 1 < fp["perplexity"] < 1e4
    assert abs(rot["perplexity"] - fp["perplexity"]) < 1e-4 * fp["perplexity"]  # online rotations rebuilt on load
    assert w4["perplexity"] != pytest.approx(fp["perplexity"], rel=1e-3)
    assert w4["fp_perplexity"] == pytest.approx(fp["perplexity"], rel=1e-6) and "fp_perplexity" not in fp  # FP reference
    assert fp["text"] == w4["text"] and fp["text"]["chunks"] == 2 and fp["text"]["seq_len"] == 48 and fp["text"]["tokens"] == 96
    out = capsys.readouterr().out
    assert "2 chunks x 48 tokens = 96 tokens" in out and "x the same model in full precision" in out


def test_eval_zero_shot_tasks_offline(rotated_dir, work):
    res = eval_json([str(rotated_dir), "--tasks", "piqa", "arc_easy", "--limit", "3"], work / "tasks.json")
    scores = res["tasks"]["scores"]
    assert set(scores) == {"piqa", "arc_easy"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert res["tasks"]["average"] == pytest.approx(sum(scores.values()) / 2)


# ---------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def adapter_dir(work, rotated_dir) -> tuple[Path, torch.Tensor]:
    """A LoRA adapter (non-zero B) on the rotated tiny model, saved with its rotation record; and its logits."""
    from peft import LoraConfig, get_peft_model

    from rolora_plugin.io.export import load_rotated, write_rotation_record
    from rolora_plugin.rotate.rotation import get_rotation_record

    base = load_rotated(rotated_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    path = work / "adapter"
    peft_model.save_pretrained(path)
    write_rotation_record(path, get_rotation_record(base))
    return path, logits(peft_model.eval(), random_ids())


def test_export_merges_adapter(adapter_dir, rotated_dir, work):
    from rolora_plugin.io.export import load_rotated

    path, expected = adapter_dir
    out = work / "merged"
    assert main(["-q", "export", str(path), str(out), "--base-model", str(rotated_dir)]) == 0
    assert rel_err(logits(load_rotated(out), random_ids()), expected) < FP32_REL


def test_export_refuses_mismatched_record(adapter_dir, tiny_dir, work, capsys):
    path, _ = adapter_dir
    bad = work / "adapter-bad-record"
    shutil.copytree(path, bad)
    record = json.loads((bad / "rolora_rotation.json").read_text())
    record["rotations"]["r1"]["checksum"] = "0" * len(str(record["rotations"]["r1"]["checksum"]))
    (bad / "rolora_rotation.json").write_text(json.dumps(record))
    msg = run_bad(capsys, ["export", str(bad), str(work / "never"), "--base-model", str(tiny_dir)], work)
    assert "rotation" in msg


# ---------------------------------------------------------------------------------------------- train


def test_train_from_yaml(tiny_dir, work, capsys):
    from rolora_plugin.io.export import load_rotated

    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(8)]
    (work / "pairs.json").write_text(json.dumps(pairs))
    cfg = {"model": str(tiny_dir), "dataset": str(work / "pairs.json"), "output_dir": str(work / "run"), "max_steps": 3,
           "batch_size": 2, "seq_len": 64, "logging_steps": 1, "learning_rate": 1e-3, "rotation": {"r2": True}}  # fmt: skip
    (work / "train.yaml").write_text(json.dumps(cfg))
    assert main(["-q", "train", str(work / "train.yaml")]) == 0
    run = work / "run"
    assert {"adapter", "merged", "train_log.json"} <= set(listing(run))
    assert (run / "adapter" / "rolora_rotation.json").is_file()
    log = json.loads((run / "train_log.json").read_text())
    losses = [row["loss"] for row in log["log_history"] if "loss" in row]
    assert log["steps"] == 3 and len(losses) == 3 and all(0 < v < 20 for v in losses)
    merged = load_rotated(run / "merged")
    assert merged.config.rolora["config"]["r2"] is True
    assert "trained" in capsys.readouterr().out


def test_example_train_config_is_valid():
    from rolora_plugin.app.train import TrainConfig

    cfg = TrainConfig.from_file(Path(__file__).parents[2] / "examples" / "train_config.yaml")
    assert cfg.rotate and cfg.dataset in ("sciq", "gsm8k")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_models(work) -> dict[str, Path]:
    """Checkpoints the CLI must refuse, each saved for real."""
    import transformers as tf

    root = work / "bad"
    root.mkdir()
    vit = tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=8, patch_size=4)
    tf.ViTModel(vit).save_pretrained(root / "vit")
    tf.LlamaModel(tiny_model("llama").config).save_pretrained(root / "no-lm-head")
    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=101)).save_pretrained(root / "gpt2")
    (root / "empty").mkdir()
    (root / "a-file").write_text("not a model")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text("{not json")
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("missing", "does not exist"),
        ("a-file", "is not a directory"),
        ("empty", "has no config.json"),
        ("corrupt", "cannot read the model config"),
        ("vit", "not a causal LM"),
        ("no-lm-head", "not a causal LM"),
        ("gpt2", "unsupported model family 'gpt2'"),
    ],
)
def test_rotate_refuses_bad_model_dirs(name, expected, bad_models, work, capsys):
    src = bad_models.get(name, work / "bad" / name)
    msg = run_bad(capsys, ["rotate", str(src), str(work / "out-never")], work)
    assert expected in msg


@pytest.mark.parametrize("name, expected", [("missing", "does not exist"), ("vit", "not a causal LM"), ("empty", "config.json")])
def test_eval_refuses_bad_model_dirs(name, expected, bad_models, work, capsys):
    src = bad_models.get(name, work / "bad" / name)
    assert expected in run_bad(capsys, ["eval", str(src)], work)


def test_rotate_refuses_existing_output_dir(tiny_dir, work, capsys):
    existing = work / "existing"
    existing.mkdir(exist_ok=True)
    (existing / "keep.txt").write_text("mine")
    assert "already exists" in run_bad(capsys, ["rotate", str(tiny_dir), str(existing)], work)
    assert listing(existing) == ["keep.txt"]


def test_rotate_refuses_all_rotations_off(tiny_dir, work, capsys):
    assert "every rotation is off" in run_bad(capsys, ["rotate", str(tiny_dir), str(work / "never"), "--no-r1", "--no-r4"], work)


def test_rotate_refuses_rotated_model(rotated_dir, work, capsys):
    assert "already rotated" in run_bad(capsys, ["rotate", str(rotated_dir), str(work / "twice")], work)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any directory")
def test_rotate_refuses_unreadable_dir(tiny_dir, work, capsys):
    locked = work / "locked"
    shutil.copytree(tiny_dir, locked)
    locked.chmod(0)
    try:
        assert "not readable" in run_bad(capsys, ["rotate", str(locked), str(work / "never")], work)
    finally:
        locked.chmod(0o755)


def test_eval_refuses_bad_bits_and_unknown_tasks(tiny_dir, work, capsys):
    assert "w_bits" in run_bad(capsys, ["eval", str(tiny_dir), "--w-bits", "1"], work)
    assert "unknown task(s) ['mmlu']" in run_bad(capsys, ["eval", str(tiny_dir), "--tasks", "piqa", "mmlu", "--limit", "2"], work)


@pytest.mark.parametrize(
    "case, expected",
    [("missing-source", "does not exist"), ("out-exists", "already exists"), ("not-a-model", "neither a peft adapter")],
)
def test_export_bad_input(case, expected, adapter_dir, bad_models, work, capsys):
    src = {"missing-source": work / "no-adapter", "out-exists": adapter_dir[0], "not-a-model": bad_models["empty"]}[case]
    out = work / ("existing-out" if case == "out-exists" else "never")
    if case == "out-exists":
        out.mkdir(exist_ok=True)
    assert expected in run_bad(capsys, ["export", str(src), str(out)], work)


def test_export_refuses_adapter_without_record(adapter_dir, rotated_dir, work, capsys):
    bare = work / "adapter-no-record"
    shutil.copytree(adapter_dir[0], bare)
    (bare / "rolora_rotation.json").unlink()
    msg = run_bad(capsys, ["export", str(bare), str(work / "never"), "--base-model", str(rotated_dir)], work)
    assert "rolora_rotation.json" in msg


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("unknown-key", "unknown field(s) ['lora_rank']"),
        ("not-a-mapping", "must hold a mapping"),
        ("bad-model", "not a causal LM"),
        ("unsupported-family", "unsupported model family"),
        ("bad-dataset", "neither 'sciq'"),
        ("out-exists", "already exists"),
    ],
)
def test_train_bad_input(case, expected, tiny_dir, bad_models, work, capsys):
    cfg = {"model": str(tiny_dir), "dataset": "sciq", "output_dir": str(work / "never"), "max_steps": 1}
    cfg.update({"unknown-key": {"lora_rank": 4}, "bad-model": {"model": str(bad_models["vit"])},
                "unsupported-family": {"model": str(bad_models["gpt2"])}, "bad-dataset": {"dataset": "alpaca"},
                "out-exists": {"output_dir": str(work)}}.get(case, {}))  # fmt: skip
    path = work / f"train-{case}.yaml"
    path.write_text("- just\n- a list\n" if case == "not-a-mapping" else json.dumps(cfg))
    argv = ["train", str(work / "no-such.yaml") if case == "missing" else str(path)]
    try:
        assert expected in run_bad(capsys, argv, work)
    finally:
        path.unlink()


def test_demo_refuses_non_empty_out_and_bad_sizes(work, capsys):
    full = work / "demo-out"
    full.mkdir(exist_ok=True)
    (full / "keep.txt").write_text("mine")
    assert "not empty" in run_bad(capsys, ["demo", "--out", str(full)], work)
    assert "train_steps" in run_bad(capsys, ["demo", "--out", str(work / "d2"), "--steps", "0"], work)
    assert listing(full) == ["keep.txt"]


# ---------------------------------------------------------------------------------------------- kurtosis


@pytest.mark.parametrize("dist", ["normal", "student_t", "outlier_channels"])
def test_activation_stats_match_float64_reference(dist):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(24, 5)
    xs = [torch.randn(3, 7, 24, generator=g) for _ in range(3)]
    if dist == "student_t":
        xs = [torch.distributions.StudentT(5.0).sample((3, 7, 24)) for _ in range(3)]
    elif dist == "outlier_channels":
        for x in xs:
            x[..., 2] *= 40.0
    model = torch.nn.Sequential(lin)
    stats = activation_stats(model, [{"input": x} for x in xs], exclude=(), progress=False)["0"]
    allx = torch.cat([x.reshape(-1, 24) for x in xs])
    assert stats["kurtosis"] == pytest.approx(kurtosis_ref(allx), rel=1e-9)
    assert stats["numel"] == allx.numel()
    torch.testing.assert_close(stats["channel_max_abs"], allx.abs().amax(0))
    assert stats["max_abs"] == pytest.approx(allx.abs().max().item())


def test_kurtosis_power_sums_against_reference():
    g = torch.Generator().manual_seed(1)
    x = 3.0 + torch.randn(10_000, generator=g, dtype=torch.float64) ** 3
    s = [float((x**k).sum()) for k in (1, 2, 3, 4)]
    assert kurtosis_from_power_sums(x.numel(), *s) == pytest.approx(kurtosis_ref(x), rel=1e-8)
    assert kurtosis_from_power_sums(4, 8.0, 16.0, 32.0, 64.0) != kurtosis_from_power_sums(4, 8.0, 16.0, 32.0, 64.0)  # nan


def test_rotation_lowers_kurtosis_of_a_tiny_model_with_outliers():
    from rolora_plugin import RotationConfig, rotate_model_

    model = tiny_model("llama", hidden=64, intermediate=128)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30.0  # an outlier channel in the residual stream
    ids = random_ids(batch=4, seq=32)
    before = activation_stats(model, [ids], progress=False)
    rotate_model_(model, RotationConfig(seed=0), progress=False)
    after = activation_stats(model, [ids], progress=False)
    q = "model.layers.0.self_attn.q_proj"
    assert set(before) == set(after) and layer_index(q) == 0
    assert after[q]["kurtosis"] < before[q]["kurtosis"] / 3


def test_summaries_and_plots_from_activation_stats(tmp_path):
    from rolora_plugin import RotationConfig, rotate_model_
    from rolora_plugin.app.plots import plot_channel_magnitudes, plot_kurtosis_per_layer
    from rolora_plugin.lora.kurtosis import summarize_by_kind

    model = tiny_model("llama", layers=3)
    ids = random_ids(batch=2, seq=24)
    before = activation_stats(model, [ids], progress=False)
    rotate_model_(model, RotationConfig(seed=0), progress=False)
    after = activation_stats(model, [ids], progress=False)
    summary = summarize_by_kind(before, after)
    assert set(summary) == {"q_proj", "o_proj", "gate_proj", "down_proj"}
    downs = [s["kurtosis"] for n, s in after.items() if n.endswith("down_proj")]
    assert len(downs) == 3 and summary["down_proj"]["after"]["kurtosis_mean"] == pytest.approx(sum(downs) / 3)
    for plot, name in ((plot_kurtosis_per_layer, "k.png"), (plot_channel_magnitudes, "m.png")):
        assert plot(tmp_path / name, before, after).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.png", "m.png"]  # no temp files left


def test_outputs_get_ordinary_permissions(tmp_path, tiny_dir):
    """Published dirs and records honour the umask (not mkstemp/mkdtemp's private 0600/0700)."""
    import os

    old = os.umask(0o022)
    try:
        assert main(["-q", "rotate", str(tiny_dir), str(tmp_path / "rot")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "rot").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "rot" / "rolora_rotation.json").stat().st_mode & 0o777 == 0o644


def test_default_outputs_are_git_ignored():
    """``rolora demo`` / ``rolora train`` run from a clone write their default folders inside it: git ignores them."""
    from rolora_plugin.app.train import TrainConfig

    repo = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs a git checkout")
    default_out = next(a for a in build_parser()._actions if a.dest == "command").choices["demo"].get_default("out")
    example = TrainConfig.from_file(repo / "examples" / "train_config.yaml").output_dir
    for folder in (default_out, TrainConfig().output_dir, example):
        proc = subprocess.run(["git", "check-ignore", "-q", f"{folder}/results.json"], cwd=repo)
        assert proc.returncode == 0, f"{folder}/ is not in .gitignore"
