import math

import pytest
import torch
from conftest import TRANSFORM_RTOL, rel_err

from rolora_plugin.hadamard import (
    NoHadamardError,
    build_transform,
    fwht,
    hadamard_matrix,
    hadamard_transform,
    hadamard_transform_ref,
    paley,
    sylvester,
)

# widths from the issue (LLaMA/Mistral/Qwen/SmolLM hidden and intermediate sizes)
WIDTHS = [64, 128, 576, 896, 1536, 4096, 4864, 5120, 11008, 13824, 14336, 18944]
PALEY_ORDERS = [4, 8, 12, 20, 28, 36, 44, 76, 108, 148, 244, 344]  # 28 = GF(27)+1, 244 = GF(3^5)+1, 344 = GF(7^3)+1


def _is_hadamard(h: torch.Tensor) -> bool:
    n = h.shape[0]
    return bool(torch.equal(h.abs(), torch.ones_like(h)) and torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype)))


@pytest.mark.parametrize("n", [1, 2, 4, 64, 256])
def test_sylvester_is_hadamard(n):
    assert _is_hadamard(sylvester(n))


@pytest.mark.parametrize("n", PALEY_ORDERS)
def test_paley_is_hadamard(n):
    assert _is_hadamard(paley(n))


@pytest.mark.parametrize("n", [24, 48, 72, 144, 172 * 2, 4 * 36])
def test_kronecker_constructions_are_hadamard(n):
    assert _is_hadamard(hadamard_matrix(n))


def test_no_construction_raises():
    with pytest.raises(NoHadamardError, match="172"):
        hadamard_matrix(172)  # 172 = 4·43: 171 and 85 are not prime powers
    with pytest.raises(ValueError, match="power of two"):
        sylvester(12)
    with pytest.raises(ValueError, match="Paley order"):
        paley(16 * 7)


def test_fwht_matches_sylvester():
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    assert rel_err(fwht(x), x @ sylvester(32)) < 1e-14


@pytest.mark.parametrize("n", WIDTHS)
def test_transform_orthogonal_and_exact(n):
    t = build_transform(n, random_signs=True, seed=3)
    assert t.exact, f"width {n} should have an exact Hadamard construction, got {t.description}"
    if t.dense is not None:
        d = t.dense.shape[0]
        assert (t.dense @ t.dense.T - torch.eye(d, dtype=torch.float64)).abs().max() <= 1e-12
        assert _is_hadamard(torch.round(t.dense * math.sqrt(d)))
    g = torch.Generator().manual_seed(n)
    x = torch.randn(48, n, generator=g, dtype=torch.float64)
    y = t.apply(x)
    # orthogonality probed on random vectors: Gram matrix preserved, inverse exact
    assert (y @ y.T - x @ x.T).abs().max() / (x @ x.T).abs().max() <= 1e-12
    assert (t.apply_transposed(y) - x).abs().max() / x.abs().max() <= 1e-12


@pytest.mark.parametrize("n", [64, 576, 896, 1536])
def test_transform_full_matrix_orthogonal(n):
    r = build_transform(n, random_signs=True, seed=1).matrix()
    assert (r @ r.T - torch.eye(n, dtype=torch.float64)).abs().max() <= 1e-12


def test_fallback_is_orthogonal_seeded_and_flagged():
    t = build_transform(172, seed=5)
    assert not t.exact and "randorth43" in t.description
    r = t.matrix()
    assert (r @ r.T - torch.eye(172, dtype=torch.float64)).abs().max() <= 1e-12
    assert torch.equal(r, build_transform(172, seed=5).matrix())
    assert not torch.equal(r, build_transform(172, seed=6).matrix())
    with pytest.raises(NoHadamardError, match="fallback is disabled"):
        build_transform(172, allow_fallback=False)


@pytest.mark.parametrize("n", [64, 576, 1536, 172, 2752])  # 2752 = 344·8 (Paley I over GF(7^3), like 11008)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fast_matches_reference_forward(n, dtype):
    t = build_transform(n, random_signs=True, seed=2)
    x = torch.randn(4, 3, n, dtype=torch.float64)
    ref = hadamard_transform_ref(x, t)
    out = hadamard_transform(x.to(dtype), t)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) <= TRANSFORM_RTOL[dtype]


@pytest.mark.parametrize("n", [128, 576, 172])
def test_fast_matches_reference_backward(n):
    t = build_transform(n, random_signs=True, seed=4)
    x = torch.randn(5, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, n, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((hadamard_transform(x, t) * w).sum(), x)
    (g_ref,) = torch.autograd.grad((hadamard_transform_ref(x, t) * w).sum(), x)
    assert rel_err(g_fast, g_ref) <= TRANSFORM_RTOL[torch.float64]
    # d(xR)/dx applied to w is w Rᵀ
    assert rel_err(g_fast, t.apply_transposed(w)) <= TRANSFORM_RTOL[torch.float64]


def test_default_transform_is_normalised_hadamard():
    x = torch.randn(2, 12, dtype=torch.float64)
    h = hadamard_matrix(12) / math.sqrt(12)
    assert rel_err(hadamard_transform(x), x @ h) <= 1e-14


def test_seeds_reproducible_and_distinct():
    a, b, c = (build_transform(576, random_signs=True, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.signs, b.signs) and a.checksum() == b.checksum()
    assert not torch.equal(a.signs, c.signs) and a.checksum() != c.checksum()


def test_wrong_width_raises():
    with pytest.raises(ValueError, match="width 64"):
        build_transform(64).apply(torch.zeros(2, 32))


def test_cuda_matches_cpu(cuda_device):
    t = build_transform(1536, random_signs=True, seed=0)
    x = torch.randn(8, 1536)
    assert rel_err(hadamard_transform(x.to(cuda_device), t).cpu(), hadamard_transform(x, t)) <= 1e-5


@pytest.mark.parametrize("p", [2, 128, 256, 2**15])
def test_blocked_stages_match_radix2_butterflies(p):
    x = torch.randn(3, p, dtype=torch.float64)
    assert rel_err(build_transform(p).apply(x), fwht(x) / math.sqrt(p)) <= 1e-12
