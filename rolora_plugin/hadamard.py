"""Hadamard matrices built by our own code, and fast orthogonal transforms made of them.

Constructions (all entries ±1, ``H Hᵀ = n I``):

* Sylvester: ``H_{2^k} = H_2 ⊗ ... ⊗ H_2``, applied with butterflies in O(n log n).
* Paley I: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``.
* Paley II: order ``2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``.
* Kronecker products of the above, and of user-supplied matrices (``rolora_hadamard_matrix`` hook).

Prime powers use arithmetic in GF(p^k), so e.g. ``28 = 27 + 1`` is available.

Every transform here has the structure ``R = diag(s) · (D ⊗ H_p) / sqrt(p)`` where ``H_p`` is a Sylvester
matrix (butterflies), ``D`` a small dense orthonormal factor (a normalised Paley/Kronecker Hadamard, or, for a
width with no construction we know, a seeded random orthogonal matrix times the largest Hadamard part we can
build) and ``s`` an optional random sign vector. ``apply(x)`` computes ``x @ R`` along the last dimension.

Reference: QuaRot (Ashkboos et al., 2024) and RoLoRA (Huang et al., 2024) use random-sign Hadamards as R1.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .plugins import add_reset_callback, get_plugin_manager

__all__ = [
    "OrthogonalTransform",
    "NoHadamardError",
    "hadamard_matrix",
    "sylvester",
    "paley",
    "find_hadamard_order",
    "build_transform",
    "hadamard_transform",
    "hadamard_transform_ref",
    "fwht",
    "derive_seed",
]

logger = logging.getLogger(__name__)


class NoHadamardError(ValueError):
    """No Hadamard construction is known for a width and the orthogonal fallback was disabled."""


# ----------------------------------------------------------------------------------------------------------
# Number theory and finite fields
# ----------------------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return ``(p, k)`` with ``q = p**k`` for a prime ``p``, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of polynomial ``a`` modulo monic ``f`` over GF(p); coefficients low degree first."""
    a = list(a)
    while len(a) >= len(f):
        c = a[-1] % p
        if c:
            shift = len(a) - len(f)
            for i, fi in enumerate(f):
                a[shift + i] = (a[shift + i] - c * fi) % p
        a.pop()
    return [c % p for c in a]


