"""Online Hadamard ``y = x @ R`` as one Triton kernel (imports triton: load through :mod:`rolora_plugin.hadamard.kernels`).

``R = diag(s) · (D ⊗ H_p) / sqrt(p)`` (see :class:`rolora_plugin.hadamard.transform.OrthogonalTransform`). Each row of x,
viewed as a ``(d, p)`` matrix X, maps to ``Y = L · X · H_p / sqrt(p)`` with ``L = Dᵀ`` (``apply``; signs on the
input) or ``L = D`` (``apply_transposed``; signs on the output). One kernel does all of it:

* the dense factor is **fused**: ``L · X`` is a ``tl.dot`` over d-blocks (d padded to a multiple of BM with
  zeros in L), with ``ROWS`` consecutive rows side by side in the dot's N dimension so one L tile serves several
  rows. Fusing keeps the kernel at one read and one write of x; a separate GEMM for D would add a full pass over
  memory (≥ 2× a memcpy), and the issue's goal is ≤ 1.2× a memcpy;
* the Sylvester part ``H_p = H_a ⊗ H_b`` (a ≤ b ≤ 128, both ≥ 16, or a = 1 for p ≤ 128) is applied to the
  ``(BM·ROWS, p)`` accumulator tile in registers as two more ``tl.dot`` with ±1 matrices (tensor cores for
  16-bit inputs), with an axis permutation between them: ``(a+b)`` multiply-adds per element, against ``log2 p``
  adds for a radix-2 butterfly, but on tensor cores and without shuffles;
* signs, the ``1/sqrt(a)``, ``1/sqrt(b)`` scales (applied per stage so float16 cannot overflow) and the casts
  are fused around the dots.

float32 inputs use ``input_precision="ieee"`` (TF32 would miss the float32 tolerance); 16-bit inputs run the
dots in their own dtype with float32 accumulation. Shapes the kernel does not cover (p < 16, p > 16384, or a
tile above 16384 elements) return None from :func:`kernel_plan`; the caller then uses the PyTorch path.
Reference: :func:`rolora_plugin.hadamard.transform.hadamard_transform_ref`. Tested on CPU through ``TRITON_INTERPRET=1``
(tests/core/test_triton_hadamard.py); GPU speed is measured by benchmarks/gpu_suite.sh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..sylvester import sylvester

__all__ = ["KernelPlan", "kernel_plan", "hadamard_triton"]

_MAX_TILE = 16384  # elements of the float32 accumulator tile of one program
_TARGET_TILE = 8192


@dataclass(frozen=True)
class KernelPlan:
    """Launch shape: d (dense order), dpad (d padded to BM), bm (dense rows per program and K block), a·b = p
    (Sylvester split), rows (tokens per program)."""

    d: int
    dpad: int
    bm: int
    a: int
    b: int
    rows: int


def _pow2_ceil(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def kernel_plan(transform) -> KernelPlan | None:
    """The kernel's launch shape for a transform, or None when the kernel does not cover it."""
    p = transform.pow2
    d = transform.n // p
    bits = p.bit_length() - 1
    if p < 16 or p > 128 * 128:
        return None
    a, b = (1, p) if p <= 128 else (1 << (bits // 2), 1 << (bits - bits // 2))
    if d == 1:
        rows = max(16 if a == 1 else 1, _TARGET_TILE // p)
        return KernelPlan(d=1, dpad=1, bm=1, a=a, b=b, rows=rows)
    bm = min(64, max(16, _pow2_ceil(d)))
    if bm * p > _MAX_TILE:
        return None
    rows = max(1, min(16, _TARGET_TILE // (bm * p)))
    return KernelPlan(d=d, dpad=-(-d // bm) * bm, bm=bm, a=a, b=b, rows=rows)


@triton.jit
def _sylvester_tile(t, ha_ptr, hb_ptr, scale_a, scale_b, M: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                    IEEE: tl.constexpr):  # fmt: skip
    """``t @ (H_A ⊗ H_B) / sqrt(A·B)`` for a float32 tile t of shape (M, A·B); returns float32 (M, A·B)."""
    cdt = hb_ptr.dtype.element_ty
    ib = tl.arange(0, B)
    hb = tl.load(hb_ptr + ib[:, None] * B + ib[None, :])
    u = tl.reshape(t, (M * A, B)).to(cdt)
    if IEEE:
        u = tl.dot(u, hb, input_precision="ieee") * scale_b
    else:
        u = tl.dot(u, hb) * scale_b
    if A > 1:
        ia = tl.arange(0, A)
        ha = tl.load(ha_ptr + ia[:, None] * A + ia[None, :])
        u = tl.reshape(tl.permute(tl.reshape(u, (M, A, B)), (0, 2, 1)), (M * B, A)).to(cdt)
        if IEEE:
            u = tl.dot(u, ha, input_precision="ieee") * scale_a
        else:
            u = tl.dot(u, ha) * scale_a
        u = tl.permute(tl.reshape(u, (M, B, A)), (0, 2, 1))
    return tl.reshape(u, (M, A * B))


@triton.jit
def _sylvester_kernel(x_ptr, y_ptr, s_ptr, ha_ptr, hb_ptr, n_rows, scale_a, scale_b,
                      A: tl.constexpr, B: tl.constexpr, ROWS: tl.constexpr, SIGNS_IN: tl.constexpr,
                      SIGNS_OUT: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """d == 1: rows [pid·ROWS, pid·ROWS + ROWS) of a (n_rows, A·B) tensor, ``y = (x·s) H / sqrt(p)`` (·s after)."""
    P: tl.constexpr = A * B
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ip = tl.arange(0, P)
    offs = r[:, None] * P + ip[None, :]
    mask = r[:, None] < n_rows
    t = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SIGNS_IN:
        t = t * tl.load(s_ptr + ip)[None, :]
    t = _sylvester_tile(t, ha_ptr, hb_ptr, scale_a, scale_b, ROWS, A, B, IEEE)
    if SIGNS_OUT:
        t = t * tl.load(s_ptr + ip)[None, :]
    tl.store(y_ptr + offs, t.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dense_sylvester_kernel(x_ptr, y_ptr, s_ptr, l_ptr, ha_ptr, hb_ptr, n_rows, scale_a, scale_b,
                            D: tl.constexpr, DPAD: tl.constexpr, BM: tl.constexpr, A: tl.constexpr,
                            B: tl.constexpr, ROWS: tl.constexpr, SIGNS_IN: tl.constexpr, SIGNS_OUT: tl.constexpr,
                            IEEE: tl.constexpr):  # fmt: skip
    """Program ``pid = i·(DPAD/BM) + j``: rows [i·ROWS, i·ROWS + ROWS), dense rows [j·BM, j·BM + BM) of
    ``Y = L · X · H_p / sqrt(p)``. The dense blocks of one row block are neighbours in launch order, so the
    rows they all read stay in L2. The dot's N dimension is (row, p) with ROWS·P columns; L is (DPAD, DPAD),
    zero beyond d.
    """
    P: tl.constexpr = A * B
    N: tl.constexpr = D * P
    C: tl.constexpr = ROWS * P
    MBLOCKS: tl.constexpr = DPAD // BM
    pid = tl.program_id(0)
    ic = tl.arange(0, C)
    row = (pid // MBLOCKS).to(tl.int64) * ROWS + ic // P  # (C,)
    col = ic % P
    im = (pid % MBLOCKS) * BM + tl.arange(0, BM)
    row_ok = row[None, :] < n_rows
    acc = tl.zeros((BM, C), dtype=tl.float32)
    for k0 in range(0, DPAD, BM):
        ik = k0 + tl.arange(0, BM)
        mask = (ik[:, None] < D) & row_ok
        xt = tl.load(x_ptr + row[None, :] * N + ik[:, None] * P + col[None, :], mask=mask, other=0.0)
        if SIGNS_IN:
            xt = xt * tl.load(s_ptr + ik[:, None] * P + col[None, :], mask=ik[:, None] < D, other=0.0)
        lt = tl.load(l_ptr + im[:, None] * DPAD + ik[None, :])
        if IEEE:
            acc = tl.dot(lt, xt.to(lt.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(lt, xt.to(lt.dtype), acc)
    acc = tl.reshape(_sylvester_tile(tl.reshape(acc, (BM * ROWS, P)), ha_ptr, hb_ptr, scale_a, scale_b, BM * ROWS,
                                     A, B, IEEE), (BM, C))  # fmt: skip
    out_mask = (im[:, None] < D) & row_ok
    if SIGNS_OUT:
        acc = acc * tl.load(s_ptr + im[:, None] * P + col[None, :], mask=im[:, None] < D, other=0.0)
    tl.store(y_ptr + row[None, :] * N + im[:, None] * P + col[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=out_mask)  # fmt: skip


def _operands(transform, plan: KernelPlan, device, dtype, transposed: bool):
    """(L padded or None, H_a, H_b, signs as float32 or None) on (device, compute dtype), cached per transform."""
    key = ("triton", device, dtype, transposed)
    cache = transform._cache
    if key not in cache:
        to = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
        lpad = None
        if transform.dense is not None:
            dense = transform.dense if transposed else transform.dense.T
            lpad = torch.zeros(plan.dpad, plan.dpad, dtype=torch.float64)
            lpad[: plan.d, : plan.d] = dense
            lpad = to(lpad)
        signs = None if transform.signs is None else transform.signs.to(device=device, dtype=torch.float32)
        cache[key] = (lpad, to(sylvester(plan.a)), to(sylvester(plan.b)), signs)
    return cache[key]


def hadamard_triton(x: torch.Tensor, transform, *, transposed: bool = False) -> torch.Tensor:
    """``x @ R`` (or ``x @ Rᵀ``) along the last dim with the Triton kernel; x: (..., n), float32/16-bit.

    Raises ValueError when :func:`kernel_plan` returns None (use :func:`rolora_plugin.hadamard.kernels.dispatch_triton_hadamard`
    to fall back instead). Not differentiable by itself: ``OrthogonalTransform.apply`` wraps it in autograd.
    """
    plan = kernel_plan(transform)
    if plan is None:
        raise ValueError(f"the Triton Hadamard kernel does not cover width {transform.n} ({transform.description})")
    n = transform.n
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return y.reshape(x.shape)
    ieee = x.dtype == torch.float32
    lpad, ha, hb, signs = _operands(transform, plan, x.device, x.dtype, transposed)
    s_arg = signs if signs is not None else hb  # never read when the flags are off
    flags = dict(SIGNS_IN=signs is not None and not transposed, SIGNS_OUT=signs is not None and transposed, IEEE=ieee)
    scales = (1.0 / math.sqrt(plan.a), 1.0 / math.sqrt(plan.b))
    tile = plan.bm * plan.rows * plan.a * plan.b
    warps = 4 if tile <= 4096 else 8
    if lpad is None:
        grid = (triton.cdiv(n_rows, plan.rows),)
        _sylvester_kernel[grid](x2, y, s_arg, ha, hb, n_rows, *scales, A=plan.a, B=plan.b, ROWS=plan.rows,
                                num_warps=warps, **flags)  # fmt: skip
    else:
        grid = (triton.cdiv(n_rows, plan.rows) * (plan.dpad // plan.bm),)
        _dense_sylvester_kernel[grid](x2, y, s_arg, lpad, ha, hb, n_rows, *scales, D=plan.d, DPAD=plan.dpad,
                                      BM=plan.bm, A=plan.a, B=plan.b, ROWS=plan.rows, num_warps=warps,
                                      **flags)  # fmt: skip
    return y.reshape(x.shape)
