"""What a newcomer reads (issue 35): a Hugging Face Hub id says the CLI reads local folders and how to bring the
model; an unsupported family names its class and how to register a spec; `rolora export` says what it did."""

from __future__ import annotations

import json

import pytest

from rolora_plugin.app.cli import EXIT_BAD_INPUT, main
from tests.app.fixtures import save_tiny


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", [["rotate"], ["quantize"], ["eval"]])
def test_a_hub_id_says_local_folders_only_and_how_to_download(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["-q", *command, "HuggingFaceTB/SmolLM2-135M-Instruct"] + ([] if command == ["eval"] else ["out"])
    assert main(argv) == EXIT_BAD_INPUT
    line = _one_line(capsys)
    assert "local folders only" in line and "hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir" in line
    assert not (tmp_path / "out").exists()


def test_a_missing_local_path_is_not_called_a_hub_id(tmp_path, capsys):
    assert main(["-q", "rotate", str(tmp_path / "nope"), str(tmp_path / "out")]) == EXIT_BAD_INPUT
    line = _one_line(capsys)
    assert "does not exist" in line and "Hub" not in line


def test_unsupported_family_names_its_class_and_how_to_register(tmp_path, capsys):
    folder = save_tiny(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["-q", "rotate", str(folder), str(tmp_path / "out")]) == EXIT_BAD_INPUT
    line = _one_line(capsys)
    assert "'gpt2' (GPT2LMHeadModel)" in line and "rolora_register_architectures" in line and "ArchitectureSpec" in line


def test_export_says_whether_it_merged(tmp_path, capsys):
    folder = save_tiny(tmp_path / "m")
    assert main(["-q", "rotate", str(folder), str(tmp_path / "rot")]) == 0
    capsys.readouterr()
    assert main(["-q", "export", str(tmp_path / "rot"), str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "re-exported (no adapter to merge)" in out and "merged" not in out.replace("re-exported", "")
