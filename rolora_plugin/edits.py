"""In-place edits of weight matrices, ``W ← Lᵀ · (W diag(s)) · R``, computed in a higher precision: the engine of
the rotation pass (:mod:`rolora_plugin.rotation`, :mod:`rolora_plugin.streaming`, :mod:`rolora_plugin.moe`).

An op is an :class:`AxisOp` (an :class:`~rolora_plugin.hadamard.OrthogonalTransform` on every block of its width
along an axis, optionally on a slice of it) or any callable ``x ↦ op(x)`` along the last dim. ``right`` acts on
W's rows (``w ← w·R``), ``left`` on its columns (``W ← Lᵀ W``, i.e. ``left`` applied to Wᵀ).

Two paths compute the same thing:

* :func:`edit_reference`: the definition. Casts, scales and applies the ops as separate tensor operations and
  applies ``left`` to a transposed copy. Any op.
* :func:`edit_`: the fast path, taken when both ops are :class:`AxisOp` s (or a transform's bound ``apply``).

  - the weight is cast into a reused workspace and scaled by ``s·signs`` in one in-place multiply (``(w·s)·σ =
    w·(s·σ)`` exactly, σ = ±1; a single mixed-dtype ``torch.mul(..., out=)`` measured 3-4× slower than the cast
    and a same-dtype multiply);
  - the Kronecker stages of the transform (:func:`rolora_plugin.hadamard._kron_apply`'s GEMMs, same factors,
    same order) run into two workspaces used in turn (``matmul(..., out=)``: no fresh allocation per stage);
  - ``left`` is applied on the row axis (``Lᵀ W = Kᵀ diag(σ) W``: factor ``M_i`` contracts row axis ``i`` as a
    GEMM from the left) instead of on a transposed copy, so no transposed copies are made.

  The float32 results equal the reference's except where the float64 sums are added in another order (the left
  side's GEMMs contract the other operand): at most 1 ulp, tested for every width of the Hadamard test list (tests/core/test_edits.py).

Matrices above ``_CHUNK_ELEMENTS`` are processed in chunks of rows (``right``), then of columns (``left``), so the
extra memory is two workspaces of at most ``_CHUNK_ELEMENTS`` elements of the compute dtype (8 MiB each in float64).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable

import torch

from .hadamard import OrthogonalTransform

__all__ = ["AxisOp", "edit_", "edit_reference", "headwise", "on_slice", "as_axis_op", "shared_workspaces"]

_CHUNK_ELEMENTS = 1 << 20  # elements per workspace (8 MiB in float64)
_POOL: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rolora_edit_workspaces", default=None)


@contextlib.contextmanager
def shared_workspaces():
    """Within the block, :func:`edit_` calls share one pair of workspaces per (dtype, device), freed on exit.

    A rotation pass (:func:`rolora_plugin.rotate_model_`, :func:`rolora_plugin.rotate_checkpoint`) runs inside one.
    Scoped to the block and to the current thread/task (a :class:`contextvars.ContextVar`): nothing outlives it.
    """
    if _POOL.get() is not None:  # nested: the outer block's pool serves
        yield
        return
    token = _POOL.set({})
    try:
        yield
    finally:
        _POOL.reset(token)


@dataclass(frozen=True, eq=False)
class AxisOp:
    """``x ↦ x·R`` (``x·Rᵀ`` if ``transposed``) on every consecutive block of ``t.n`` along the last axis of
    ``x[..., start:stop]``; the rest of the axis is left as it is. Callable (the reference semantics)."""

    t: OrthogonalTransform
    transposed: bool = False
    start: int = 0
    stop: int | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == 0 and self.stop is None:
            return self._blocks(x)
        stop = x.shape[-1] if self.stop is None else self.stop
        return torch.cat([x[..., : self.start], self._blocks(x[..., self.start : stop]), x[..., stop:]], dim=-1)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(*x.shape[:-1], -1, self.t.n)
        y = self.t.apply_transposed(y) if self.transposed else self.t.apply(y)
        return y.reshape(x.shape)

    def span(self, width: int) -> tuple[int, int]:
        return self.start, width if self.stop is None else self.stop


def headwise(t: OrthogonalTransform, transposed: bool = False) -> AxisOp:
    """``t`` applied per head: on every block of ``t.n`` (the head dim) of the axis."""
    return AxisOp(t, transposed)


def on_slice(op: AxisOp, start: int, stop: int) -> AxisOp:
    """``op`` on ``[start, stop)`` of the axis only (e.g. the value rows of a fused qkv projection)."""
    if op.start or op.stop is not None:
        raise ValueError("on_slice of an op that is already sliced")
    return AxisOp(op.t, op.transposed, start, stop)


def as_axis_op(op) -> AxisOp | None:
    """``op`` as an :class:`AxisOp` when it is one or a transform's bound ``apply``/``apply_transposed``; else None."""
    if isinstance(op, AxisOp):
        return op
    owner, func = getattr(op, "__self__", None), getattr(op, "__func__", None)
    if isinstance(owner, OrthogonalTransform) and func in (OrthogonalTransform.apply, OrthogonalTransform.apply_transposed):
        return AxisOp(owner, func is OrthogonalTransform.apply_transposed)
    return None


