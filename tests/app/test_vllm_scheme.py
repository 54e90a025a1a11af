"""vLLM 0.34's own compressed-tensors scheme selection on compressed-tensors' preset schemes (``benchmarks/vllm_scheme.py``).

Marked ``real``: the first run downloads the vLLM 0.34 wheel (~240 MB, ``pip download --no-deps``) into
``$ROLORA_CACHE/vllm-wheel``; vLLM's selection code is executed from it with a simulated GPU capability (no GPU, no
vLLM install). Fails — never skips — when the wheel cannot be obtained.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import vllm_scheme  # noqa: E402

NO_SCHEME = "No compressed-tensors compatible scheme was found"


def _config(preset: str, fmt: str, **activations) -> dict:
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if activations:
        scheme.input_activations = scheme.input_activations.model_copy(update=activations)
    group = json.loads(scheme.model_dump_json(exclude_none=True))
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group}}


def _scheme(config: dict, capability: int = 90) -> str:
    return vllm_scheme.select_schemes(config, capability)["group_0"]


def test_int_w4a4_symmetric_dynamic_per_token_is_served_by_the_int4_activation_scheme():
    config = _config("W4A4", "pack-quantized")
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert (acts["num_bits"], acts["symmetric"], acts["dynamic"], acts["strategy"]) == (4, True, True, "token")
    for capability in (80, 90):
        assert _scheme(config, capability) == "CompressedTensorsWNA4Int"


def test_nvfp4_selects_w4a4_fp4():
    assert _scheme(_config("NVFP4", "nvfp4-pack-quantized")) == "CompressedTensorsW4A4Fp4"


def test_mxfp4_selects_w4a4_mxfp4_from_sm80_only():
    config = _config("MXFP4", "mxfp4-pack-quantized")
    assert _scheme(config, 90) == "CompressedTensorsW4A4Mxfp4"
    below = _scheme(config, 75)  # get_scheme's capability check: the scheme's minimum is SM80
    assert below.startswith(vllm_scheme.REFUSED + "RuntimeError") and "Min capability: 80" in below


def test_asymmetric_activations_are_refused():
    result = _scheme(_config("W4A4", "pack-quantized", symmetric=False))
    assert result.startswith(vllm_scheme.REFUSED + "NotImplementedError") and NO_SCHEME in result


def test_no_fake_vllm_is_left_in_the_process():
    _scheme(_config("W4A8", "pack-quantized"))
    assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]


def test_cli_builtin_table_meets_its_expectations():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "vllm_scheme.py"), "--builtin", "--capability", "80", "90", "100"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "group_0" in line]
    assert len(rows) == len(vllm_scheme.builtin_configs()) and all(row.endswith("| yes |") for row in rows)
