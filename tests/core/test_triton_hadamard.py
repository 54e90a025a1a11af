"""The Triton online-Hadamard kernel against the float64 reference, on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the kernel runs in a child process
(``python -m tests.core.test_triton_hadamard``, this file's ``__main__``) that compares it with
``hadamard_transform_ref`` for every width in the test list, float32, float16 and bfloat16, both directions, and
prints the relative errors as JSON; the parametrized tests below check them against ``TRANSFORM_RTOL``.

bfloat16: Triton 3.9's interpreter feeds bfloat16 ``tl.dot`` operands to numpy as their raw uint16 bits (it
converts fp8 operands, not bf16), so every bf16 dot comes out wrong there. The child checks that on a 16×16 dot
and only then decodes bf16 dot operands to float32 before the interpreter's matmul, which is what the GPU's bf16
dot computes (exact products, float32 accumulation). Loads, casts, signs, stores and the kernel's control flow
run unpatched; float16 needs no patch and is the unpatched 16-bit check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rolora_plugin.hadamard.transform import build_transform, hadamard_transform_ref
from rolora_plugin.hadamard.kernels import dispatch_triton_hadamard, is_triton_available
from tests.core.test_hadamard import WIDTHS
from tests.helpers import TRANSFORM_RTOL, rel_err

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROWS = 3  # few tokens: the interpreter runs every program in Python; 3 rows also exercise the row masks


def _patch_interpreter_bf16_dot() -> bool:
    """Decode bf16 ``tl.dot`` operands in the interpreter when (and only when) it gets a bf16 dot wrong."""
    import numpy as np
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def dot16(a_ptr, b_ptr, c_ptr):
        i = tl.arange(0, 16)
        offs = i[:, None] * 16 + i[None, :]
        tl.store(c_ptr + offs, tl.dot(tl.load(a_ptr + offs), tl.load(b_ptr + offs)))

    a, b = torch.eye(16, dtype=torch.bfloat16), torch.full((16, 16), 2.0, dtype=torch.bfloat16)
    c = torch.empty(16, 16, dtype=torch.float32)
    dot16[(1,)](a, b, c)
    if torch.equal(c, torch.full((16, 16), 2.0)):
        return False
    original = interpreter.InterpreterBuilder.create_dot

    def decode(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, decode(a), decode(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    return True


def _interpreter_errors() -> dict:
    """Run in the child (TRITON_INTERPRET=1): relative errors of the kernel for every width, dtype, direction."""
    from rolora_plugin.hadamard.kernels.triton_hadamard import hadamard_triton

    patched = _patch_interpreter_bf16_dot()
    errors = {}
    for n in WIDTHS:
        t = build_transform(n, random_signs=True, seed=5)
        x = torch.randn(ROWS, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        y = hadamard_transform_ref(x, t)
        for name, dtype in DTYPES.items():
            forward = rel_err(hadamard_triton(x.to(dtype), t), y)
            # x R Rᵀ = x: the transposed kernel maps the reference's output back
            back = rel_err(hadamard_triton(y.to(dtype), t, transposed=True), x)
            errors[f"{n}/{name}"] = {"forward": forward, "transposed": back}
    return {"bf16_dot_patched": patched, "errors": errors}


@pytest.fixture(scope="module")
def interpreter_results():
    if not is_triton_available():
        pytest.skip("triton is not installed (pip install triton==3.9.0)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.core.test_triton_hadamard"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", WIDTHS)
def test_triton_kernel_matches_reference_in_interpreter(interpreter_results, n, dtype):
    err = interpreter_results["errors"][f"{n}/{dtype}"]
    tol = TRANSFORM_RTOL[DTYPES[dtype]]
    assert err["forward"] <= tol and err["transposed"] <= tol, err


def test_kernel_covers_the_test_widths_and_declines_the_rest():
    if not is_triton_available():
        pytest.skip("triton is not installed")
    from rolora_plugin.hadamard.kernels.triton_hadamard import hadamard_triton, kernel_plan

    for n in WIDTHS:
        plan = kernel_plan(build_transform(n))
        assert plan is not None and plan.d * plan.a * plan.b == n and plan.dpad % plan.bm == 0
    for n in (172, 2752, 12):  # Sylvester part 4, 8, 1: below tl.dot's minimum of 16, the PyTorch path serves them
        assert kernel_plan(build_transform(n)) is None
        with pytest.raises(ValueError, match="does not cover"):
            hadamard_triton(torch.zeros(1, n), build_transform(n))


def test_cpu_tensors_never_take_the_kernel():
    t = build_transform(1536, random_signs=True, seed=0)
    assert dispatch_triton_hadamard(torch.randn(2, 1536), t, False) is None
    assert isinstance(is_triton_available(), bool)


@pytest.mark.gpu
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_apply_takes_the_kernel_and_matches_reference(cuda_device, n, dtype):
    if not is_triton_available():
        pytest.skip("triton is not installed")
    t = build_transform(n, random_signs=True, seed=6)
    x = torch.randn(37, n, dtype=torch.float64, device=cuda_device)
    assert dispatch_triton_hadamard(x.to(dtype), t, False) is not None
    xd = x.to(dtype).requires_grad_(True)
    y = t.apply(xd)
    assert rel_err(y, hadamard_transform_ref(x, t)) <= TRANSFORM_RTOL[dtype]
    (g,) = torch.autograd.grad(y.float().sum(), xd)
    assert rel_err(g, t.apply_transposed(torch.ones_like(xd))) <= TRANSFORM_RTOL[dtype]


if __name__ == "__main__":
    print(json.dumps(_interpreter_errors()))
