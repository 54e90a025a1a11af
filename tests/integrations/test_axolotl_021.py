"""Axolotl 0.21 (the latest release) end to end, on Python 3.12, in its own venv (``.ci/axolotl_env.sh 0.21``).

Marked ``axolotl`` (run by ``.ci/run``). Offline, CPU, fp32: the tiny local Llama and JSONL dataset of
``examples/axolotl/make_tiny_assets.py`` and variants of ``examples/axolotl/rolora.yml``:

* ``entry`` — no ``plugins:`` line: Axolotl finds the plugin through the ``axolotl.plugins`` entry point; the
  ``rolora:`` section switches it on, with RoLoRA's QAT (int W4A4 from step 1) on LoRA, checkpoints every 2 steps.
* ``explicit`` — ``plugins: [rolora.RoLoRAPlugin]`` as well (two registrations: the second stays inactive),
  resumed from ``entry``'s ``checkpoint-2``: must end where ``entry`` ended.
* ``inactive`` — neither a ``plugins:`` line nor a ``rolora:`` section: the plugin is loaded but does nothing.
* ``axolotl merge-lora`` on ``entry``'s output: ``post_lora_merge`` replaces Axolotl's merge (adapter added to
  the unrotated base) by the merge in the rotated basis.
* ``tests/integrations/test_trl.py`` run inside the venv: TRL ``SFTTrainer`` on Axolotl 0.21's stack (trl 1.14.1).

Each merged export is compared with the rotated base + the saved adapter, loaded here (fp32 rel <= 1e-5). A venv
that cannot be built fails the tests (no skip).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from tests.helpers import rel_err

from rolora_plugin import RotationConfig

pytestmark = pytest.mark.axolotl

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "axolotl" / "rolora.yml"
FLOAT32_MERGE_RTOL = 1e-5
ROTATION = RotationConfig(seed=7, r2=True)  # as in rolora.yml
PINS = {"axolotl": "0.21.0", "transformers": "5.20.1", "peft": "0.21.2", "trl": "1.14.1"}


@pytest.fixture(scope="module")
def venv() -> Path:
    """The Axolotl 0.21 venv (Python 3.12) from .ci/axolotl_env.sh (cold build ~13 min, 6.9 GB; then seconds)."""
    proc = subprocess.run(["bash", str(REPO / ".ci" / "axolotl_env.sh"), "0.21"], capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f".ci/axolotl_env.sh 0.21 failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert (path / "bin" / "axolotl").is_file(), f"{path} has no bin/axolotl"
    return path


@pytest.fixture(scope="module")
def work(venv, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("axolotl021")
    proc = subprocess.run([str(venv / "bin" / "python"), str(REPO / "examples" / "axolotl" / "make_tiny_assets.py"), "."],
                          cwd=work, env=_env(venv), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work


def _env(venv: Path) -> dict:
    return {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}  # fmt: skip


def _config(work: Path, name: str, *, plugins: bool, rolora: bool, **changes) -> Path:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    if not plugins:
        del cfg["plugins"]
    if not rolora:
        del cfg["rolora"]
    else:
        cfg["rolora"]["qat"] = {"enabled": True, "start_step": 1}
    cfg.update(output_dir=f"./outputs/{name}", save_strategy="steps", save_steps=2, **changes)
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _axolotl(venv: Path, work: Path, *args: str, name: str) -> str:
    launcher = ["--launcher", "python"] if args[0] == "train" else []
    proc = subprocess.run(["axolotl", *args, *launcher], cwd=work, env=_env(venv), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1500)  # fmt: skip
    (work / f"{name}.log").write_text(proc.stdout)
    assert proc.returncode == 0, f"axolotl {args[0]} ({name}) failed (exit {proc.returncode}); log tail:\n{proc.stdout[-8000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def entry(venv, work):
    """``axolotl train`` with no ``plugins:`` line (entry point), QAT on, checkpoints at steps 2 and 4."""
    log = _axolotl(venv, work, "train", str(_config(work, "entry", plugins=False, rolora=True)), name="entry")
    return work / "outputs" / "entry", log


@pytest.fixture(scope="module")
def explicit(venv, work, entry):
    """``plugins: [rolora.RoLoRAPlugin]`` + entry point, resumed from ``entry``'s checkpoint-2."""
    checkpoint = entry[0] / "checkpoint-2"
    cfg = _config(work, "explicit", plugins=True, rolora=True, resume_from_checkpoint=str(checkpoint))
    return work / "outputs" / "explicit", _axolotl(venv, work, "train", str(cfg), name="explicit")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids() -> torch.Tensor:
    return torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _reference(work: Path, adapter: Path | None):
    """The tiny base rotated here with rolora.yml's rotation (+ the saved adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rolora_plugin import rotate_model_

    model = AutoModelForCausalLM.from_pretrained(str(work / "tiny-llama"), dtype=torch.float32).eval()
    rotate_model_(model, ROTATION, progress=False)
    return PeftModel.from_pretrained(model, str(adapter)).eval() if adapter is not None else model


def test_venv_has_the_pins_and_runs_the_core(venv):
    """rolora_plugin on Axolotl 0.21's pins (Python 3.12): rotate, attach LoRA, function unchanged."""
    code = (
        "import sys, importlib.metadata as md; sys.path.insert(0, '.'); import torch\n"
        "from tests.helpers import tiny_model, random_ids\n"
        "from rolora_plugin import rotate_model_, RotationConfig\n"
        "from rolora_plugin.lora import get_rolora_peft_model, rolora_lora_config\n"
        "m = tiny_model('llama', dtype=torch.float64); ids = random_ids(); ref = m(ids).logits\n"
        "pm = get_rolora_peft_model(m, rolora_lora_config(m, r=4, target_modules=['q_proj', 'down_proj']), RotationConfig(r2=True, r3=True))\n"
        "err = ((pm(ids).logits - ref).abs().max() / ref.abs().max()).item(); assert err < 1e-6, err\n"
        f"print(sys.version_info[:2], {{n: md.version(n) for n in {sorted(PINS)!r}}})\n"
    )
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == f"(3, 12) {dict(sorted(PINS.items()))}"


