"""Every ``rolora`` subcommand over a table of bad inputs (issue 12).

Each case must end with exit status 2 and exactly one line on stderr, ``rolora <command>: error: ...``, that names
what is wrong in the words of the command line (flags such as ``--base-model`` and config keys, never Python
parameters such as ``base_model=``), with no traceback; nothing may be created or changed on disk (the whole work
folder, models, adapters and configs included, is hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from rolora_plugin.app.cli import EXIT_BAD_INPUT, main
from tests.app.fixtures import save_tiny
from tests.helpers import lora

SEED_TOO_BIG = str(2**32)


# ---------------------------------------------------------------------------------------------- fixtures


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _models(root: Path) -> None:
    tiny = save_tiny(root / "tiny")
    assert main(["-q", "rotate", str(tiny), str(root / "rotated")]) == 0
    save_tiny(root / "other-base", seed=7)  # same shapes as tiny, other weights
    save_tiny(root / "small-vocab", vocab=40)  # the character tokenizer has ~80 ids: too many for this model
    (root / "config-only").mkdir()
    shutil.copy(tiny / "config.json", root / "config-only")
    _copy(tiny, root / "truncated")
    with open(root / "truncated" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    _copy(tiny, root / "bad-tokenizer")
    (root / "bad-tokenizer" / "tokenizer.json").write_text('{"version": ')
    _copy(root / "rotated", root / "rotated-unknown-key")
    _edit_json(root / "rotated-unknown-key" / "rolora_rotation.json", surprise=1)
    (root / "a-file").write_text("not a folder")


def _adapters(root: Path) -> None:
    from transformers import AutoModelForCausalLM

    from rolora_plugin import RotationConfig, rotate_model_
    from rolora_plugin.io.export import write_rotation_record

    peft_model = lora(AutoModelForCausalLM.from_pretrained(root / "tiny"))
    record = rotate_model_(peft_model, RotationConfig(), progress=False)
    peft_model.save_pretrained(str(root / "adapter"))
    write_rotation_record(root / "adapter", record)
    _copy(root / "adapter", root / "adapter-bad-config")
    (root / "adapter-bad-config" / "adapter_config.json").write_text('{"peft_type": ')
    _copy(root / "adapter", root / "adapter-no-weights")
    (root / "adapter-no-weights" / "adapter_model.safetensors").unlink()
    _copy(root / "adapter", root / "adapter-no-record")
    (root / "adapter-no-record" / "rolora_rotation.json").unlink()
    _copy(root / "adapter", root / "adapter-unknown-key")
    _edit_json(root / "adapter-unknown-key" / "rolora_rotation.json", surprise=1)
    _copy(root / "adapter", root / "adapter-remote-base")
    _edit_json(root / "adapter-remote-base" / "adapter_config.json", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")


def _data(root: Path) -> None:
    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(8)]
    (root / "pairs.json").write_text(json.dumps(pairs))
    (root / "not-json.json").write_text('{"prompt": oops')
    (root / "short.txt").write_text("only a few words")
    for name, ids in {"float": torch.rand(4, 16), "empty": torch.zeros(0, 16, dtype=torch.long),
                      "oov": torch.full((4, 16), 500), "flat": torch.arange(16)}.items():  # fmt: skip
        torch.save(ids, root / f"calib-{name}.pt")
    torch.save({"ids": torch.arange(4)}, root / "calib-dict.pt")
    (root / "stale.checkpoints").mkdir()
    (root / "stale.checkpoints" / "rolora_train_config.json").write_text("{}")  # a killed run's checkpoints
    (root / "foreign.checkpoints").mkdir()  # the user's own folder of that name
    (root / "foreign.checkpoints" / "notes.txt").write_text("mine")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    _models(root)
    _adapters(root)
    _data(root)
    return root


def train_config(root: Path, name: str, **changes) -> str:
    cfg = {"model": str(root / "tiny"), "dataset": str(root / "pairs.json"), "output_dir": str(root / "run"),
           "max_steps": 1, "batch_size": 2, "seq_len": 64, **changes}  # fmt: skip
    path = root / f"train-{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


# ---------------------------------------------------------------------------------------------- the table

# (case id, argv with {root} placeholders or a callable root -> argv, text the message must contain)
CASES = [
    # rotate
    ("rotate/config-only", ["rotate", "{root}/config-only", "{root}/out"], "no weights"),
    ("rotate/truncated", ["rotate", "{root}/truncated", "{root}/out"], "truncated or corrupt"),
    ("rotate/bad-tokenizer", ["rotate", "{root}/bad-tokenizer", "{root}/out"], "tokenizer"),
    ("rotate/seed-too-big", ["rotate", "{root}/tiny", "{root}/out", "--seed", SEED_TOO_BIG], "--seed"),
    ("rotate/seed-not-int", ["rotate", "{root}/tiny", "{root}/out", "--seed", "abc"], "--seed"),
    ("rotate/out-under-proc", ["rotate", "{root}/tiny", "/proc/rolora-out"], "/proc"),
    ("rotate/out-under-file", ["rotate", "{root}/tiny", "{root}/a-file/out"], "is a file"),
    ("rotate/out-exists", ["rotate", "{root}/tiny", "{root}/adapter"], "already exists"),
    ("rotate/streaming-check", ["rotate", "{root}/tiny", "{root}/out", "--streaming", "--check"], "--check"),
    ("rotate/already-rotated", ["rotate", "{root}/rotated", "{root}/out"], "already rotated"),
    # eval
    ("eval/config-only", ["eval", "{root}/config-only"], "no weights"),
    ("eval/truncated", ["eval", "{root}/truncated"], "truncated or corrupt"),
    ("eval/group-size-7", ["eval", "{root}/tiny", "--w-bits", "4", "--w-group-size", "7"], "--w-group-size 7"),
    ("eval/group-size-fp", ["eval", "{root}/tiny", "--w-group-size", "32"], "--w-group-size"),
    ("eval/negative-counts", ["eval", "{root}/tiny", "--limit", "-5", "--ppl-chunks", "-3"], "--limit"),
    ("eval/negative-ppl", ["eval", "{root}/tiny", "--ppl-chunks", "-3"], "--ppl-chunks"),
    ("eval/nothing-to-do", ["eval", "{root}/tiny", "--limit", "0", "--ppl-chunks", "0"], "nothing to evaluate"),
    ("eval/bits-33", ["eval", "{root}/tiny", "--w-bits", "33", "--a-bits", "33"], "--w-bits"),
    ("eval/a-bits-1", ["eval", "{root}/tiny", "--a-bits", "1"], "--a-bits"),
    ("eval/seq-len-1", ["eval", "{root}/tiny", "--seq-len", "1"], "--seq-len"),
    ("eval/calib-chunks-0", ["eval", "{root}/tiny", "--w-bits", "4", "--method", "gptq", "--calib-chunks", "0"], "--calib-chunks"),
    ("eval/method-without-bits", ["eval", "{root}/tiny", "--method", "gptq"], "--method"),
    ("eval/tasks-without-limit", ["eval", "{root}/tiny", "--tasks", "piqa"], "--limit"),
    ("eval/limit-not-int", ["eval", "{root}/tiny", "--limit", "x"], "--limit"),
    ("eval/record-unknown-key", ["eval", "{root}/rotated-unknown-key"], "unknown key"),
    ("eval/bad-tokenizer", ["eval", "{root}/bad-tokenizer"], "tokenizer"),
    ("eval/tokenizer-beyond-vocab", ["eval", "{root}/small-vocab", "--ppl-chunks", "1", "--seq-len", "32"], "do not match"),
    ("eval/gptq-oov-calibration", ["eval", "{root}/small-vocab", "--w-bits", "4", "--method", "gptq", "--ppl-chunks",
                                   "1", "--seq-len", "32", "--calib-chunks", "1"], "do not match"),  # fmt: skip
    ("eval/json-under-file", ["eval", "{root}/tiny", "--json", "{root}/a-file/r.json"], "--json"),
    # export
    ("export/bad-adapter-config", ["export", "{root}/adapter-bad-config", "{root}/out"], "adapter_config.json"),
    ("export/no-adapter-weights", ["export", "{root}/adapter-no-weights", "{root}/out"], "no adapter weights"),
    ("export/no-record", ["export", "{root}/adapter-no-record", "{root}/out"], "rolora_rotation.json"),
    ("export/record-unknown-key", ["export", "{root}/adapter-unknown-key", "{root}/out"], "unknown key"),
    ("export/remote-base", ["export", "{root}/adapter-remote-base", "{root}/out"], "--base-model"),
    ("export/base-config-only", ["export", "{root}/adapter", "{root}/out", "--base-model", "{root}/config-only"], "no weights"),
    ("export/wrong-base", ["-q", "export", "{root}/adapter", "{root}/out", "--base-model", "{root}/other-base"], "--base-model"),
    ("export/out-under-proc", ["export", "{root}/adapter", "/proc/rolora-out"], "/proc"),
    ("export/out-exists", ["export", "{root}/adapter", "{root}/rotated"], "already exists"),
    ("export/ct-of-fp-model", ["export", "{root}/rotated", "{root}/out", "--format", "compressed-tensors"], "rolora quantize"),
    # quantize
    ("quantize/config-only", ["quantize", "{root}/config-only", "{root}/out"], "no weights"),
    ("quantize/calib-float", ["quantize", "{root}/tiny", "{root}/out", "--calibration", "{root}/calib-float.pt"], "int64"),
    ("quantize/calib-empty", ["quantize", "{root}/tiny", "{root}/out", "--calibration", "{root}/calib-empty.pt"], "non-empty"),
    ("quantize/calib-oov", ["quantize", "{root}/tiny", "{root}/out", "--calibration", "{root}/calib-oov.pt"], "do not match"),
    ("quantize/calib-1d", ["quantize", "{root}/tiny", "{root}/out", "--calibration", "{root}/calib-flat.pt"], "(batch, seq)"),
    ("quantize/calib-dict", ["quantize", "{root}/tiny", "{root}/out", "--calibration", "{root}/calib-dict.pt"], "tensor"),
    ("quantize/calib-missing", ["quantize", "{root}/tiny", "{root}/out", "--calibration", "{root}/nope.pt"], "--calibration"),
    ("quantize/calib-too-short", ["quantize", "{root}/tiny", "{root}/out", "--calibration", "{root}/short.txt"], "fewer than"),
    ("quantize/calib-chunks-0", ["quantize", "{root}/tiny", "{root}/out", "--calib-chunks", "0"], "--calib-chunks"),
    ("quantize/seed-too-big", ["quantize", "{root}/tiny", "{root}/out", "--seed", SEED_TOO_BIG], "--seed"),
    ("quantize/seed-of-rotated", ["quantize", "{root}/rotated", "{root}/out", "--seed", "3"], "--seed"),
    ("quantize/record-unknown-key", ["quantize", "{root}/rotated-unknown-key", "{root}/out"], "unknown key"),
    ("quantize/recipe", ["quantize", "{root}/tiny", "{root}/out", "--recipe", "w3a3"], "--recipe"),
    ("quantize/not-servable", ["quantize", "{root}/tiny", "{root}/out", "--recipe", "w4a4"], "--not-servable-ok"),
    # check
    ("check/missing", ["check", "{root}/no-such-dir"], "does not exist"),
    ("check/not-compressed", ["check", "{root}/tiny"], "not a compressed-tensors export"),
    ("check/chunks-0", ["check", "{root}/tiny", "--chunks", "0"], "--chunks"),
    # train
    ("train/missing-config", ["train", "{root}/no-such.yaml"], "does not exist"),
    ("train/not-json-dataset", lambda r: ["train", train_config(r, "nj", dataset=str(r / "not-json.json"))], "not valid JSON"),
    ("train/seq-len-short", lambda r: ["train", train_config(r, "sl", seq_len=3)], "seq_len"),
    ("train/seq-len-1", lambda r: ["train", train_config(r, "sl1", seq_len=1)], "seq_len"),
    ("train/unknown-target", lambda r: ["train", train_config(r, "ut", lora_targets=["foo_proj"])], "lora_targets"),
    ("train/dropout-5", lambda r: ["train", train_config(r, "do", lora_dropout=5.0)], "lora_dropout"),
    ("train/seed-too-big", lambda r: ["train", train_config(r, "sd", seed=2**32)], "seed"),
    ("train/n-examples-negative", lambda r: ["train", train_config(r, "ne", n_examples=-14)], "n_examples"),
    ("train/lr-not-a-number", lambda r: ["train", train_config(r, "lr", learning_rate="fast")], "learning_rate"),
    ("train/lr-list", lambda r: ["train", train_config(r, "ll", learning_rate=[1])], "learning_rate"),
    ("train/max-steps-0", lambda r: ["train", train_config(r, "ms"), "--max-steps", "0"], "max_steps"),
    ("train/config-only-model", lambda r: ["train", train_config(r, "co", model=str(r / "config-only"))], "no weights"),
    ("train/truncated-model", lambda r: ["train", train_config(r, "tr", model=str(r / "truncated"))], "truncated"),
    ("train/bad-tokenizer", lambda r: ["train", train_config(r, "bt", model=str(r / "bad-tokenizer"))], "tokenizer"),
    ("train/out-under-proc", lambda r: ["train", train_config(r, "op", output_dir="/proc/rolora-run")], "output_dir"),
    ("train/out-under-file", lambda r: ["train", train_config(r, "of", output_dir=str(r / "a-file" / "run"))], "is a file"),
    ("train/leftover-checkpoints", lambda r: ["train", train_config(r, "lc", output_dir=str(r / "stale"))], "--resume"),
    ("train/foreign-checkpoint-dir", lambda r: ["train", train_config(r, "fc", output_dir=str(r / "foreign")), "--resume"],
     "not made by rolora train"),  # fmt: skip
    ("train/resume-other-settings", lambda r: ["train", train_config(r, "rs", output_dir=str(r / "stale")), "--resume"],
     "other settings"),  # fmt: skip
    # demo
    ("demo/steps-0", ["demo", "--out", "{root}/demo", "--steps", "0"], "--steps"),
    ("demo/limit-negative", ["demo", "--out", "{root}/demo", "--limit", "-1"], "--limit"),
    ("demo/ppl-chunks-0", ["demo", "--out", "{root}/demo", "--ppl-chunks", "0"], "--ppl-chunks"),
    ("demo/seed-too-big", ["demo", "--out", "{root}/demo", "--seed", SEED_TOO_BIG], "--seed"),
    ("demo/out-under-file", ["demo", "--out", "{root}/a-file/demo"], "a-file"),
    ("demo/out-under-proc", ["demo", "--out", "/proc/rolora-demo"], "/proc"),
    ("demo/cache-under-file", ["demo", "--out", "{root}/demo", "--cache-dir", "{root}/a-file/cache"], "--cache-dir"),
    ("demo/size", ["demo", "--size", "huge"], "--size"),
    # assets
    ("assets/unknown-name", ["assets", "--path", "imagenet"], "--path"),
    ("assets/cache-under-file", ["assets", "--cache-dir", "{root}/a-file/cache"], "--cache-dir"),
]


def _argv(spec, root: Path) -> list[str]:
    argv = spec(root) if callable(spec) else spec
    return [a.replace("{root}", str(root)) for a in argv]


def _snapshot(root: Path) -> dict[str, str]:
    """``{relative path: content hash or 'dir'}`` of everything under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors exit from parse_args
        rc = e.code
    return rc, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("case, spec, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, spec, expected, root, capsys):
    argv = _argv(spec, root)
    before = _snapshot(root)
    rc, err = _run(argv, capsys)
    command = case.split("/")[0]
    assert rc == EXIT_BAD_INPUT, (rc, err)
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"rolora {command}: error: "), line
    assert expected in line, line
    assert "Traceback" not in line
    assert not re.search(r"\b[a-z]+_[a-z_]+=", line), f"names a Python parameter, not a flag: {line}"
    assert _snapshot(root) == before, "a failed command changed or created files"


