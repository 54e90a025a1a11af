"""Fast orthogonal transforms made of Hadamard matrices (the matrices themselves: :mod:`.constructions`).

Every transform here has the structure ``R = diag(s) · (D ⊗ H_p) / sqrt(p)`` where ``H_p`` is a Sylvester
matrix (butterflies, O(n log n)), ``D`` a small dense orthonormal factor (a normalised Paley/Kronecker Hadamard, or,
for a width with no construction we know, a seeded random orthogonal matrix times the largest Hadamard part we can
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

from ..plugins import add_reset_callback
from .constructions import NoHadamardError, _construct, _random_orthogonal, derive_seed, find_hadamard_order
from .kernels import dispatch_triton_hadamard
from .sylvester import sylvester

__all__ = [
    "OrthogonalTransform",
    "build_block_transform",
    "build_transform",
    "hadamard_transform",
    "hadamard_transform_ref",
    "fwht",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Fast transform
# ----------------------------------------------------------------------------------------------------------


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last dim (size 2^k): ``x @ sylvester(2^k)``.

    Radix-2 butterflies, O(n log n), differentiable, any device and float dtype. :meth:`OrthogonalTransform.apply`
    uses GEMM stages instead (:func:`_stage_sizes`): on CPU every butterfly stage is a full pass over memory and
    measured 2-10× slower than the GEMM stages (benchmarks/online_hadamard.py); this function is their reference.
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


_MAX_BLOCK_BITS = 7  # Sylvester blocks of at most 128 by default (see _stage_sizes for what apply uses)


@lru_cache(maxsize=None)
def _block_sizes(pow2: int, max_bits: int = _MAX_BLOCK_BITS) -> tuple[int, ...]:
    """Balanced split of ``pow2 = 2^k`` into the fewest power-of-two blocks of at most ``2^max_bits``."""
    bits = pow2.bit_length() - 1
    if bits == 0:
        return ()
    k = -(-bits // max_bits)
    return tuple(1 << (bits // k + (1 if i < bits % k else 0)) for i in range(k))


# Cost model of one GEMM stage of order s, per element, in multiply-add equivalents: s + _STAGE_COST (the pass
# over memory and the call) + _SMALL_STAGE_COST when s is below the dtype's minimum (GEMMs with K or N < 16 run
# 3-8x below peak on CPU). Fitted to a sweep of every split at 512 and 8192 tokens on the 2-core AMD EPYC box
# and checked by benchmarks/online_hadamard.py (RESULTS.md, "Online Hadamard on CPU"): float64 (the rotation
# pass) is compute-bound there, so more, smaller stages pay off; float32/16-bit stages are bound by their pass.
_STAGE_COST = {torch.float64: 24}
_DEFAULT_STAGE_COST = 96
_MIN_STAGE = {torch.float64: 8}
_DEFAULT_MIN_STAGE = 16
_SMALL_STAGE_COST = 200


def _split_candidates(d: int, bits: int):
    """Every ``(d·2^j, b_1, ..., b_m)``: Sylvester bits merged into the dense stage, the rest split evenly into m
    power-of-two blocks, smallest first (the last block is the right GEMM, the most efficient stage)."""
    for j in range(bits + 1):
        first = (d << j,) if d << j > 1 else ()
        rest = bits - j
        for m in range(1 if rest else 0, rest + 1):
            yield first + tuple(reversed(_block_sizes(1 << rest, -(-rest // m)))) if m else first


@lru_cache(maxsize=None)
def _stage_sizes(d: int, pow2: int, dtype: torch.dtype) -> tuple[int, ...]:
    """Orders of the GEMM stages applying ``dense(d) ⊗ H_pow2``, the cheapest under the cost model above.

    Depends only on (d, pow2, dtype), never on the batch or on timings, so results are bit-reproducible.
    E.g. float32: 1536 = 12·128 → (48, 32); 4096 → (64, 64); 14336 = 28·512 → (28, 16, 32).
    """
    alpha = _STAGE_COST.get(dtype, _DEFAULT_STAGE_COST)
    small = _MIN_STAGE.get(dtype, _DEFAULT_MIN_STAGE)
    first_ok = d > 1  # a dense first stage (left-multiplied, wide N) is efficient at any order

    def cost(sizes):
        penalty = sum(s < small and not (i == 0 and first_ok) for i, s in enumerate(sizes))
        return sum(sizes) + alpha * len(sizes) + _SMALL_STAGE_COST * penalty

    candidates = [c for c in _split_candidates(d, pow2.bit_length() - 1) if c]
    return min(candidates, key=cost) if candidates else ()


def _stage_factors(dense: torch.Tensor | None, pow2: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """float64 factors with ``(dense ⊗ H_pow2 / sqrt(pow2)) = ⊗ factors``, factor i of order ``sizes[i]``.

    The first factor carries the dense part: ``dense ⊗ H_m / sqrt(m)`` with ``m = sizes[0] / d`` (a Kronecker
    product is associative, so merging Sylvester bits into the dense factor changes only the order of the sums).
    """
    d = 1 if dense is None else dense.shape[0]
    mats = []
    for i, s in enumerate(sizes):
        h = sylvester(s // d if i == 0 else s) / math.sqrt(s // d if i == 0 else s)
        mats.append(torch.kron(dense.contiguous(), h) if i == 0 and dense is not None else h)
    return mats


def _left_apply(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``m`` on the middle axis of y (b, s, after): ``out[b] = m @ y[b]``, m contiguous (s, s).

    A broadcast batched matmul, except for 16-bit dtypes when s > 4·after: CPU ``bmm`` then copies the broadcast
    operand b times (b·s² elements; 5× slower than einsum's single GEMM measured for s = 344, after = 32).
    """
    if y.dtype in (torch.bfloat16, torch.float16) and m.shape[0] > 4 * y.shape[-1]:
        return torch.einsum("ij,bjk->bik", m, y)
    return torch.matmul(m, y)


