"""In-place edits of weight matrices, ``W ← Lᵀ · (W diag(s)) · R``, computed in a higher precision: the engine of
the rotation pass (:mod:`rolora_plugin.rotate.rotation`, :mod:`rolora_plugin.io.streaming`, :mod:`rolora_plugin.rotate.moe`).

An op is an :class:`AxisOp` (an :class:`~rolora_plugin.hadamard.transform.OrthogonalTransform` on every block of its width
along an axis, optionally on a slice of it) or any callable ``x ↦ op(x)`` along the last dim. ``right`` acts on
W's rows (``w ← w·R``), ``left`` on its columns (``W ← Lᵀ W``, i.e. ``left`` applied to Wᵀ).

Two paths compute the same thing:

* :func:`edit_reference`: the definition. Casts, scales and applies the ops as separate tensor operations and
  applies ``left`` to a transposed copy. Any op.
* :func:`edit_`: the fast path, taken when both ops are :class:`AxisOp` s (or a transform's bound ``apply``).

  - the weight is cast into a reused workspace and scaled by ``s·signs`` in one in-place multiply (``(w·s)·σ =
    w·(s·σ)`` exactly, σ = ±1; a single mixed-dtype ``torch.mul(..., out=)`` measured 3-4× slower than the cast
    and a same-dtype multiply);
  - the Kronecker stages of the transform (:func:`rolora_plugin.hadamard.transform._kron_apply`'s GEMMs, same factors,
    same order) run into two workspaces used in turn (``matmul(..., out=)``: no fresh allocation per stage);
  - ``left`` is applied on the row axis (``Lᵀ W = Kᵀ diag(σ) W``: factor ``M_i`` contracts row axis ``i`` as a
    GEMM from the left) instead of on a transposed copy, so no transposed copies are made.

  The float32 results equal the reference's except where the float64 sums are added in another order (the left
  side's GEMMs contract the other operand): at most 1 ulp, tested for every width of the Hadamard test list (tests/core/test_edits.py).

Matrices above ``_CHUNK_ELEMENTS`` are processed in chunks of rows (``right``), then of columns (``left``): the extra
memory is two workspaces of ``_CHUNK_ELEMENTS`` elements of the compute dtype (2 MiB each in float64), plus, for a
weight edited on both sides with at most ``_SINGLE_PASS_ELEMENTS``, one buffer holding its input-side result so it
is rounded once (as the reference does). On SmolLM2 the pass's float32 result is bitwise the one of the path before
this engine (measured: 0 of 163 M elements differ).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable

import torch

from .transform import OrthogonalTransform

__all__ = ["AxisOp", "edit_", "edit_reference", "headwise", "on_slice", "as_axis_op", "shared_workspaces"]

_CHUNK_ELEMENTS = 1 << 18  # elements per workspace of a chunked edit (2 MiB in float64)
# A weight edited on both sides is rounded once when it has at most this many elements (its input-side result is kept
# in one compute-dtype buffer, 32 MiB in float64 at most), else twice: after the input side, then after the output
# side (rows and columns in chunks). Both paths follow this rule, so they round alike.
_SINGLE_PASS_ELEMENTS = 1 << 22
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
                   chunk: int | None = None, single_pass: int | None = None) -> None:  # fmt: skip
    """In place: ``W ← left_opᵀ · (W diag(scale)) · right_op`` computed in ``cdtype``, cast back to W's dtype.

    ``right(x)`` and ``left(x)`` act along the last dim (``left`` on Wᵀ). A weight of at most ``single_pass``
    elements is computed in one pass (one rounding); a larger one in chunks of rows (then columns) of at most
    ``chunk`` elements, so no full high-precision copy of a big matrix is made.
    """
    chunk = chunk or _CHUNK_ELEMENTS
    single_pass = single_pass or _SINGLE_PASS_ELEMENTS
    rows, cols = weight.shape
    with torch.no_grad():
        if rows * cols <= single_pass:  # one pass, one rounding
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
          chunk: int | None = None, single_pass: int | None = None) -> None:  # fmt: skip
    """:func:`edit_reference`'s result (to 1 ulp) without its temporaries; see the module docstring.

    Falls back to the reference for ops that are not :class:`AxisOp` s, a sliced ``right``, or a weight that is
    not a contiguous matrix.
    """
    r = as_axis_op(right) if right is not None else None
    lo = as_axis_op(left) if left is not None else None
    if (right is not None and (r is None or r.start or r.stop is not None)) or (left is not None and lo is None) \
            or weight.dim() != 2 or not weight.is_contiguous():  # fmt: skip
        return edit_reference(weight, cdtype, scale=scale, right=right, left=left, chunk=chunk, single_pass=single_pass)
    if r is None and lo is None and scale is None:
        return None
    chunk = chunk or _CHUNK_ELEMENTS
    single_pass = single_pass or _SINGLE_PASS_ELEMENTS
    rows, cols = weight.shape
    _check_width(r, cols, "columns")
    _check_width(lo, rows, "rows")
    plan = _Plan(weight, cdtype, scale, r, lo)
    with torch.no_grad():
        if rows * cols <= chunk:
            _edit_block(weight, _Workspaces(rows * cols, cdtype, weight.device), plan)
        elif plan.input_side and lo is not None and rows * cols <= single_pass:
            _edit_two_sided(weight, plan, chunk)
        else:
            if plan.input_side:
                step = max(1, chunk // cols)
                ws = _Workspaces(min(rows, step) * cols, cdtype, weight.device)
                for i in range(0, rows, step):
                    _edit_block(weight[i : i + step], ws, plan, output_side=False)
            if lo is not None:
                step = max(1, chunk // plan.n_sel)
                ws = _Workspaces(plan.n_sel * min(cols, step), cdtype, weight.device)
                for j in range(0, cols, step):
                    _edit_block(weight[:, j : j + step], ws, plan, input_side=False)
    return None


class _Plan:
    """What one edit needs, computed once per weight (not per chunk): the input-side vector ``scale·signs`` (or the
    trailing signs of ``x·Rᵀ``), the stage matrices in the order and layout the GEMMs take, the output side's span
    and its row signs."""

    def __init__(self, w: torch.Tensor, cdtype, scale, r: AxisOp | None, lo: AxisOp | None):
        rows, cols = w.shape
        self.cdtype = cdtype
        self.input_side = r is not None or scale is not None
        self.in_vec = None if scale is None else scale.to(device=w.device, dtype=cdtype)
        self.in_post = None
        self.r_first, self.r_rest = None, []
        if r is not None:
            mats, signs = r.t._factors(w.device, cdtype)
            if signs is not None:
                blocked = signs.repeat(cols // r.t.n)
                if r.transposed:
                    self.in_post = blocked
                else:
                    self.in_vec = blocked if self.in_vec is None else self.in_vec * blocked
            rev = list(reversed(mats))  # _kron_apply's order: the last factor as one GEMM from the right, then the rest
            if rev:
                self.r_first = rev[0].T if r.transposed else rev[0]
                self.r_rest = [(m if r.transposed else m.T).contiguous() for m in rev[1:]]
        self.lo = lo
        if lo is not None:
            self.start, self.stop = lo.span(rows)
            self.n_sel = self.stop - self.start
            mats, signs = lo.t._factors(w.device, cdtype)
            rows_signs = None if signs is None else signs.repeat(self.n_sel // lo.t.n).unsqueeze(1)
            self.lo_pre = rows_signs if not lo.transposed else None  # Lᵀ W = Kᵀ diag(σ) W: the signs come first
            self.lo_post = rows_signs if lo.transposed else None  # R W = diag(σ) K W: they come last
            self.lo_mats = [(m if lo.transposed else m.T).contiguous() for m in reversed(mats)]


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

    def __init__(self, n: int, dtype, device, count: int = 2):
        pool = _POOL.get()
        if pool is None:
            self.bufs = tuple(torch.empty(n, dtype=dtype, device=device) for _ in range(count))
            return
        key = (dtype, torch.device(device), count)
        have = pool.get(key)
        if have is None or have[0].numel() < n:
            pool.pop(key, None)  # free the smaller buffers before the larger ones are allocated
            have = pool[key] = tuple(torch.empty(n, dtype=dtype, device=device) for _ in range(count))
        self.bufs = have

    def view(self, k: int, shape) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        return self.bufs[k][:numel].view(shape)


def _edit_block(w: torch.Tensor, ws: _Workspaces, plan: _Plan, *, input_side: bool = True, output_side: bool = True) -> None:
    """One block of W in place: a contiguous row block (input side, and the output side when the block holds every
    row), or a strided column block (output side only)."""
    if not (input_side and plan.input_side):
        _output_side(w[plan.start : plan.stop], w[plan.start : plan.stop], ws, 0, plan)
        return
    cur = _input_side(w, ws, plan)
    x = ws.view(cur, w.shape)
    if not (output_side and plan.lo is not None):
        w.copy_(x)
        return
    _copy_outside_span(w, x, plan)
    _output_side(w[plan.start : plan.stop], x[plan.start : plan.stop], ws, 1 - cur, plan)


def _copy_outside_span(w: torch.Tensor, x: torch.Tensor, plan: _Plan) -> None:
    """Rows of the input-side result ``x`` that the output side does not touch, written back to W."""
    if plan.start:
        w[: plan.start].copy_(x[: plan.start])
    if plan.stop < w.shape[0]:
        w[plan.stop :].copy_(x[plan.stop :])


def _output_side(dest: torch.Tensor, src: torch.Tensor, ws: _Workspaces, buf: int, plan: _Plan) -> None:
    """``dest ← Lᵀ src`` for the span's rows ``src`` (n_sel, k): copied into workspace ``buf`` (with the leading row
    signs of ``x·R``: ``Lᵀ W = Kᵀ diag(σ) W``), the stages, then written back (with the trailing ones of ``x·Rᵀ``)."""
    k = src.shape[1]
    y = ws.view(buf, (plan.n_sel, k))
    y.copy_(src)
    if plan.lo_pre is not None:
        y.mul_(plan.lo_pre)
    res = ws.view(_left_stages(ws, buf, k, plan), (plan.n_sel, k))
    if plan.lo_post is not None:
        res.mul_(plan.lo_post)
    dest.copy_(res)


def _input_side(w: torch.Tensor, ws: _Workspaces, plan: _Plan) -> int:
    """``(W diag(scale))·R`` of the contiguous row block ``w`` into the workspaces: cast, scale·signs in one
    multiply, then the stages. Returns the buffer holding the result."""
    rows, cols = w.shape
    total = rows * cols
    x = ws.view(0, (rows, cols))
    x.copy_(w)  # mixed-dtype ops run 3-4x slower than a cast then a same-dtype op (measured)
    if plan.in_vec is not None:
        x.mul_(plan.in_vec)
    if plan.r_first is None:
        return 0
    s = plan.r_first.shape[0]
    torch.matmul(ws.view(0, (total // s, s)), plan.r_first, out=ws.view(1, (total // s, s)))
    cur, after = 1, s
    for m in plan.r_rest:
        s = m.shape[0]
        shape = (total // (s * after), s, after)
        torch.matmul(m, ws.view(cur, shape), out=ws.view(1 - cur, shape))
        cur, after = 1 - cur, after * s
    if plan.in_post is not None:
        ws.view(cur, (rows, cols)).mul_(plan.in_post)
    return cur


def _edit_two_sided(w: torch.Tensor, plan: _Plan, chunk: int) -> None:
    """Both sides with one rounding and small workspaces: the input side row chunk by row chunk into one full
    compute-dtype buffer, then the output side column chunk by column chunk from it, written back to W."""
    rows, cols = w.shape
    cdtype = plan.cdtype
    full = _Workspaces(rows * cols, cdtype, w.device, count=1).view(0, (rows, cols))
    step = max(1, chunk // cols)
    ws = _Workspaces(min(rows, step) * cols, cdtype, w.device)
    for i in range(0, rows, step):
        n = min(step, rows - i)
        cur = _input_side(w[i : i + n], ws, plan)
        full[i : i + n].copy_(ws.view(cur, (n, cols)))
    _copy_outside_span(w, full, plan)
    step = max(1, chunk // plan.n_sel)
    ws = _Workspaces(plan.n_sel * min(cols, step), cdtype, w.device)
    for j in range(0, cols, step):
        _output_side(w[plan.start : plan.stop, j : j + step], full[plan.start : plan.stop, j : j + step], ws, 0, plan)


def _left_stages(ws: _Workspaces, cur: int, cols: int, plan: _Plan) -> int:
    """``Lᵀ`` on the row axis of buffer ``cur`` viewed as (n_sel, cols): the factors of every block contract their
    row axis, ``M_iᵀ`` (``x·R``) or ``M_i`` (``x·Rᵀ``) from the left. Returns the result's buffer."""
    total, after = plan.n_sel * cols, cols
    for a in plan.lo_mats:
        s = a.shape[0]
        shape = (total // (s * after), s, after)
        torch.matmul(a, ws.view(cur, shape), out=ws.view(1 - cur, shape))
        cur, after = 1 - cur, after * s
    return cur