def test_every_subcommand_has_bad_input_cases():
    from rolora_plugin.app.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(commands) == {case.split("/")[0] for case, _, _ in CASES}


def test_numeric_strings_are_accepted_for_float_fields(root):
    """YAML reads ``1e-4`` (no dot) as a string: float fields accept numeric strings."""
    from rolora_plugin.app.train import TrainConfig

    path = root / "lr-string.yaml"
    path.write_text("learning_rate: 1e-4\nlora_dropout: '0.05'\nlora_alpha: '32'\n")
    try:
        cfg = TrainConfig.from_file(path)
    finally:
        path.unlink()
    assert cfg.learning_rate == pytest.approx(1e-4) and cfg.lora_dropout == pytest.approx(0.05) and cfg.lora_alpha == 32


def test_library_parameter_names_become_flags():
    from rolora_plugin.app.cli import cli_words

    flags = {"base_model": "--base-model", "w_group_size": "--w-group-size"}
    msg = "Pass the original base with --base-model / base_model=. w_group_size=7 is bad (w_group_size=None works)"
    assert cli_words(msg, flags) == "Pass the original base with --base-model. --w-group-size 7 is bad (no --w-group-size works)"


def test_library_train_config_reader_refuses_yaml_aliases_quickly(tmp_path):
    """``TrainConfig.from_file`` (library callers, not only the CLI) uses the bounded parser: a "billion laughs"
    file is refused as a ValueError at once, never expanded."""
    import time

    from rolora_plugin.app.train import TrainConfig

    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    levels += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\nlora_targets: *i\n")
    start = time.monotonic()
    with pytest.raises(ValueError, match="alias"):
        TrainConfig.from_file(tmp_path / "bomb.yaml")
    assert time.monotonic() - start < 5