def test_trl_sft_test_passes_on_axolotl_021s_stack(venv):
    """tests/integrations/test_trl.py inside this venv: TRL 1.14.1 (Axolotl 0.21's pin), transformers 5.20.1,
    Python 3.12 — the SFTTrainer path on the other tested stack."""
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "tests/integrations/test_trl.py", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, env={**_env(venv), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout


def test_entry_point_alone_turns_rolora_on_with_qat_and_exports(entry, work):
    from safetensors.torch import load_file

    from rolora_plugin.io.export import load_rotated, read_rotation_record

    out, log = entry
    assert "Plugin loaded successfully: rolora.plugin.RoLoRAPlugin" in log  # found through the entry point ...
    assert "Attempting to load plugin: rolora.RoLoRAPlugin\n" not in log and "registered a second time" not in log
    record = read_rotation_record(out)
    assert record is not None and record.config == ROTATION
    record.verify()
    assert read_rotation_record(out / "rolora-merged") == record
    for step in (2, 4):
        assert read_rotation_record(out / f"checkpoint-{step}") == record
    assert "rolora: QAT in W4A4 from step 1 on all-linear" in log  # RoLoRA QAT on a LoRA run (Axolotl QAT refuses)
    assert "rolora/eval_loss_w4a4" in log
    assert log.count("merged model with its rotation record exported") == 1

    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 6 and all(v.abs().max() > 0 for v in lora_b)
    ids = _ids()
    merged = _logits(load_rotated(out / "rolora-merged", dtype=torch.float32), ids)
    assert rel_err(merged, _logits(_reference(work, out), ids)) < FLOAT32_MERGE_RTOL
    assert rel_err(merged, _logits(_reference(work, None), ids)) > 100 * FLOAT32_MERGE_RTOL


def test_explicit_plugin_line_with_entry_point_resumes_to_the_same_model(explicit, entry, work):
    from rolora_plugin.io.export import load_rotated, read_rotation_record

    out, log = explicit
    assert "Plugin loaded successfully: rolora.plugin.RoLoRAPlugin" in log and "Plugin loaded successfully: rolora.RoLoRAPlugin" in log
    assert log.count("registered a second time") == 1  # the second instance stays inactive
    assert log.count("merged model with its rotation record exported") == 1  # one callback, one export
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-4").is_dir()  # resumed at step 2
    assert read_rotation_record(out / "rolora-merged") == read_rotation_record(entry[0])
    ids = _ids()
    resumed = _logits(load_rotated(out / "rolora-merged", dtype=torch.float32), ids)
    assert rel_err(resumed, _logits(load_rotated(entry[0] / "rolora-merged", dtype=torch.float32), ids)) < FLOAT32_MERGE_RTOL
    assert rel_err(resumed, _logits(_reference(work, out), ids)) < FLOAT32_MERGE_RTOL


def test_without_a_rolora_section_the_entry_point_plugin_stays_inactive(venv, work):
    from rolora_plugin.io.export import read_rotation_record

    cfg = _config(work, "inactive", plugins=False, rolora=False, max_steps=2)
    log = _axolotl(venv, work, "train", str(cfg), name="inactive")
    out = work / "outputs" / "inactive"
    assert "Plugin loaded successfully: rolora.plugin.RoLoRAPlugin" in log
    assert "config has no `rolora:` section: RoLoRA stays off" in log
    assert "set to false" not in log and "rolora/eval_loss" not in log  # no kernel override, no monitor
    assert (out / "adapter_model.safetensors").is_file() and read_rotation_record(out) is None
    assert not (out / "rolora-merged").exists()


def test_merge_lora_cli_gives_the_rotated_merge(venv, work, entry):
    from rolora_plugin.io.export import load_rotated, read_rotation_record

    out = entry[0]
    cfg = _config(work, "entry", plugins=False, rolora=True)  # the training config, as a user would pass it
    log = _axolotl(venv, work, "merge-lora", str(cfg), f"--lora-model-dir={out}", name="merge")
    assert "replaced Axolotl's LoRA merge" in log
    merged = out / "merged"
    assert read_rotation_record(merged) == read_rotation_record(out)
    ids = _ids()
    fixed = _logits(load_rotated(merged, dtype=torch.float32), ids)
    assert rel_err(fixed, _logits(load_rotated(out / "rolora-merged", dtype=torch.float32), ids)) < FLOAT32_MERGE_RTOL
    assert (merged / "tokenizer_config.json").is_file()
