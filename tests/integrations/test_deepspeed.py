"""DeepSpeed ZeRO-2/3 with 2 CPU processes (gloo): RoLoRA training must equal a single-process run.

Runs ``examples/deepspeed/train_ds.py`` under ``torchrun --standalone --nproc_per_node 2`` with
``examples/deepspeed/zero3.json`` / ``zero2.json`` and once as a plain single process, then compares the merged
exports. Marked ``distributed`` (run by ``.ci/run`` as ``pytest -m distributed``); needs ``deepspeed`` installed
(``DS_BUILD_OPS=0 pip install deepspeed==0.19.8``) and fails, not skips, without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tests.helpers import rel_err

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "deepspeed" / "train_ds.py"
# fp32 training, 4 AdamW steps at lr 1e-2: reductions in a different order give ~3e-6 relative (measured 2.7e-6)
MERGED_RTOL = 2e-5


def _env() -> dict:
    cache = Path(os.environ.get("ROLORA_CACHE", Path.home() / ".cache" / "rolora-plugin"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(args: list[str], nproc: int, log: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    with open(log, "w") as f:
        proc = subprocess.run(launcher + args, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
    return proc


def _train(tmp: Path, name: str, base: Path, ds_config: str | None, *extra: str) -> Path:
    out = tmp / name
    args = [str(SCRIPT), "--model", str(base), "--out", str(out), *extra]
    if ds_config:
        args += ["--deepspeed", str(REPO / "examples" / "deepspeed" / ds_config)]
    proc = _run(args, 2 if ds_config else 1, tmp / f"{name}.log")
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n" + (tmp / f"{name}.log").read_text()[-6000:]
    return out


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from rolora_plugin.io.export import load_rotated

    with torch.no_grad():
        return load_rotated(str(model_dir), dtype=torch.float32)(ids).logits


@pytest.fixture(scope="module")
def deepspeed_installed():
    import deepspeed  # noqa: F401  (fails loudly: pip install deepspeed==0.19.8 with DS_BUILD_OPS=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, deepspeed_installed):
    """A tiny tied-embedding Llama and the single-process (no DeepSpeed) RoLoRA run on it."""
    tmp = tmp_path_factory.mktemp("ds")
    base = tmp / "base"
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_ds

        train_ds.make_tiny_llama(str(base))
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return tmp, base, _train(tmp, "single", base, None)


def _check_against_reference(reference, ds_config: str, zero3: bool) -> None:
    tmp, base, ref = reference
    out = _train(tmp, ds_config.removesuffix(".json"), base, ds_config)
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert summary["world_size"] == 2 and ref_summary["world_size"] == 1
    assert summary["zero3_partitioned"] is zero3 and ref_summary["zero3_partitioned"] is False
    assert summary["record"] == ref_summary["record"]  # same rotation (seed, checksums)
    assert (out / "adapter" / "rolora_rotation.json").is_file() and (out / "merged" / "rolora_rotation.json").is_file()
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(ref_summary["losses"]), rtol=MERGED_RTOL, atol=0)
    assert summary["losses"][-1] < summary["losses"][0]  # LoRA trained

    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    merged, expected = _logits(out / "merged", ids), _logits(ref / "merged", ids)
    assert rel_err(merged, expected) < MERGED_RTOL
    untrained = _untrained_rotated_logits(base, summary["record"], ids)
    assert rel_err(merged, untrained) > 100 * MERGED_RTOL  # the merge carries the trained adapter


def _untrained_rotated_logits(base: Path, record: dict, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from rolora_plugin import RotationConfig, rotate_model_

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    rotate_model_(model, RotationConfig.from_dict(record["config"]), progress=False)
    with torch.no_grad():
        return model(ids).logits


def test_zero3_two_processes_match_single_process(reference):
    _check_against_reference(reference, "zero3.json", zero3=True)


def test_zero2_two_processes_match_single_process(reference):
    _check_against_reference(reference, "zero2.json", zero3=False)


def test_zero3_lora_lr_scale_matches_single_process(reference):
    """``lora_lr_scale="norm-rms"`` under ZeRO-3: the factors are scaled inside ``GatheredParameters`` on every rank
    before DeepSpeed copies them, and the scaled ``lora_alpha`` travels in the adapter's ``alpha_pattern`` through
    the partitioned save and the export's reload — so training, merge and saved adapter equal one plain process."""
    tmp, base, unscaled = reference
    flag = ("--lora-lr-scale", "norm-rms")
    ref = _train(tmp, "single-norm-rms", base, None, *flag)
    out = _train(tmp, "zero3-norm-rms", base, "zero3.json", *flag)
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert summary["lora_lr_scale"] == ref_summary["lora_lr_scale"] == "norm-rms" and summary["zero3_partitioned"] is True
    assert summary["record"] == ref_summary["record"]
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(ref_summary["losses"]), rtol=MERGED_RTOL, atol=0)
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["alpha_pattern"], "the scaled lora_alpha must be saved with the adapter"

    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    merged = _logits(out / "merged", ids)
    assert rel_err(merged, _logits(ref / "merged", ids)) < MERGED_RTOL
    assert rel_err(merged, _logits(unscaled / "merged", ids)) > 100 * MERGED_RTOL  # the scaling changed the training

    from rolora_plugin import merge_and_export

    remerged = merge_and_export(out / "adapter", tmp / "zero3-norm-rms-remerged", base_model=str(base))
    assert rel_err(_logits(remerged, ids), merged) < MERGED_RTOL  # the saved adapter reloads with its scaling


DISAGREE_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from tests.helpers import tiny_model
from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.integrations.deepspeed import RankDisagreementError, check_rank_agreement

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
model = tiny_model("llama")
mode = sys.argv[1]
if mode == "seed":        # each rank draws its own rotation
    record = rotate_model_(model, RotationConfig(seed=rank), progress=False)
elif mode == "rank0":     # the ZeRO-2 / DDP pitfall: only rank 0 edits its (unpartitioned) weights
    record = rotate_model_(model, RotationConfig(seed=0), progress=False) if rank == 0 else None
else:                     # same rotation, but rank 1's weights were changed afterwards
    record = rotate_model_(model, RotationConfig(seed=0), progress=False)
    if rank == 1:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
try:
    check_rank_agreement(record, model=model if mode == "weights" else None)
except RankDisagreementError as e:
    print(f"rank {{rank}} DISAGREEMENT: {{e}}", flush=True)
    sys.exit(3)
print(f"rank {{rank}} agreed", flush=True)
"""


@pytest.mark.parametrize(("mode", "message"), [("seed", "different rotation"), ("rank0", "different rotation"), ("weights", "different weights")])
def test_rank_disagreement_fails_loudly(tmp_path, mode, message):
    script = tmp_path / "disagree.py"
    script.write_text(textwrap.dedent(DISAGREE_SCRIPT.format(repo=str(REPO))))
    proc = _run([str(script), mode], 2, tmp_path / "log.txt", timeout=180)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode != 0, log
    assert log.count("DISAGREEMENT") == 2 and message in log and "agreed" not in log, log