def _kron_apply(x: torch.Tensor, mats: list[torch.Tensor], transposed: bool) -> torch.Tensor:
    """``x @ (M_0 ⊗ M_1 ⊗ ... ⊗ M_k)`` (or its transpose) along the last dim without forming the product.

    Viewing the last dim as axes (s_0, ..., s_k), ``x @ (A ⊗ B)`` is ``Aᵀ X B``: the last factor multiplies from
    the right as one GEMM, every other factor from the left on its axis (:func:`_left_apply`, with a contiguous
    copy of the s×s factor: bf16 ``bmm`` measured 15-40% slower with a transposed view). Cost per element is
    ``Σ s_i`` multiply-adds in ``k + 1`` passes over memory.
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
            y = _left_apply((m if transposed else m.T).contiguous(), y.reshape(-1, s, after))
        after *= s
    return y.reshape(*lead, n)


def _dispatch_kernel(x: torch.Tensor, t: OrthogonalTransform, transposed: bool) -> torch.Tensor | None:
    """The Triton kernel's result for CUDA tensors when it applies, else None (PyTorch path)."""
    if x.device.type != "cuda":
        return None
    return dispatch_triton_hadamard(x, t, transposed)


class _Rotate(torch.autograd.Function):
    """``y = x R`` (or ``x Rᵀ``) with R orthogonal and constant: the gradient is ``g Rᵀ`` (or ``g R``), the same
    fast transform in the other direction (differentiable again, so higher derivatives work)."""

    @staticmethod
    def forward(ctx, x, transform, transposed):
        ctx.transform, ctx.transposed = transform, transposed
        return transform._apply_fast(x, transposed)

    @staticmethod
    def backward(ctx, grad):
        return _Rotate.apply(grad, ctx.transform, not ctx.transposed), None, None


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
        """(kronecker factors in axis order, signs) cast to (device, dtype), cached; stages from :func:`_stage_sizes`."""
        key = (device, dtype)
        if key not in self._cache:
            to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            d = 1 if self.dense is None else self.dense.shape[0]
            mats = _stage_factors(self.dense, self.pow2, _stage_sizes(d, self.pow2, dtype))
            self._cache[key] = ([to(m) for m in mats], to(self.signs))
        return self._cache[key]

    def _apply_fast(self, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        """``x @ R`` (``x @ Rᵀ`` if transposed) without autograd: the Triton kernel on CUDA when it applies,
        else signs and GEMM stages (:func:`_kron_apply`)."""
        y = _dispatch_kernel(x, self, transposed)
        if y is not None:
            return y
        mats, signs = self._factors(x.device, x.dtype)
        if not transposed:
            return _kron_apply(x * signs if signs is not None else x, mats, transposed=False)
        y = _kron_apply(x, mats, transposed=True) if mats else x.clone()  # a new tensor: safe to scale in place
        return y.mul_(signs) if signs is not None else y

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R`` along the last dimension; x: (..., n). Same dtype and device as x; differentiable."""
        return self._apply(x, transposed=False)

    def apply_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Rᵀ`` along the last dimension (the inverse transform)."""
        return self._apply(x, transposed=True)

    def _apply(self, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"transform of width {self.n} applied to a tensor with last dim {x.shape[-1]}")
        if x.requires_grad and torch.is_grad_enabled():
            return _Rotate.apply(x, self, transposed)
        return self._apply_fast(x, transposed)  # no graph to record: skip the autograd.Function's overhead

    def matrix_columns(self, start: int, stop: int, dtype=torch.float64, device=None) -> torch.Tensor:
        """Columns ``R[:, start:stop]`` formed explicitly (reference; ``start``, ``stop`` multiples of pow2).

        ``R[:, a·p:b·p] = diag(signs) · (dense[:, a:b] ⊗ H_p) / sqrt(p)`` with p = pow2: no fast path involved.
        """
        p = self.pow2
        if start % p or stop % p:
            raise ValueError(f"column range [{start}, {stop}) is not aligned to the Sylvester order {p}")
        h = sylvester(p) / math.sqrt(p)
        r = torch.kron(self.dense[:, start // p : stop // p].contiguous(), h) if self.dense is not None else h[:, start:stop]
        if self.signs is not None:
            r = self.signs.unsqueeze(1) * r
        return r.to(device=device, dtype=dtype)

    def matrix(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """Dense n×n matrix R formed with ``torch.kron`` (reference only: O(n²) memory)."""
        return self.matrix_columns(0, self.n, dtype, device)

    def checksum(self) -> str:
        """sha256 of the defining data (construction, signs, dense factor bytes), device independent."""
        h = hashlib.sha256(f"{self.n}|{self.pow2}|{self.description}".encode())
        if self.signs is not None:
            h.update(self.signs.detach().cpu().to(torch.int8).numpy().tobytes())
        if self.dense is not None:
            h.update(self.dense.detach().cpu().to(torch.float64).numpy().tobytes())
        return h.hexdigest()[:16]


def build_block_transform(n: int, block: int, *, random_signs: bool = False, seed: int = 0) -> OrthogonalTransform:
    """``R = diag(s) · (I_{n/b} ⊗ H_b) / sqrt(b)``: a block-diagonal Sylvester Hadamard (blocks of ``b`` consecutive
    channels), optionally with random signs seeded like :func:`build_transform`. ``b`` a power of two dividing ``n``."""
    if block < 2 or block & (block - 1) or n % block:
        raise ValueError(f"block size {block} must be a power of two that divides the width {n}")
    dense = torch.eye(n // block, dtype=torch.float64) if n > block else None
    signs = None
    if random_signs:
        g = torch.Generator(device="cpu").manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    desc = ("diag(±1)·" if random_signs else "") + (f"identity{n // block}⊗" if n > block else "") + f"sylvester{block}"
    return OrthogonalTransform(n=n, dense=dense, pow2=block, signs=signs, exact=True, description=desc)


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
    """Dense reference of :func:`hadamard_transform`: ``x @ R`` with R materialised (float64 matmul).

    ``R = diag(s) · K`` with ``K = dense ⊗ H_p / sqrt(p)`` formed by ``torch.kron`` (independent of the fast path),
    in column blocks of at most ~2^24 entries so wide transforms (n = 18944) never need n×n at once; the signs
    are applied to x, ``(x·s) K``, which is bit-identical to ``x (diag(s) K)`` (multiplying by ±1 is exact).
    """
    t = transform if transform is not None else _default_transform(x.shape[-1])
    x64 = x.to(torch.float64)
    if t.signs is not None:
        x64 = x64 * t.signs.to(x64.device)
    unsigned = OrthogonalTransform(n=t.n, dense=t.dense, pow2=t.pow2)
    step = t.pow2 * max(1, (1 << 24) // (t.n * t.pow2))
    cols = [x64 @ unsigned.matrix_columns(j, min(j + step, t.n), device=x.device) for j in range(0, t.n, step)]
    return torch.cat(cols, dim=-1).to(x.dtype)


# constructions depend on what the rolora_hadamard_matrix hooks return: forget them when plugins are reloaded
add_reset_callback(_default_transform.cache_clear)
