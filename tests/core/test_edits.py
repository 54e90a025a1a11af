"""The weight-edit engine (rolora_plugin.hadamard.edits): the reference against dense float64 matrices, the fast path against
the reference (float32 results within 1 ulp) for every width of the Hadamard test list, chunked and pooled."""

from __future__ import annotations

import pytest
import torch

import rolora_plugin.hadamard.edits as edits
from rolora_plugin.hadamard.edits import AxisOp, edit_, edit_reference, headwise, on_slice, shared_workspaces
from rolora_plugin.hadamard.transform import build_transform
from tests.core.test_hadamard import WIDTHS


def _t(n, seed=1, signs=True):
    return build_transform(n, random_signs=signs, seed=seed)


def _max_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of the spacing of floats at max(|a|, |b|) (0 when bitwise equal)."""
    m = torch.maximum(a.abs(), b.abs()).float()
    spacing = torch.nextafter(m, torch.full_like(m, float("inf"))) - m
    return float(((a.float() - b.float()).abs() / spacing).max())


def test_reference_equals_dense_float64_maths():
    """W ← Lᵀ · (W diag(s)) · R with explicit matrices: L a per-head transform on a slice of the rows."""
    g = torch.Generator().manual_seed(0)
    r, h = _t(48, 2), _t(12, 3)
    w = torch.randn(60, 48, generator=g, dtype=torch.float64)
    s = torch.rand(48, generator=g, dtype=torch.float64) + 0.5
    left = on_slice(headwise(h, transposed=True), 12, 36)
    lmat = torch.eye(60, dtype=torch.float64)
    lmat[12:36, 12:36] = torch.block_diag(h.matrix().T, h.matrix().T)  # left(x) = x·Lmat on the rows' axis
    expected = lmat.T @ (w * s) @ r.matrix()
    for chunk in (None, 7 * 48):  # one pass, and row/column chunks
        got = w.clone()
        edit_reference(got, torch.float64, scale=s, right=r.apply, left=left, chunk=chunk, single_pass=chunk)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", WIDTHS)
def test_fast_equals_reference_every_width(n):
    """Right side (rows of W, with scale and signs) and left side (columns), both directions, one pass and chunked:
    float32 results within 1 ulp of the reference (the float64 sums may be added in another order)."""
    g = torch.Generator().manual_seed(n)
    t = _t(n)
    k = max(2, 4096 // n)
    for case in ("right", "right_t", "left", "left_t"):
        shape = (k, n) if case.startswith("right") else (n, k)
        w = torch.randn(shape, generator=g)
        scale = torch.rand(n, generator=g, dtype=torch.float64) + 0.5 if case == "right" else None
        op = t.apply_transposed if case.endswith("_t") else t.apply
        kw = {"right": op, "scale": scale} if case.startswith("right") else {"left": op}
        for chunk in (None, max(n, k) * 3):
            fast, ref = w.clone(), w.clone()
            edit_(fast, torch.float64, chunk=chunk, single_pass=chunk, **kw)
            edit_reference(ref, torch.float64, chunk=chunk, single_pass=chunk, **kw)
            assert _max_ulps(fast, ref) <= 1, (case, chunk)


@pytest.mark.parametrize("dtype,cdtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float64), (torch.float32, torch.float32)])
def test_fast_equals_reference_both_sides_heads_and_slices(dtype, cdtype):
    """Both sides in one block, chunked with one rounding (a full buffer) and with two; per-head ops on both sides;
    the value slice of a fused qkv."""
    g = torch.Generator().manual_seed(1)
    r, h = _t(64, 2), _t(16, 3)
    w = torch.randn(176, 64, generator=g).to(dtype)
    s = (torch.rand(64, generator=g, dtype=torch.float64) + 0.5).to(cdtype)
    lefts = (headwise(h), on_slice(headwise(h), 16, 48), on_slice(headwise(h, True), 8, 168), AxisOp(h, True, 24, 88))
    rights = (r.apply, r.apply_transposed, headwise(h), headwise(h, True), None)
    for left in lefts:
        for right in rights:
            for chunk, single in ((None, None), (100, None), (100, 100)):  # one block; one rounding in chunks; two
                fast, ref = w.clone(), w.clone()
                edit_(fast, cdtype, scale=s, right=right, left=left, chunk=chunk, single_pass=single)
                edit_reference(ref, cdtype, scale=s, right=right, left=left, chunk=chunk, single_pass=single)
                if cdtype == torch.float64:  # float32 / bf16 results: one rounding of float64 sums
                    assert _max_ulps(fast, ref) <= 1, (left, right, chunk, single)
                else:  # float32 maths: the GEMMs' float32 sums may be added in another order (other batch sizes)
                    assert (fast - ref).abs().max() <= 8 * torch.finfo(torch.float32).eps * ref.abs().max(), (left, right, chunk, single)


def test_other_callables_take_the_reference_path():
    """A plain callable (not an AxisOp) is applied by the reference path: the same result, bit for bit."""
    t = _t(32)
    w = torch.randn(24, 32)

    def op(x):
        return t.apply(x) * 2.0

    fast, ref = w.clone(), w.clone()
    edit_(fast, torch.float64, right=op)
    edit_reference(ref, torch.float64, right=op)
    assert torch.equal(fast, ref)


def test_misaligned_span_is_refused():
    t = _t(16)
    with pytest.raises(ValueError, match="multiple of 16"):
        edit_(torch.zeros(40, 16), torch.float64, left=on_slice(headwise(t), 0, 24))
    with pytest.raises(ValueError, match="inside"):
        edit_(torch.zeros(40, 16), torch.float64, left=on_slice(headwise(t), 32, 48))


def test_shared_workspaces_allocate_one_pair_per_pass(monkeypatch):
    """Inside shared_workspaces every edit reuses one pair of buffers (grown to the largest request); outside,
    each edit allocates its own. Results are the same either way."""
    allocs = []
    real_empty = torch.empty

    def spy(*a, **k):
        out = real_empty(*a, **k)
        allocs.append(out.numel())
        return out

    t = _t(64)
    weights = [torch.randn(rows, 64) for rows in (8, 40, 24, 40)]
    expected = [w.clone() for w in weights]
    for w in expected:
        edit_(w, torch.float64, right=t.apply)
    monkeypatch.setattr(edits.torch, "empty", spy)
    with shared_workspaces():
        for w in weights:
            edit_(w, torch.float64, right=t.apply)
    assert allocs == [8 * 64, 8 * 64, 40 * 64, 40 * 64]  # the first pair, then one growth; 24 rows reuse it
    assert all(torch.equal(a, b) for a, b in zip(weights, expected))
    allocs.clear()
    edit_(torch.randn(8, 64), torch.float64, right=t.apply)
    assert allocs == [8 * 64, 8 * 64]  # outside the block: a pair per call, nothing kept
    assert edits._POOL.get() is None
