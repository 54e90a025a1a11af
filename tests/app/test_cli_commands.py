"""New behaviour of the ``rolora`` subcommands (issues 12 and 18), in process on tiny saved models.

Training: never NaN in ``train_log.json`` (strict JSON) and a smoothed final loss, no staging path in the logs,
checkpoints removed once published, a diverged run refused, ``--resume`` with nothing to resume. Output noise:
peft's FutureWarning and lm-eval's known messages filtered narrowly, git's "fatal" line gone. ``rolora assets``.
``rotate --streaming`` = the in-memory bits. ``rolora quantize`` / ``export --format compressed-tensors`` / eval of
a quantized checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch

from rolora_plugin.app.cli import EXIT_BAD_INPUT, build_parser, main
from tests.app.fixtures import save_tiny


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("commands")


@pytest.fixture(scope="module")
def tiny_dir(work) -> Path:
    return save_tiny(work / "tiny")


@pytest.fixture(scope="module")
def rotated_dir(work, tiny_dir) -> Path:
    assert main(["-q", "rotate", str(tiny_dir), str(work / "rotated")]) == 0
    return work / "rotated"


def write_train_config(work: Path, tiny_dir: Path, name: str, **changes) -> Path:
    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(8)]
    (work / "pairs.json").write_text(json.dumps(pairs))
    cfg = {"model": str(tiny_dir), "dataset": str(work / "pairs.json"), "output_dir": str(work / name),
           "batch_size": 2, "seq_len": 64, "save_steps": 2, **changes}  # fmt: skip
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------- train


def test_train_reports_a_finite_loss_logs_no_staging_path_and_no_known_warning(work, tiny_dir, capsys, caplog):
    """4 steps with logging every 5: no per-step loss is logged; the run's mean loss is reported, never NaN."""
    cfg = write_train_config(work, tiny_dir, "short", max_steps=4, logging_steps=5)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    log = _strict_json((work / "short" / "train_log.json").read_text())
    assert math.isfinite(log["final_loss"]) and log["final_loss_steps"] == [1, 4]
    assert log["final_loss"] == pytest.approx(log["log_history"][-1]["train_loss"])
    assert "nan" not in out.lower() and f"{log['final_loss']:.4f}" in out and "8 examples" in out
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if ".tmp-" in m], messages
    assert any(m.startswith(f"published {work / 'short'}") for m in messages), messages
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert not (work / "short.checkpoints").exists()


def test_smoothed_loss_is_the_mean_of_the_last_quarter():
    from rolora_plugin.app.train import smoothed_loss

    history = [{"step": s, "loss": float(s)} for s in range(1, 9)] + [{"step": 8, "train_loss": 4.5}]
    assert smoothed_loss(history) == (7.5, [7, 8])
    assert smoothed_loss([{"step": 3, "loss": float("nan")}, {"step": 3, "train_loss": 2.0}]) == (2.0, [1, 3])
    assert smoothed_loss([]) == (None, None)


def test_a_diverged_run_is_not_published(work, tiny_dir, capsys):
    cfg = write_train_config(work, tiny_dir, "diverged", max_steps=3, learning_rate=1e38, warmup_steps=0, save_steps=0)
    assert main(["-q", "train", str(cfg)]) == EXIT_BAD_INPUT
    assert "training diverged" in capsys.readouterr().err
    assert not (work / "diverged").exists()


def test_resume_without_checkpoints_starts_at_step_zero(work, tiny_dir, caplog):
    cfg = write_train_config(work, tiny_dir, "fresh", max_steps=2, logging_steps=1)
    with caplog.at_level(logging.INFO):
        assert main(["train", str(cfg), "--resume"]) == 0
    assert any("starting at step 0" in r.getMessage() for r in caplog.records)
    assert json.loads((work / "fresh" / "train_log.json").read_text())["resumed_from"] is None


# ---------------------------------------------------------------------------------------------- noise


def test_known_noise_filters_are_narrow():
    from rolora_plugin.app.runtime import filter_known_noise

    filter_known_noise()
    deepspeed = logging.getLogger("DeepSpeed")
    kept = [f.filter(logging.LogRecord("DeepSpeed", logging.WARNING, "x", 1, msg, None, None)) for f in deepspeed.filters
            for msg in ("Setting accelerator to CPU. If you have GPU ...", "something else")]  # fmt: skip
    assert kept == [False, True]
    message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    with warnings.catch_warnings(record=True) as caught:
        filter_known_noise()  # after catch_warnings reset the filters
        warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit(message, FutureWarning, "other.py", 1, module="mylib.other")
        warnings.warn_explicit("another deprecation", FutureWarning, "modeling_utils.py", 2, module="transformers.modeling_utils")
    assert [(str(w.message), w.filename) for w in caught] == [(message, "other.py"), ("another deprecation", "modeling_utils.py")]


def test_eval_drops_lm_eval_noise_and_git_fatal_but_keeps_other_messages(rotated_dir, tmp_path, monkeypatch, capfd, caplog):
    from rolora_plugin.app.evaluate import _LM_EVAL_NOISE
    from rolora_plugin.app.runtime import filtered_logs

    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's `git describe` would print "fatal: ..."
    with caplog.at_level(logging.INFO):
        assert main(["-q", "eval", str(rotated_dir), "--tasks", "piqa", "--limit", "2", "--ppl-chunks", "0"]) == 0
        with filtered_logs(_LM_EVAL_NOISE):
            logging.getLogger("lm_eval.evaluator").warning("a message nobody filtered")
    assert "fatal: not a git repository" not in capfd.readouterr().err
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")]
    assert "a message nobody filtered" in messages
    noisy = ("`pretrained` model kwarg", "Passed an already-initialized", "Custom kwargs can be passed", "Overwriting default num_fewshot")
    assert not [m for m in messages if any(n in m for n in noisy)], messages