# ------------------------------------------------------------------------------------------------- reference


def edit_reference(weight: torch.Tensor, cdtype, *, scale=None, right: Callable | None = None, left: Callable | None = None,
                   chunk: int | None = None) -> None:  # fmt: skip
    """In place: ``W ← left_opᵀ · (W diag(scale)) · right_op`` computed in ``cdtype``, cast back to W's dtype.

    ``right(x)`` and ``left(x)`` act along the last dim (``left`` on Wᵀ). Large weights are processed in chunks
    of rows (then columns) of at most ``chunk`` elements, so no full high-precision copy of a big matrix is made.
    """
    chunk = chunk or _CHUNK_ELEMENTS
    rows, cols = weight.shape
    with torch.no_grad():
        if rows * cols <= chunk:  # one pass, one rounding
            x = _scaled(weight.to(cdtype), scale, right)
            weight.copy_(left(x.T.contiguous()).T if left is not None else x)
            return
        if right is not None or scale is not None:
            step = max(1, chunk // cols)
            for i in range(0, rows, step):
                weight[i : i + step].copy_(_scaled(weight[i : i + step].to(cdtype), scale, right))
        if left is not None:
            step = max(1, chunk // rows)
            for j in range(0, cols, step):
                x = weight[:, j : j + step].to(cdtype).T.contiguous()
                weight[:, j : j + step].copy_(left(x).T)


def _scaled(x, scale, right):
    if scale is not None:
        x = x * scale
    return right(x) if right is not None else x


# ------------------------------------------------------------------------------------------------- fast path


def edit_(weight: torch.Tensor, cdtype, *, scale=None, right: Callable | None = None, left: Callable | None = None,
          chunk: int | None = None) -> None:  # fmt: skip
    """:func:`edit_reference`'s result (to 1 ulp) without its temporaries; see the module docstring.

    Falls back to the reference for ops that are not :class:`AxisOp` s, a sliced ``right``, or a weight that is
    not a contiguous matrix.
    """
    r = as_axis_op(right) if right is not None else None
    lo = as_axis_op(left) if left is not None else None
    if (right is not None and (r is None or r.start or r.stop is not None)) or (left is not None and lo is None) \
            or weight.dim() != 2 or not weight.is_contiguous():  # fmt: skip
        return edit_reference(weight, cdtype, scale=scale, right=right, left=left, chunk=chunk)
    if r is None and lo is None and scale is None:
        return None
    chunk = chunk or _CHUNK_ELEMENTS
    rows, cols = weight.shape
    _check_width(r, cols, "columns")
    _check_width(lo, rows, "rows")
    if scale is not None:
        scale = scale.to(device=weight.device, dtype=cdtype)
    with torch.no_grad():
        if rows * cols <= chunk:
            ws = _Workspaces(rows * cols, cdtype, weight.device)
            _edit_block(weight, ws, cdtype, scale, r, lo)
            return None
        if r is not None or scale is not None:
            step = max(1, chunk // cols)
            ws = _Workspaces(min(rows, step) * cols, cdtype, weight.device)
            for i in range(0, rows, step):
                _edit_block(weight[i : i + step], ws, cdtype, scale, r, None)
        if lo is not None:
            start, stop = lo.span(rows)
            step = max(1, chunk // (stop - start))
            ws = _Workspaces((stop - start) * min(cols, step), cdtype, weight.device)
            for j in range(0, cols, step):
                _edit_block(weight[:, j : j + step], ws, cdtype, None, None, lo)
    return None


def _check_width(op: AxisOp | None, width: int, axis: str) -> None:
    if op is None:
        return
    start, stop = op.span(width)
    if not 0 <= start < stop <= width or (stop - start) % op.t.n:
        raise ValueError(f"a transform of width {op.t.n} on {axis} [{start}, {stop}) of a weight with {width} {axis}: the span "
                         f"must lie inside and be a multiple of {op.t.n}")  # fmt: skip


class _Workspaces:
    """Two flat buffers of ``n`` elements of the compute dtype; the GEMM stages write into them in turn.

    Inside :func:`shared_workspaces` the buffers come from the pass's pool (allocated once, grown to the largest
    request) instead of being allocated per call: repeated allocations of varying size fragment the heap, which
    measured ~20 MiB of extra peak RSS over a SmolLM2 pass."""

    def __init__(self, n: int, dtype, device):
        pool = _POOL.get()
        if pool is None:
            self.bufs = (torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device))
            return
        key = (dtype, torch.device(device))
        have = pool.get(key)
        if have is None or have[0].numel() < n:
            pool.pop(key, None)  # free the smaller pair before the larger one is allocated
            have = pool[key] = (torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device))
        self.bufs = have

    def view(self, k: int, shape) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        return self.bufs[k][:numel].view(shape)


def _edit_block(w: torch.Tensor, ws: _Workspaces, cdtype, scale, r: AxisOp | None, lo: AxisOp | None) -> None:
    """One block of W (a contiguous row block, or a strided column block when only ``lo`` applies), in place."""
    rows, cols = w.shape
    cur = 0
    if r is not None or scale is not None:  # input side: cast·scale·signs in one pass, then the stages
        x = ws.view(0, (rows, cols))
        mats, signs = r.t._factors(w.device, cdtype) if r is not None else ([], None)
        vec = scale
        if signs is not None and not r.transposed:
            blocked = signs.repeat(cols // r.t.n)
            vec = blocked if vec is None else vec * blocked
        x.copy_(w)  # mixed-dtype ops run 3-4x slower than a cast then a same-dtype op (measured)
        if vec is not None:
            x.mul_(vec)
        if r is not None:
            cur = _right_stages(ws, cur, rows * cols, mats, r.transposed)
            x = ws.view(cur, (rows, cols))
            if signs is not None and r.transposed:
                x.mul_(signs.repeat(cols // r.t.n))
    elif lo is not None:
        start, stop = lo.span(rows)
        signs = lo.t._factors(w.device, cdtype)[1]
        x = ws.view(0, (stop - start, cols))
        x.copy_(w[start:stop])
        if signs is not None and not lo.transposed:  # Lᵀ W = Kᵀ diag(σ) W: the signs come first
            x.mul_(signs.repeat((stop - start) // lo.t.n).unsqueeze(1))
        cur = _left_stages(ws, 0, stop - start, cols, lo)
        _write_rows(w[start:stop], ws.view(cur, (stop - start, cols)), lo, w.device, cdtype)
        return
    if lo is None:
        w.copy_(x)
        return
    # both sides in one block: x (rows, cols) holds the input-side result in buffer `cur`
    start, stop = lo.span(rows)
    n_sel = stop - start
    sel = x[start:stop]
    signs = lo.t._factors(w.device, cdtype)[1]
    other = 1 - cur
    y = ws.view(other, (n_sel, cols))
    y.copy_(sel)
    if signs is not None and not lo.transposed:
        y.mul_(signs.repeat(n_sel // lo.t.n).unsqueeze(1))
    if start:
        w[:start].copy_(x[:start])
    if stop < rows:
        w[stop:].copy_(x[stop:])
    res = _left_stages(ws, other, n_sel, cols, lo)
    _write_rows(w[start:stop], ws.view(res, (n_sel, cols)), lo, w.device, cdtype)


def _right_stages(ws: _Workspaces, cur: int, total: int, mats: list, transposed: bool) -> int:
    """``_kron_apply``'s stages on the first ``total`` elements of buffer ``cur``; returns the result's buffer."""
    after = 1
    for i, m in enumerate(reversed(mats)):
        s = m.shape[0]
        src = ws.view(cur, (total // s, s) if i == 0 else (total // (s * after), s, after))
        dst = ws.view(1 - cur, src.shape)
        if i == 0:
            torch.matmul(src, m.T if transposed else m, out=dst)
        else:
            torch.matmul((m if transposed else m.T).contiguous(), src, out=dst)
        cur = 1 - cur
        after *= s
    return cur


def _left_stages(ws: _Workspaces, cur: int, n_sel: int, cols: int, lo: AxisOp) -> int:
    """``Lᵀ`` on the row axis of buffer ``cur`` (n_sel, cols): the factors of every block contract their row axis,
    ``M_iᵀ`` (``x·R``) or ``M_i`` (``x·Rᵀ``) from the left. Signs are the caller's. Returns the result's buffer."""
    mats = lo.t._factors(ws.bufs[0].device, ws.bufs[0].dtype)[0]
    sizes = [m.shape[0] for m in mats]
    total = n_sel * cols
    after = cols
    for m, s in zip(reversed(mats), reversed(sizes)):
        src = ws.view(cur, (total // (s * after), s, after))
        dst = ws.view(1 - cur, src.shape)
        a = (m.T if not lo.transposed else m).contiguous()
        torch.matmul(a, src, out=dst)
        cur = 1 - cur
        after *= s
    return cur


def _write_rows(dest: torch.Tensor, src: torch.Tensor, lo: AxisOp, device, cdtype) -> None:
    """Write the left side's result back; ``Lᵀ W = diag(σ) K W`` for ``x·Rᵀ``: its signs are fused here."""
    signs = lo.t._factors(device, cdtype)[1]
    if signs is not None and lo.transposed:
        src.mul_(signs.repeat(src.shape[0] // lo.t.n).unsqueeze(1))
    dest.copy_(src)
