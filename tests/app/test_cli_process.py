"""The ``rolora`` command as a real process (issue 12): races at the output path, SIGTERM/SIGKILL, resumable
training, the offline environment before any Hugging Face import, missing extras, logs around progress bars.

The races are made deterministic with two fault injections: the child process waits, right before the final
rename into place (``rolora_plugin.io.publish.publish_path``), for a "go" file from the test; a killed training run
waits right after its Trainer saved checkpoint-2 completely. Everything else is the unmodified command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rolora_plugin.app.cli import EXIT_BAD_INPUT, main
from tests.app.fixtures import save_tiny

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# argv[1]: a control folder; argv[2:]: the rolora command line
_PAUSED_MAIN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import rolora_plugin.io.publish as publish
    control, real = Path(sys.argv[1]), publish.publish_path

    def paused(staged, target, **kwargs):
        (control / ("staged-" + Path(staged).name)).touch()
        while not (control / "go").exists():
            time.sleep(0.02)
        return real(staged, target, **kwargs)

    publish.publish_path = paused
    from rolora_plugin.app.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("proc") / "tiny")


def _start(code: str, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _paused_rotate(control: Path, src: Path, out: Path, *extra) -> subprocess.Popen:
    control.mkdir(exist_ok=True)
    return _start(_PAUSED_MAIN, control, "-q", "rotate", src, out, *extra)


def _staged(control: Path) -> list[Path]:
    return list(control.glob("staged-*"))


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _last_line(stderr: str) -> str:
    lines = [line.rsplit("\r", 1)[-1].strip() for line in stderr.strip().splitlines()]
    return [line for line in lines if line][-1]


# ---------------------------------------------------------------------------------------------- item 1


def test_folder_appearing_while_rotate_stages_is_never_replaced(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = _paused_rotate(tmp_path / "control", tiny_dir, out)
    _wait_for(lambda: _staged(tmp_path / "control"), proc)
    out.mkdir()
    (out / "thesis.txt").write_text("draft")
    (tmp_path / "control" / "go").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, err
    assert _last_line(err).startswith("rolora rotate: error: ") and "appeared" in _last_line(err)
    assert [p.name for p in out.iterdir()] == ["thesis.txt"] and (out / "thesis.txt").read_text() == "draft"
    assert _leftovers(tmp_path, "out") == []


def test_two_concurrent_rotates_one_wins_one_fails_cleanly(tiny_dir, tmp_path):
    out = tmp_path / "out"
    procs = {seed: _paused_rotate(tmp_path / f"control-{seed}", tiny_dir, out, "--seed", seed) for seed in (1, 2)}
    for seed, proc in procs.items():
        _wait_for(lambda s=seed: _staged(tmp_path / f"control-{s}"), proc)
    for seed in procs:  # both have staged; let both publish
        (tmp_path / f"control-{seed}" / "go").touch()
    results = {seed: (proc.wait(timeout=120), proc.stderr.read()) for seed, proc in procs.items()}
    assert sorted(code for code, _ in results.values()) == [0, EXIT_BAD_INPUT], results
    winner = next(seed for seed, (code, _) in results.items() if code == 0)
    loser_err = next(err for code, err in results.values() if code != 0)
    assert "appeared" in _last_line(loser_err)
    assert json.loads((out / "rolora_rotation.json").read_text())["config"]["seed"] == winner
    assert _leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------------------------------------- item 7


def test_sigterm_while_staging_cleans_up_and_exits_143(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = _paused_rotate(tmp_path / "control", tiny_dir, out)
    _wait_for(lambda: _staged(tmp_path / "control"), proc)
    assert _leftovers(tmp_path, "out"), "the staging folder should exist while paused"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert _last_line(err).startswith("rolora rotate: SIGTERM: stopped")
    assert not out.exists() and _leftovers(tmp_path, "out") == []


def _train_config(tmp_path: Path, tiny_dir: Path) -> Path:
    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(16)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    cfg = {"model": str(tiny_dir), "dataset": str(tmp_path / "pairs.json"), "output_dir": str(tmp_path / "run"),
           "max_steps": 6, "batch_size": 2, "seq_len": 64, "logging_steps": 1, "save_steps": 2,
           "learning_rate": 1e-3, "warmup_steps": 1}  # fmt: skip
    path = tmp_path / "train.json"
    path.write_text(json.dumps(cfg))
    return path


def _adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


# argv[1]: a marker file; argv[2:]: the rolora command line. The second fault injection: right after the Trainer
# has saved checkpoint-2 completely, the child touches the marker and waits to be stopped, so the test's signal
# always lands at the same point (polling for files let a descheduled test kill it at step 8 or mid-checkpoint).
_KILLABLE_TRAIN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rolora_plugin.app.runtime import set_offline_environment

    set_offline_environment()  # as the CLI does, before transformers is imported
    import transformers

    marker, real = Path(sys.argv[1]), transformers.Trainer._save_checkpoint

    def save_then_wait(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.state.global_step == 2:
            marker.touch()
            time.sleep(600)

    transformers.Trainer._save_checkpoint = save_then_wait
    from rolora_plugin.app.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory) -> dict:
    """The adapter of the same run, never interrupted."""
    work = tmp_path_factory.mktemp("reference")
    cfg = _train_config(work, tiny_dir)
    assert main(["-q", "train", str(cfg)]) == 0
    assert not (work / "run.checkpoints").exists()  # removed once published
    return _adapter_weights(work / "run")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_resumes_bit_exactly(sig, tiny_dir, tmp_path, capsys, uninterrupted):
    cfg = _train_config(tmp_path, tiny_dir)
    reference = uninterrupted
    ckpts = tmp_path / "run.checkpoints"
    marker = tmp_path / "checkpoint-2-saved"
    proc = _start(_KILLABLE_TRAIN, marker, "-q", "train", cfg, "--max-steps", "400")  # stopped mid-run
    _wait_for(marker.exists, proc)
    assert (ckpts / "checkpoint-2" / "rolora_rotation.json").is_file()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 143), err
    if sig == signal.SIGTERM:
        assert "--resume" in _last_line(err) and str(ckpts) in _last_line(err)
    assert not (tmp_path / "run").exists() and _leftovers(tmp_path, "run") == []
    assert (ckpts / "checkpoint-2").is_dir() and not (ckpts / "checkpoint-4").exists()  # stopped where it waited

    capsys.readouterr()
    assert main(["-q", "train", str(cfg)]) == EXIT_BAD_INPUT  # leftovers are never silently discarded
    assert "--resume" in capsys.readouterr().err
    assert main(["-q", "train", str(cfg), "--resume"]) == 0
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["resumed_from"].startswith("checkpoint-") and log["steps"] == 6
    resumed = _adapter_weights(tmp_path / "run")
    assert resumed.keys() == reference.keys()
    assert all(resumed[k].equal(reference[k]) for k in reference), "resumed run differs from an uninterrupted one"
    assert not ckpts.exists()


# ---------------------------------------------------------------------------------------------- item 8

_RECORD_ENV_AT_IMPORT = textwrap.dedent(
    """
    import json, os, sys

    seen = {}

    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name in ("huggingface_hub", "transformers") and name not in seen:
                seen[name] = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
            return None

    sys.meta_path.insert(0, Watch())
    from rolora_plugin.app.cli import main
    rc = main(sys.argv[1:])
    print(json.dumps({"rc": rc, "seen": seen}))
    """
)


@pytest.mark.parametrize("quiet", [True, False], ids=["-q", "default"])
def test_offline_environment_is_set_before_any_hugging_face_import(quiet, tiny_dir, tmp_path):
    adapter = tmp_path / "adapter"  # adapter config and record, but the weights file is missing
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tiny_dir)}))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    argv = (["-q"] if quiet else []) + ["export", str(adapter), str(tmp_path / "out")]
    proc = _start(_RECORD_ENV_AT_IMPORT, *argv, env=env)
    out, err = proc.communicate(timeout=240)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["rc"] == EXIT_BAD_INPUT and "no adapter weights" in _last_line(err), err
    assert result["seen"], "transformers was never imported?"
    assert all(v == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} for v in result["seen"].values()), result


# ---------------------------------------------------------------------------------------------- item 9

_WITHOUT_MODULES = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from rolora_plugin.app.cli import main

    results = {}
    for blocked, argv in json.loads(sys.argv[1]):
        saved = {name: sys.modules.pop(name, None) for name in blocked}
        for name in blocked:
            sys.modules[name] = None  # what a missing package looks like to import and find_spec
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        results[" ".join(argv[:1] + blocked)] = [rc, err.getvalue()]
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module
    print(json.dumps(results))
    """
)


