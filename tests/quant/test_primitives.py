"""Fake-quant maths against float64 references, STE gradients, clip search, bad tensor inputs."""

import warnings

import pytest
import torch

from rolora_plugin.quant import (
    compute_scales,
    fake_quantize_activation,
    fake_quantize_weight,
    mse_clip_search,
    quant_range,
    quantize_activation,
    quantize_weight,
    quantize_with_scales,
    weight_scales,
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# Tolerance table: |out - ref| <= tol * (|ref| + step) elementwise. float64 computes exactly what the reference does.
# float32 (also the compute dtype of bfloat16) differs from float64 by a few ulps in s = max/qmax and x/s;
# bfloat16 outputs are additionally rounded to 8 significant bits.
QUANT_TOL = {torch.float64: 0.0, torch.float32: 1e-6, torch.bfloat16: 2.0**-8}
# Elements whose float64 pre-rounding value round(x/s)+z lies this close to a rounding boundary may round the
# other way in float32; they must then differ by exactly one step.
TIE_BAND = {torch.float64: 0.0, torch.float32: 1e-4, torch.bfloat16: 1e-4}


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# ---------------------------------------------------------------------------------------------- float64 references


def ref_row_qdq(row: torch.Tensor, bits: int, sym: bool, clip: float):
    """One row in float64, formula written out: returns (dequantized, pre-rounding value v, step s, qmin, qmax)."""
    row = row.to(torch.float64)
    if sym:
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        s = row.abs().max() * clip / qmax
        z = torch.zeros((), dtype=torch.float64)
    else:
        qmax, qmin = 2**bits - 1, 0
        lo, hi = min(row.min().item(), 0.0) * clip, max(row.max().item(), 0.0) * clip
        s = torch.tensor((hi - lo) / qmax, dtype=torch.float64)
    s = s if s > 0 else torch.ones((), dtype=torch.float64)
    if not sym:
        z = torch.round(-torch.tensor(lo, dtype=torch.float64) / s)
    v = row / s + z
    return (torch.clamp(torch.round(row / s) + z, qmin, qmax) - z) * s, v, s, qmin, qmax


def ref_weight_qdq(w, bits, group_size, sym, clip=1.0):
    out, vs, steps = torch.empty(w.shape, dtype=torch.float64), torch.empty(w.shape, dtype=torch.float64), torch.empty(w.shape, dtype=torch.float64)
    g = group_size or w.shape[1]
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            c = clip if isinstance(clip, float) else float(clip[r, c0 // g])
            q, v, s, _, _ = ref_row_qdq(w[r, c0 : c0 + g], bits, sym, c)
            out[r, c0 : c0 + g], vs[r, c0 : c0 + g], steps[r, c0 : c0 + g] = q, v, s
    return out, vs, steps


def ref_act_qdq(x, bits, sym, clip):
    flat = x.reshape(-1, x.shape[-1])
    out, vs, steps = ref_weight_qdq(flat, bits, None, sym, clip)
    return out.reshape(x.shape), vs.reshape(x.shape), steps.reshape(x.shape)


def assert_quant_close(out, ref, v, step, dtype):
    """Elementwise check with the per-dtype tolerance table and the tie-flip rule."""
    out, ref = out.to(torch.float64), ref.to(torch.float64)
    if dtype == torch.float64:
        assert torch.equal(out, ref), f"float64 must match the reference exactly, max diff {(out - ref).abs().max()}"
        return
    diff = (out - ref).abs()
    ok = diff <= QUANT_TOL[dtype] * (ref.abs() + step)
    near_tie = ((v - torch.floor(v)) - 0.5).abs() < TIE_BAND[dtype]
    one_step = (diff - step).abs() <= QUANT_TOL[dtype] * (ref.abs() + 2 * step)
    bad = ~(ok | (near_tie & one_step))
    assert not bad.any(), f"{int(bad.sum())} elements off, e.g. out={out[bad][:3].tolist()} ref={ref[bad][:3].tolist()}"


def heavy_tailed(shape, seed, dtype=torch.float64):
    """Gaussian values with a few large outliers (what LLM weights/activations look like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.02, 8.0, 1.0)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- tensor maths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_quantize_weight_matches_float64_reference(dtype, bits, sym, group_size):
    w = heavy_tailed((12, 64), seed=bits * 10 + sym, dtype=dtype)
    out = quantize_weight(w, bits, group_size, sym)
    assert out.dtype == dtype and out.shape == w.shape
    ref, v, step = ref_weight_qdq(w, bits, group_size, sym)
    assert_quant_close(out, ref, v, step, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.85])
def test_quantize_activation_matches_float64_reference(dtype, bits, sym, clip):
    x = heavy_tailed((2, 5, 48), seed=bits + 7 * sym, dtype=dtype) + (0.0 if sym else 0.7)
    out = quantize_activation(x, bits, sym, clip)
    ref, v, step = ref_act_qdq(x, bits, sym, clip)
    assert_quant_close(out, ref, v, step, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_group_clip_ratios_tensor_matches_reference(dtype):
    w = heavy_tailed((6, 32), seed=3, dtype=dtype)
    ratios = torch.linspace(0.5, 1.0, 12, dtype=torch.float64).reshape(6, 2)
    ref, v, step = ref_weight_qdq(w, 4, 16, True, ratios)
    assert_quant_close(quantize_weight(w, 4, 16, True, ratios), ref, v, step, dtype)


@pytest.mark.parametrize("sym", [True, False])
def test_outputs_lie_on_the_integer_grid(sym):
    w = heavy_tailed((8, 32), seed=11)
    scale, zero = weight_scales(w, 3, 8, sym)
    q = quantize_weight(w, 3, 8, sym).reshape(8, 4, 8) / scale + zero
    qmin, qmax = quant_range(3, sym)
    assert torch.allclose(q, torch.round(q), atol=1e-9)
    assert torch.round(q).min() >= qmin and torch.round(q).max() <= qmax
    assert scale.shape == zero.shape == (8, 4, 1)


def test_sixteen_bits_means_off_and_zero_rows_are_kept():
    x = heavy_tailed((3, 8), seed=1)
    assert quantize_weight(x, 16) is x and quantize_activation(x, 16) is x and quantize_activation(x, 16, ste=True) is x
    z = torch.zeros(2, 8)
    assert torch.equal(quantize_weight(z, 4, sym=False), z) and torch.equal(compute_scales(z, 4)[0], torch.ones(2, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [True, False])
def test_fake_quant_forward_equals_quantize(dtype, sym):
    x = heavy_tailed((4, 32), seed=5, dtype=dtype)
    assert torch.equal(quantize_activation(x, 4, sym, 0.9, ste=True), quantize_activation(x, 4, sym, 0.9))
    assert torch.equal(quantize_weight(x, 4, 8, sym, 0.9, ste=True), quantize_weight(x, 4, 8, sym, 0.9))


def _ref_inside(v: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    r = torch.round(v)
    return ((r >= qmin) & (r <= qmax)).to(torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.6])
def test_ste_gradient_is_identity_inside_clip_range_and_zero_outside(dtype, sym, clip):
    x = heavy_tailed((3, 4, 40), seed=21, dtype=dtype).requires_grad_(True)
    upstream = heavy_tailed((3, 4, 40), seed=22, dtype=dtype)
    (quantize_activation(x, 4, sym, clip, ste=True) * upstream).sum().backward()
    _, v, _ = ref_act_qdq(x.detach(), 4, sym, clip)
    inside = _ref_inside(v, *quant_range(4, sym))
    expected = upstream.to(torch.float64) * inside
    near = ((v - torch.floor(v)) - 0.5).abs() < TIE_BAND[dtype]  # boundary elements may flip outside float64
    assert torch.equal(x.grad.to(torch.float64)[~near], expected[~near])
    if clip == 1.0:
        assert bool(inside.all()), "without clipping every element is inside the range"
    else:
        assert 0 < int((inside == 0).sum()) < inside.numel() // 4, "clip 0.6 must zero the gradient of the outliers"


@pytest.mark.parametrize("group_size", [None, 8])
def test_ste_weight_gradient(group_size):
    w = heavy_tailed((6, 32), seed=2).requires_grad_(True)
    quantize_weight(w, 3, group_size, True, 0.7, ste=True).sum().backward()
    _, v, _ = ref_weight_qdq(w.detach(), 3, group_size, True, 0.7)
    assert torch.equal(w.grad, _ref_inside(v, *quant_range(3, True)))


def ref_clip_search(w, bits, group_size, sym, grid, max_shrink, norm):
    """Brute force per row/group in float64 with the reference quantizer; ties keep the larger ratio."""
    g = group_size or w.shape[1]
    best = torch.ones(w.shape[0], w.shape[1] // g, dtype=torch.float64)
    for r in range(w.shape[0]):
        for j in range(w.shape[1] // g):
            row = w[r, j * g : (j + 1) * g].to(torch.float64)
            errs = [((ref_row_qdq(row, bits, sym, 1 - i / grid)[0] - row).abs() ** norm).sum() for i in range(int(max_shrink * grid))]
            best[r, j] = 1 - min(range(len(errs)), key=lambda i: (errs[i], i)) / grid
    return best


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("norm", [2.0, 2.4])
def test_clip_search_matches_bruteforce_reference(sym, group_size, norm):
    w = heavy_tailed((5, 32), seed=9)
    got = mse_clip_search(w, 3, group_size, sym, grid=20, max_shrink=0.5, norm=norm)
    assert torch.equal(got, ref_clip_search(w, 3, group_size, sym, 20, 0.5, norm))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_clip_search_never_worse_than_no_clipping(dtype, sym, group_size):
    w = heavy_tailed((16, 64), seed=31, dtype=dtype)
    ratios = mse_clip_search(w, 3, group_size, sym, norm=2.0)
    wc = w.to(torch.float32 if dtype != torch.float64 else dtype)  # errors measured in the compute dtype
    err_clip = (quantize_weight(wc, 3, group_size, sym, ratios) - wc).pow(2).reshape(16, -1, group_size or 64).sum(-1)
    err_none = (quantize_weight(wc, 3, group_size, sym) - wc).pow(2).reshape(16, -1, group_size or 64).sum(-1)
    assert bool((err_clip <= err_none).all())
    assert err_clip.sum() < 0.95 * err_none.sum(), "heavy-tailed weights at 3 bits must gain from clipping"


# ---------------------------------------------------------------------------------------------- bad tensor inputs


@pytest.mark.parametrize("bits", [1, 17, 0, 4.0, True])
def test_bits_outside_2_to_16_are_rejected(bits):
    with pytest.raises(ValueError, match=r"int in 2\.\.16"):
        quantize_weight(torch.randn(2, 8), bits)
    with pytest.raises(ValueError, match=r"int in 2\.\.16"):
        quantize_activation(torch.randn(2, 8), bits, ste=True)


def test_bad_group_size_and_clip_ratio_are_rejected():
    with pytest.raises(ValueError, match="group_size 5 does not divide the input width 8"):
        quantize_weight(torch.randn(2, 8), 4, group_size=5)
    with pytest.raises(ValueError, match=r"clip_ratio must be a number in \(0, 1\]"):
        quantize_activation(torch.randn(2, 8), 4, clip_ratio=1.5)
    with pytest.raises(ValueError, match="expected a 2-D weight"):
        quantize_weight(torch.randn(8), 4)


# ---------------------------------------------------------------------------------------------- the STE switch


def _alias_call(fn, *args):
    """Call a deprecated alias; it must warn (DeprecationWarning naming its replacement) exactly once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    assert [w.category for w in caught] == [DeprecationWarning] and "ste=True" in str(caught[0].message)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [True, False])
def test_ste_switch_equals_the_deprecated_aliases_in_values_and_gradients(dtype, sym):
    """``quantize_*(..., ste=True)`` is what ``fake_quantize_*`` computed: same outputs, same STE gradients."""
    x = heavy_tailed((3, 5, 32), 7).to(dtype)
    w = heavy_tailed((6, 32), 8).to(dtype)
    cases = [
        (lambda t: quantize_activation(t, 4, sym, 0.8, ste=True), lambda t: _alias_call(fake_quantize_activation, t, 4, sym, 0.8), x),
        (lambda t: quantize_weight(t, 3, 8, sym, 0.9, ste=True), lambda t: _alias_call(fake_quantize_weight, t, 3, 8, sym, 0.9), w),
    ]
    for new, old, t in cases:
        a, b = t.clone().requires_grad_(), t.clone().requires_grad_()
        ya, yb = new(a), old(b)
        assert torch.equal(ya, yb)
        upstream = torch.randn(ya.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        (ya * upstream).sum().backward()
        (yb * upstream).sum().backward()
        assert torch.equal(a.grad, b.grad) and a.grad.abs().sum() > 0


@pytest.mark.parametrize("sym", [True, False])
def test_ste_switch_changes_the_backward_only(sym):
    """Same forward with and without the STE; without it the gradient is that of round (zero almost everywhere)."""
    x = heavy_tailed((4, 32), 9).requires_grad_()
    scale, zero = compute_scales(x, 4, sym, 0.9)
    plain, ste = quantize_with_scales(x, scale, zero, 4, sym), quantize_with_scales(x, scale, zero, 4, sym, ste=True)
    assert torch.equal(plain, ste)
    assert torch.equal(quantize_weight(x, 4, 8, sym), quantize_weight(x, 4, 8, sym, ste=True))
    assert torch.equal(quantize_activation(x, 4, sym), quantize_activation(x, 4, sym, ste=True))
    (g_plain,) = torch.autograd.grad(plain.sum(), x)
    (g_ste,) = torch.autograd.grad(ste.sum(), x)
    _, v, _ = ref_act_qdq(x.detach(), 4, sym, 0.9)
    assert g_plain.abs().max() == 0
    assert torch.equal(g_ste, _ref_inside(v, *quant_range(4, sym))) and g_ste.sum() > 0
