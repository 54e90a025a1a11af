"""Hadamard matrices built by our own code (all entries ±1, ``H Hᵀ = n I``).

* Sylvester: ``H_{2^k} = H_2 ⊗ ... ⊗ H_2`` (:mod:`rolora_plugin.hadamard.sylvester`).
* Paley I: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``.
* Paley II: order ``2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``.
* Kronecker products of the above, and of user-supplied matrices (``rolora_hadamard_matrix`` hook).

Prime powers use arithmetic in GF(p^k), so e.g. ``28 = 27 + 1`` is available. For a width with no construction
we know, :func:`_random_orthogonal` gives the seeded fallback factor (:mod:`rolora_plugin.hadamard.transform`).
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch

from ..plugins import add_reset_callback, get_plugin_manager
from .sylvester import sylvester


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


add_reset_callback(_construct.cache_clear)