def test_missing_extras_are_named_with_the_install_command_before_any_work(tiny_dir, tmp_path):
    runs = [
        (["datasets"], ["eval", str(tiny_dir), "--ppl-chunks", "1", "--seq-len", "16"]),
        (["lm_eval"], ["eval", str(tiny_dir), "--limit", "2", "--ppl-chunks", "0"]),
        (["matplotlib"], ["demo", "--out", str(tmp_path / "demo"), "--size", "tiny"]),
    ]
    proc = _start(_WITHOUT_MODULES, json.dumps(runs))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    results = json.loads(out.strip().splitlines()[-1])
    for (blocked, argv), (rc, stderr) in zip(runs, results.values(), strict=True):
        lines = stderr.strip().splitlines()
        assert rc == EXIT_BAD_INPUT and len(lines) == 1, (argv, stderr)
        assert blocked[0] in lines[0] and "pip install" in lines[0], lines[0]
    assert not (tmp_path / "demo").exists()


# ---------------------------------------------------------------------------------------------- logs and bars

_LOG_DURING_BAR = textwrap.dedent(
    """
    import logging, time
    from tqdm.auto import tqdm
    from rolora_plugin.app.runtime import session, setup_logging

    setup_logging(verbose=False, quiet=False, hf=False)
    with session():
        for i in tqdm(range(3), desc="working", mininterval=0):
            if i == 1:
                logging.getLogger("rolora_plugin.test").info("halfway there")
            time.sleep(0.05)
    """
)


def test_log_lines_never_share_a_line_with_a_progress_bar():
    proc = _start(_LOG_DURING_BAR)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    segments = [seg.strip() for line in err.split("\n") for seg in line.split("\r")]
    assert "INFO rolora_plugin.test: halfway there" in segments, repr(err)
