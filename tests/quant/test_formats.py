"""The one quantizer (issue 30): every format against a float64 reference and against compressed-tensors' own code.

* E2M1 / E4M3 / MX-scale roundings: fast path == independent float64 reference (ties, subnormals, saturation).
* ``fake_quant`` == compressed-tensors 0.20's dynamic scales + ``fake_quantize`` bit for bit: int (full grid,
  per token and per group), NVFP4 (with the global scale), MXFP4.
* STE / scale-in-graph gradients; ``QuantConfig`` formats, presets, engine contracts.
* layout: no module but ``quant/primitives.py`` rounds to a quantization grid (GPTQ's inlined integer loop is the one
  tested exception).
"""

import ast
from pathlib import Path

import pytest
import torch

from rolora_plugin.quant import QuantConfig
from rolora_plugin.quant.primitives import (
    TensorQuant,
    fake_quant,
    mx_exponent_ref,
    nvfp4_global_scale,
    round_e2m1,
    round_e2m1_ref,
    round_e4m3,
    round_e4m3_ref,
    _mx_scale,
)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_e2m1_rounding_equals_the_float64_reference_including_every_tie():
    grid = torch.tensor(E2M1, dtype=torch.float64)
    ties = (grid[1:] + grid[:-1]) / 2  # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
    x = torch.cat([ties, -ties, grid, -grid, torch.empty(20000, dtype=torch.float64).uniform_(-6, 6, generator=_gen(0))])
    assert torch.equal(round_e2m1(x), round_e2m1_ref(x))
    assert torch.equal(round_e2m1(x.float()), round_e2m1_ref(x).float())
    # ties go to the even code: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4
    assert round_e2m1_ref(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_e4m3_rounding_equals_the_float64_reference_with_subnormals_and_saturation():
    g = _gen(1)
    x = torch.cat([
        torch.randn(20000, generator=g).exp() * torch.logspace(-4, 2.7, 20000),  # normals up to ~500 (saturates at 448)
        torch.rand(2000, generator=g) * 2.0**-6,  # subnormals (step 2^-9)
        torch.tensor([448.0, 449.0, 464.0, 1e6, 2.0**-10, 2.0**-9 * 1.5, 0.0]),
    ])
    assert torch.equal(round_e4m3(x), round_e4m3_ref(x))
    assert round_e4m3(torch.tensor([1e6, 2.0**-10])).tolist() == [448.0, 0.0]  # saturating; below half the smallest step


def test_mx_scale_equals_the_float64_reference_and_rounds_up_from_mantissa_1_75():
    a = torch.rand(50000, generator=_gen(2)) * torch.logspace(-30, 30, 50000)
    assert torch.equal(_mx_scale(a), torch.pow(2.0, mx_exponent_ref(a)).float())
    # 1.74 · 2^k keeps 2^k (scale 2^(k-2)), 1.75 · 2^k rounds up to 2^(k+1); 0 gives the smallest scale 2^-127
    assert mx_exponent_ref(torch.tensor([1.74 * 8, 1.75 * 8, 0.0])).tolist() == [1.0, 2.0, -127.0]


def _ct_fake_quant(x, preset, group=None, **changes):
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam

    args = preset_name_to_scheme(preset, ["Linear"]).input_activations
    if changes:
        args = args.model_copy(update=changes)
    gs = generate_gparam(x.amin(), x.amax()) if preset == "NVFP4" else None
    s, z = compute_dynamic_scales_and_zp(x, args, None, global_scale=gs)
    return fake_quantize(x, s, z, args, global_scale=gs), gs


@pytest.mark.parametrize("preset, spec", [
    ("W4A4", TensorQuant("int", 4, True, "full")),
    ("W4A8", TensorQuant("int", 8, True, "full")),
    ("NVFP4", TensorQuant.fp4("nvfp4")),
    ("MXFP4", TensorQuant.fp4("mxfp4")),
])  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fake_quant_equals_compressed_tensors_bit_for_bit(preset, spec, seed):
    pytest.importorskip("compressed_tensors")
    g = _gen(seed)
    x = torch.randn(2, 7, 128, generator=g) * torch.logspace(-3, 2, 128)[torch.randperm(128, generator=g)]
    x[0, 0] = 0.0  # an all-zero token / group
    ref, gs = _ct_fake_quant(x, preset)
    assert torch.equal(fake_quant(x, spec, global_scale=gs), ref)


def test_int_group_activations_equal_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    x = torch.randn(3, 5, 256, generator=_gen(4)) * 3
    ref, _ = _ct_fake_quant(x, "W4A4", strategy="group", group_size=128)
    assert torch.equal(fake_quant(x, TensorQuant("int", 4, True, "full", 128)), ref)


def test_full_grid_steps_max_over_7_5_and_narrow_over_7():
    x = torch.tensor([[0.75, -0.5, 0.4, 0.1]], dtype=torch.float64)  # max|x| = 0.75
    full = fake_quant(x, TensorQuant("int", 4, True, "full"))  # s = 0.1: codes 7 (clamped from 7.5), -5, 4, 1
    narrow = fake_quant(x, TensorQuant("int", 4, True, "narrow"))  # s = 0.75/7: codes 7, -5 (-4.67), 4 (3.73), 1 (0.93)
    torch.testing.assert_close(full, torch.tensor([[0.7, -0.5, 0.4, 0.1]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(narrow, torch.tensor([[7, -5, 4, 1]], dtype=torch.float64) * 0.75 / 7, rtol=0, atol=1e-12)


def test_nvfp4_weight_dequantizes_from_fp8_group_scales_and_the_global_scale():
    w = torch.randn(8, 64, generator=_gen(5), dtype=torch.float64)
    q = fake_quant(w.float(), TensorQuant.fp4("nvfp4"))
    g = nvfp4_global_scale(w.float().abs().amax())
    # float64 reference of the format's definition
    amax = w.reshape(8, 4, 16).abs().amax(-1, keepdim=True)
    local = round_e4m3_ref(g.double() * (amax.float().double() / 6))
    s = (local.float() / g).double()
    ref = round_e2m1_ref((w.reshape(8, 4, 16).float().double() / s).clamp(-6, 6)) * s
    torch.testing.assert_close(q.double(), ref.reshape(8, 64), rtol=1e-6, atol=0)
    assert (q.reshape(8, 4, 16).abs().amax(-1) <= amax.squeeze(-1).float() * 1.0625 + 1e-6).all()  # E4M3 rounding ≤ 1/16


@pytest.mark.parametrize("spec", [TensorQuant.fp4("nvfp4"), TensorQuant.fp4("mxfp4"), TensorQuant("int", 4, True, "full", 16)])
def test_ste_gradient_is_one_inside_and_zero_where_clamped_and_scale_grad_flows(spec):
    x = (torch.randn(4, 32, generator=_gen(6)) * 2).requires_grad_(True)
    fake_quant(x, spec, ste=True).sum().backward()
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0} and x.grad.sum() > 0
    x.grad = None
    fake_quant(x, spec, scale_grad=True).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_quant_config_formats_presets_and_engine_contracts():
    nv = QuantConfig.preset("nvfp4")
    assert (nv.w_group_size, nv.a_group_size, nv.label()) == (16, 16, "NVFP4 W4A4")
    assert QuantConfig.preset("mxfp4").w_group_size == 32
    assert QuantConfig.from_dict(nv.to_dict()) == nv
    for name, scheme in (("w4a4-int", "CompressedTensorsWNA4Int"), ("nvfp4", "CompressedTensorsW4A4Fp4"),
                         ("mxfp4", "CompressedTensorsW4A4Mxfp4"), ("w4a8", "CompressedTensorsWNA8Int")):  # fmt: skip
        assert QuantConfig.preset(name).engine_contract() == {"servable": True, "scheme": scheme, "reasons": []}
    research = QuantConfig.preset("w4a4").engine_contract()
    assert not research["servable"] and any("asymmetric" in r for r in research["reasons"])
    assert not QuantConfig().engine_contract()["servable"]  # the 15-level default grid
    with pytest.raises(ValueError, match="groups of 16"):
        QuantConfig(w_format="nvfp4", a_format="nvfp4", w_group_size=32)
    with pytest.raises(ValueError, match="symmetric and unclipped"):
        QuantConfig(w_format="mxfp4", a_format="mxfp4", a_clip_search=True)
    with pytest.raises(ValueError, match="int_grid"):
        QuantConfig(int_grid="wide")


PACKAGE = Path(__file__).resolve().parents[2]


def _rounding_calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("round", "round_"):
            yield node.lineno
        if isinstance(node, ast.Attribute) and node.attr == "float8_e4m3fn" and isinstance(node.ctx, ast.Load):
            parent_calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call) and any(a is node for a in n.args)]
            if any(isinstance(c.func, ast.Attribute) and c.func.attr == "to" for c in parent_calls):
                yield node.lineno


def test_no_other_fake_quant_implementation_exists():
    """Grid rounding (``torch.round`` / ``.round_()`` / casts to FP8) lives in quant/primitives.py only; GPTQ's
    per-column integer loop inlines the same ops for speed (held equal to the float64 reference in test_gptq.py)."""
    allowed = {"rolora_plugin/quant/primitives.py": None, "rolora_plugin/quant/gptq.py": 1}
    offenders = {}
    for root in ("rolora_plugin", "integrations"):
        for path in sorted((PACKAGE / root).rglob("*.py")):
            rel = path.relative_to(PACKAGE).as_posix()
            lines = list(_rounding_calls(path))
            limit = allowed.get(rel, 0)
            if limit is not None and len(lines) > limit:
                offenders[rel] = lines
    assert not offenders, f"grid rounding outside the one quantizer (rolora_plugin/quant/primitives.py): {offenders}"