def _irreducible(p: int, k: int) -> list[int]:
    """First monic irreducible polynomial of degree ``k`` over GF(p) (brute force, small fields only)."""
    for code in range(p**k):
        f = [(code // p**i) % p for i in range(k)] + [1]
        if all(any(_poly_mod(f, g, p)) for g in _monic_polys(p, range(1, k // 2 + 1))):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _monic_polys(p: int, degrees):
    for d in degrees:
        for code in range(p**d):
            yield [(code // p**i) % p for i in range(d)] + [1]


def _quadratic_character(q: int) -> list[list[int]]:
    """Jacobsthal matrix ``Q[a][b] = χ(a − b)`` of GF(q), χ the quadratic character."""
    p, k = _prime_power(q)
    if k == 1:
        elems = list(range(q))
        sub = lambda a, b: (a - b) % q  # noqa: E731
        squares = {(x * x) % q for x in range(1, q)}
    else:
        f = _irreducible(p, k)
        elems = [tuple((c // p**i) % p for i in range(k)) for c in range(q)]
        sub = lambda a, b: tuple((x - y) % p for x, y in zip(a, b))  # noqa: E731

        def mul(a, b):
            prod = [0] * (2 * k - 1)
            for i, x in enumerate(a):
                for j, y in enumerate(b):
                    prod[i + j] += x * y
            r = _poly_mod(prod, f, p)
            return tuple(r + [0] * (k - len(r)))

        squares = {mul(x, x) for x in elems[1:]}
    zero = elems[0]
    chi = lambda z: 0 if z == zero else (1 if z in squares else -1)  # noqa: E731
    return [[chi(sub(a, b)) for b in elems] for a in elems]


# ----------------------------------------------------------------------------------------------------------
# Constructions (float64, ±1 entries)
# ----------------------------------------------------------------------------------------------------------


def sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order ``n = 2^k`` (symmetric, ±1 entries, float64)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def _paley_kind(n: int) -> tuple[str, int] | None:
    if n % 4:
        return None
    q = n - 1
    if _prime_power(q) and q % 4 == 3:
        return "paley1", q
    q = n // 2 - 1
    if _prime_power(q) and q % 4 == 1:
        return "paley2", q
    return None


def paley(n: int) -> torch.Tensor:
    """Paley I (``n = q+1``, ``q ≡ 3 mod 4``) or Paley II (``n = 2(q+1)``, ``q ≡ 1 mod 4``) Hadamard matrix."""
    kind = _paley_kind(n)
    if kind is None:
        raise ValueError(f"{n} is not a Paley order (q+1 with q≡3 mod 4, or 2(q+1) with q≡1 mod 4, q a prime power)")
    name, q = kind
    jac = torch.tensor(_quadratic_character(q), dtype=torch.float64)
    ones = torch.ones(q, 1, dtype=torch.float64)
    if name == "paley1":  # H = I + [[0, 1ᵀ], [−1, Q]]
        core = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.T], 1), torch.cat([-ones, jac], 1)], 0)
        return core + torch.eye(q + 1, dtype=torch.float64)
    core = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.T], 1), torch.cat([ones, jac], 1)], 0)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(core, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _plugin_matrix(n: int) -> torch.Tensor | None:
    m = get_plugin_manager().hook.rolora_hadamard_matrix(n=n)
    if m is None:
        return None
    m = torch.as_tensor(m, dtype=torch.float64)
    if m.shape != (n, n) or not torch.equal(m.abs(), torch.ones_like(m)) or not torch.equal(m @ m.T, n * torch.eye(n, dtype=torch.float64)):
        raise ValueError(f"a rolora_hadamard_matrix hook returned an invalid Hadamard matrix for n={n}: it must be n×n, ±1, with H Hᵀ = n I")
    return m


@lru_cache(maxsize=None)
def _construct(n: int) -> tuple[str, torch.Tensor] | None:
    """(description, ±1 matrix) of a Hadamard matrix of order n from our constructions, or None."""
    if n == 1 or not n & (n - 1):
        return f"sylvester{n}", sylvester(n)
    if n % 4:
        return None
    user = _plugin_matrix(n)
    if user is not None:
        return f"plugin{n}", user
    if _paley_kind(n):
        name, q = _paley_kind(n)
        return f"{name}(q={q})", paley(n)
    for d in range(2, math.isqrt(n) + 1):
        if n % d == 0:
            a, b = _construct(d), _construct(n // d)
            if a and b:
                return f"{a[0]}⊗{b[0]}", torch.kron(a[1], b[1])
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order ``n`` (float64) from Sylvester/Paley/Kronecker constructions.

    Raises :class:`NoHadamardError` when no construction is known (e.g. n = 172).
    """
    built = _construct(n)
    if built is None:
        raise NoHadamardError(f"no Hadamard construction known for order {n}")
    return built[1].clone()


def find_hadamard_order(n: int) -> int:
    """Largest divisor ``h`` of ``n`` that has a Hadamard construction (``n / h`` is then the fallback order)."""
    return max(d for d in _divisors(n) if _construct(d) is not None)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def derive_seed(seed: int, tag: str) -> int:
    """A 63-bit seed derived from ``(seed, tag)``, so each rotation gets an independent, reproducible stream."""
    digest = hashlib.sha256(f"rolora:{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal matrix (float64, on CPU so every device/rank gets the same bits)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------
# Fast transform
# ----------------------------------------------------------------------------------------------------------


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last dim (size 2^k): ``x @ sylvester(2^k)``.

    Radix-2 butterflies, O(n log n), differentiable, any device and float dtype. The transforms below use
    radix-128 stages (:func:`_kron_apply`) instead: the same O(n log n) structure, each stage one GEMM, measured
    4-8× faster than radix-2 in PyTorch on CPU (``benchmarks/hadamard.py``); this function is their reference.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


_MAX_BLOCK_BITS = 7  # Sylvester blocks of at most 128: each stage is one GEMM with a small K


@lru_cache(maxsize=None)
def _block_sizes(pow2: int) -> tuple[int, ...]:
    bits = pow2.bit_length() - 1
    if bits == 0:
        return ()
    k = -(-bits // _MAX_BLOCK_BITS)
    return tuple(1 << (bits // k + (1 if i < bits % k else 0)) for i in range(k))


def _sylvester_blocks(pow2: int) -> list[torch.Tensor]:
    """Normalised Sylvester factors with ``H_pow2 / sqrt(pow2) = ⊗ blocks`` (Sylvester is Kronecker-closed)."""
    return [sylvester(b) / math.sqrt(b) for b in _block_sizes(pow2)]


def _kron_apply(x: torch.Tensor, mats: list[torch.Tensor], transposed: bool) -> torch.Tensor:
    """``x @ (M_0 ⊗ M_1 ⊗ ... ⊗ M_k)`` (or its transpose) along the last dim without forming the product.

    Viewing the last dim as axes (s_0, ..., s_k), ``x @ (A ⊗ B)`` is ``Aᵀ X B``: the last factor multiplies from
    the right as one GEMM, every other factor from the left on its axis (broadcast matmul). Cost per element is
    ``Σ s_i`` multiply-adds: with Sylvester blocks of size ≤ 128 this is a radix-128 butterfly, O(n log n).
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    after = 1
    for i, m in enumerate(reversed(mats)):
        s = m.shape[0]
        if i == 0:
            y = y.reshape(-1, s) @ (m.T if transposed else m)
        else:
            y = torch.matmul(m if transposed else m.T, y.reshape(-1, s, after))
        after *= s
    return y.reshape(*lead, n)


@dataclass(eq=False)
class OrthogonalTransform:
    """``R = diag(signs) · (dense ⊗ H_pow2) / sqrt(pow2)``, an n×n orthogonal matrix applied as ``x @ R``.

    Attributes:
        n: width.
        dense: (d, d) float64 orthonormal factor (normalised Hadamard or fallback), None when d == 1.
        pow2: order of the Sylvester part, applied with butterflies.
        signs: (n,) float64 ±1, or None.
        exact: True when R is a (scaled, signed) Hadamard matrix, False when a random orthogonal fallback is in it.
        description: how it was built, e.g. ``"paley2(q=17) ⊗ sylvester16"``.
    """

    n: int
    dense: torch.Tensor | None
    pow2: int
    signs: torch.Tensor | None = None
    exact: bool = True
    description: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def _factors(self, device, dtype):
        """(kronecker factors in axis order, signs) cast to (device, dtype), cached."""
        key = (device, dtype)
        if key not in self._cache:
            to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            mats = ([self.dense] if self.dense is not None else []) + _sylvester_blocks(self.pow2)
            self._cache[key] = ([to(m) for m in mats], to(self.signs))
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R`` along the last dimension; x: (..., n). Same dtype and device as x."""
        if x.shape[-1] != self.n:
            raise ValueError(f"transform of width {self.n} applied to a tensor with last dim {x.shape[-1]}")
        mats, signs = self._factors(x.device, x.dtype)
        return _kron_apply(x * signs if signs is not None else x, mats, transposed=False)

    def apply_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Rᵀ`` along the last dimension (the inverse transform)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"transform of width {self.n} applied to a tensor with last dim {x.shape[-1]}")
        mats, signs = self._factors(x.device, x.dtype)
        y = _kron_apply(x, mats, transposed=True)
        return y * signs if signs is not None else y

    def matrix(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """Dense n×n matrix R (reference only: O(n²) memory)."""
        return self.apply(torch.eye(self.n, dtype=dtype, device=device))

    def checksum(self) -> str:
        """sha256 of the defining data (construction, signs, dense factor bytes), device independent."""
        h = hashlib.sha256(f"{self.n}|{self.pow2}|{self.description}".encode())
        if self.signs is not None:
            h.update(self.signs.detach().cpu().to(torch.int8).numpy().tobytes())
        if self.dense is not None:
            h.update(self.dense.detach().cpu().to(torch.float64).numpy().tobytes())
        return h.hexdigest()[:16]


def build_transform(
    n: int,
    *,
    random_signs: bool = False,
    seed: int = 0,
    allow_fallback: bool = True,
) -> OrthogonalTransform:
    """Build the orthogonal transform of width ``n`` used for a rotation.

    The Sylvester part is as large as possible; the rest is a dense Hadamard from Paley/Kronecker
    constructions. Without any construction for the remaining factor (e.g. n = 11008 = 43·256), and with
    ``allow_fallback``, the dense factor is ``Q ⊗ H_m / sqrt(m)`` where ``H_m`` is the largest Hadamard part we can
    build and ``Q`` a Haar-random orthogonal matrix from ``torch.Generator().manual_seed(derive_seed(seed, ...))``:
    still exactly orthogonal, still spreads outliers (it is not a Hadamard matrix, so ``exact`` is False).

    Args:
        n: width (>= 1).
        random_signs: multiply by ``diag(s)``, ``s`` uniform ±1 from a generator seeded with ``seed``.
        seed: seed for the signs and the fallback factor.
        allow_fallback: raise :class:`NoHadamardError` instead of using the random orthogonal fallback.
    """
    if n < 1:
        raise ValueError(f"width must be positive, got {n}")
    pow2 = n & -n
    odd = n // pow2
    dense_desc, dense, exact = None, None, True
    # smallest dense factor odd·2^j that has a Hadamard construction
    for j in range(pow2.bit_length()):
        d = odd << j
        if d == 1:
            break
        built = _construct(d)
        if built is not None:
            dense_desc, dense, pow2 = built[0], built[1] / math.sqrt(d), n // d
            break
    else:
        if not allow_fallback:
            raise NoHadamardError(
                f"width {n} has no Hadamard construction here (its odd part {odd} is not covered by Sylvester/Paley/"
                "Kronecker constructions) and the orthogonal fallback is disabled. Allow it "
                "(RotationConfig(allow_fallback=True)), or register a Hadamard matrix of a suitable order with the "
                "`rolora_hadamard_matrix` plugin hook."
            )
        h = find_hadamard_order(n)
        r = n // h
        hpow2 = h & -h
        hdense_order = h // hpow2
        q = _random_orthogonal(r, derive_seed(seed, f"fallback{n}"))
        hd_desc, hd = _construct(hdense_order)
        dense = torch.kron(q, hd / math.sqrt(hdense_order))
        dense_desc, exact = f"randorth{r}(seed={seed})⊗{hd_desc}", False
        pow2 = hpow2
        logger.info("width %d: no Hadamard construction; using orthogonal fallback %s ⊗ sylvester%d", n, dense_desc, pow2)
    signs = None
    if random_signs:
        g = torch.Generator(device="cpu").manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    parts = [p for p in (dense_desc, f"sylvester{pow2}" if pow2 > 1 else None) if p]
    desc = ("diag(±1)·" if random_signs else "") + "⊗".join(parts or ["identity1"])
    return OrthogonalTransform(n=n, dense=dense, pow2=pow2, signs=signs, exact=exact, description=desc)


@lru_cache(maxsize=64)
def _default_transform(n: int) -> OrthogonalTransform:
    return build_transform(n)


def hadamard_transform(x: torch.Tensor, transform: OrthogonalTransform | None = None) -> torch.Tensor:
    """Orthonormal Hadamard transform along the last dim: ``x @ H_n / sqrt(n)`` (or ``x @ R`` for ``transform``).

    x: (..., n), any float dtype and device; differentiable. Cost O(n log n) for the power-of-two part plus
    O(n·d) for the small dense factor of order d (d = n / 2^k). Reference: :func:`hadamard_transform_ref`.

    >>> import torch
    >>> y = hadamard_transform(torch.ones(2, 4))
    >>> y[0].tolist()
    [2.0, 0.0, 0.0, 0.0]
    """
    t = transform if transform is not None else _default_transform(x.shape[-1])
    return t.apply(x)


def hadamard_transform_ref(x: torch.Tensor, transform: OrthogonalTransform | None = None) -> torch.Tensor:
    """Dense reference of :func:`hadamard_transform`: ``x @ R`` with R materialised (float64 matmul)."""
    t = transform if transform is not None else _default_transform(x.shape[-1])
    return (x.to(torch.float64) @ t.matrix(torch.float64, x.device)).to(x.dtype)


# constructions depend on what the rolora_hadamard_matrix hooks return: forget them when plugins are reloaded
add_reset_callback(_construct.cache_clear)
add_reset_callback(_default_transform.cache_clear)
