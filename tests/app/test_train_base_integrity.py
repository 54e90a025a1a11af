"""``rolora train`` loads its base model through the one checked loader (issue 31): a base checkpoint missing a
tensor, or carrying one the model does not have, is refused in one line before training, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.app.fixtures import save_tiny


def _tamper(folder: Path, how: str) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    if how == "missing tensor":
        tensors.pop(next(k for k in tensors if k.endswith("mlp.down_proj.weight")))
    else:  # an extra tensor the config does not explain
        tensors["model.layers.9.mlp.down_proj.weight"] = next(iter(tensors.values())).clone()
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("how", ["missing tensor", "unexpected tensor"])
def test_train_refuses_an_incomplete_base_before_training(how, tmp_path, capsys):
    from rolora_plugin.app.cli import EXIT_BAD_INPUT, main

    base = save_tiny(tmp_path / "tiny")
    _tamper(base, how)
    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(4)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    cfg = {"model": str(base), "dataset": str(tmp_path / "pairs.json"), "output_dir": str(tmp_path / "out"),
           "max_steps": 1, "batch_size": 2, "seq_len": 64, "save_steps": 0}  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(cfg))
    capsys.readouterr()  # the fixture's save_pretrained bars
    code = main(["-q", "train", str(tmp_path / "train.json")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_BAD_INPUT and len(lines) == 1 and "Traceback" not in err, err
    named = "layers.0.mlp.down_proj.weight" if how == "missing tensor" else "layers.9.mlp.down_proj.weight"
    assert named in lines[0] and "nothing was written" in lines[0], lines[0]  # names the tensor
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()