# ---------------------------------------------------------------------------------------------- assets


def test_assets_lists_the_cache_and_data_and_prints_single_paths(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["assets", "--cache-dir", str(cache)]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert rows["cache"].startswith(str(cache)) and rows["model"].startswith(str(cache / "smollm2-135m-instruct"))
    assert "not built yet" in rows["model"] and {"boolq", "piqa", "sciq", "gsm8k", "gguf"} <= set(rows)
    assert not cache.exists()  # listing creates nothing
    assert main(["assets", "--cache-dir", str(cache), "--path", "cache"]) == 0
    assert capsys.readouterr().out.strip() == str(cache)


@pytest.mark.parametrize("command", ["assets", "demo"])
def test_cache_dir_help_shows_its_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside a path
    assert "$ROLORA_CACHE" in text and "~/.cache/rolora-plugin" in text


def test_train_help_documents_resume_and_checkpoints():
    parser = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    text = " ".join(parser.format_help().split())
    assert "--resume" in text and "<output_dir>.checkpoints" in text


# ---------------------------------------------------------------------------------------------- rotate / quantize


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_rotate_streaming_writes_the_same_bits_as_in_memory(work, tiny_dir, rotated_dir):
    out = work / "rotated-streaming"
    assert main(["-q", "rotate", str(tiny_dir), str(out), "--streaming"]) == 0
    a, b = _tensors(rotated_dir), _tensors(out)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    record = json.loads((out / "rolora_rotation.json").read_text())
    assert record == json.loads((rotated_dir / "rolora_rotation.json").read_text())
    assert (out / "tokenizer.json").is_file()


def test_quantize_exports_compressed_tensors_that_eval_labels_by_their_record(work, tiny_dir, capsys):
    calib = work / "calib.pt"
    torch.save(torch.randint(3, 80, (4, 32), generator=torch.Generator().manual_seed(0)), calib)
    out = work / "w4a4"
    assert main(["-q", "quantize", str(tiny_dir), str(out), "--calibration", str(calib)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["rolora_quant"]["config"]["method"] == "gptq"
    rotations = config["rolora"]["rotations"]  # default rotation preset w4a4: R1, R2 learned on the calibration data
    assert {k for k, v in rotations.items() if v.get("learned")} == {"r1", "r2"} and "r4" in rotations
    assert (out / "rolora" / "learned_rotations.safetensors").is_file() and not list(out.glob("rolora*.safetensors"))
    capsys.readouterr()
    assert main(["-q", "eval", str(out), "--ppl-chunks", "1", "--seq-len", "32", "--json", str(work / "q.json")]) == 0
    evaluated = json.loads((work / "q.json").read_text())
    assert evaluated["setting"] == "W4A4" and evaluated["servable"] == "yes: vLLM CompressedTensorsWNA4Int"
    research = work / "research"
    assert main(["-q", "quantize", str(tiny_dir), str(research), "--calibration", str(calib), "--recipe", "w4a4"]) == EXIT_BAD_INPUT
    assert "--not-servable-ok" in capsys.readouterr().err and not research.exists()
    assert main(["-q", "quantize", str(tiny_dir), str(research), "--calibration", str(calib), "--recipe", "w4a4",
                 "--rotation", "w4a4-hadamard", "--not-servable-ok"]) == 0  # fmt: skip
    assert main(["-q", "eval", str(research), "--ppl-chunks", "1", "--seq-len", "32", "--json", str(work / "r.json")]) == 0
    assert json.loads((work / "r.json").read_text())["servable"].startswith("NO (research recipe): asymmetric")
    assert main(["-q", "export", str(research), str(work / "re"), "--format", "compressed-tensors"]) == EXIT_BAD_INPUT
    assert main(["-q", "export", str(research), str(work / "re"), "--format", "compressed-tensors", "--not-servable-ok"]) == 0
    assert main(["-q", "eval", str(out), "--w-bits", "4", "--ppl-chunks", "1"]) == EXIT_BAD_INPUT
    assert "quantized already" in capsys.readouterr().err
    again = work / "w4a4-again"
    assert main(["-q", "export", str(out), str(again), "--format", "compressed-tensors"]) == 0
    a, b = _tensors(out), _tensors(again)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_quantize_rotation_preset_without_learning_needs_no_calibration_and_rotated_sources_refuse_it(work, tiny_dir, rotated_dir, capsys):
    out = work / "w8a8-hadamard"
    assert main(["-q", "quantize", str(tiny_dir), str(out), "--recipe", "w8a8", "--rotation", "w4a4-hadamard",
                 "--calibration", "none-needed"]) == 0  # fmt: skip
    rotations = json.loads((out / "config.json").read_text())["rolora"]["rotations"]
    assert set(rotations) == {"r1", "r2", "r4"} and not any(v.get("learned") for v in rotations.values())
    capsys.readouterr()
    assert main(["-q", "quantize", str(rotated_dir), str(work / "x"), "--rotation", "w4a4"]) == EXIT_BAD_INPUT
    assert "drop --rotation" in capsys.readouterr().err
    assert not (work / "x").exists()


def test_quantize_w8a8_needs_no_calibration(work, rotated_dir):
    out = work / "w8a8"
    assert main(["-q", "quantize", str(rotated_dir), str(out), "--recipe", "w8a8", "--calibration", "none-needed"]) == 0
    assert json.loads((out / "config.json").read_text())["rolora_quant"]["config"]["w_bits"] == 8
