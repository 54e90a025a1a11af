"""The STE fast path of ``fake_quant`` (int specs, float clip ratio: what QAT and the activation quantizers run)
against the reference composition ``compute_qparams`` + ``quantize_with_params(..., ste=True)``: equal values and
equal gradients, every grid, with the rows that break the no-clamp argument (zeros, subnormals, NaN, inf)."""

import pytest
import torch

from rolora_plugin.quant.primitives import TensorQuant, _grouped_last, compute_qparams, fake_quant, quantize_with_params

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
WIDTHS = [64, 576, 1536]  # the test models' and SmolLM2's linear input widths


def reference(x: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    """The composition ``fake_quant`` used before the fast path (scales detached, ``_STEQuant``)."""
    xg = _grouped_last(x, spec.group_size)
    scale, zero = compute_qparams(xg, spec)
    return quantize_with_params(xg, scale, zero, spec, ste=True).reshape(x.shape)


def inputs(rows: int, width: int, dtype, seed: int, special: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g, dtype=torch.float64)
    x = x * torch.where(torch.rand(rows, width, generator=g, dtype=torch.float64) < 0.02, 8.0, 1.0)
    if special:
        x[0] = 0.0  # zero row: scale replaced by 1
        x[1] = x[1] * 2.0**-140  # subnormal float32 row max: its scale is not a normal float
        x[2, 3] = float("nan")
        x[3, 5] = float("inf")
        x[4, :] = torch.linspace(-7.5, 7.5, width, dtype=torch.float64)  # codes on rounding ties
    return x.to(dtype)


def quant_node(t: torch.Tensor):
    """The autograd node that quantized ``t`` (below the reshape views)."""
    node = t.grad_fn
    while type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        node = node.next_functions[0][0]
    return node


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


SPECS = [
    TensorQuant("int", 4, True, "narrow"),
    TensorQuant("int", 4, True, "full"),
    TensorQuant("int", 4, False, "narrow"),
    TensorQuant("int", 8, True, "narrow"),
    TensorQuant("int", 2, True, "narrow"),
    TensorQuant("int", 3, True, "narrow", clip_ratio=0.9),
    TensorQuant("int", 4, False, "narrow", clip_ratio=0.8),
    TensorQuant("int", 4, True, "narrow", group_size=16),
    TensorQuant("int", 4, True, "full", group_size=32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}{'s' if s.sym else 'a'}-{s.grid}-g{s.group_size}-c{s.clip_ratio}")
@pytest.mark.parametrize("special", [False, True])
def test_fast_ste_path_equals_the_reference_in_values_and_gradients(dtype, width, spec, special):
    x = inputs(6, width, dtype, seed=width + spec.bits, special=special).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    got, want = fake_quant(x, spec, ste=True), reference(x_ref, spec)
    assert type(quant_node(got)).__name__ == "_STEIntQuantBackward"  # the fast path ran
    assert type(quant_node(want)).__name__ == "_STEQuantBackward"
    assert_same(got, want)
    grad = inputs(6, width, dtype, seed=1, special=False)
    got.backward(grad)
    want.backward(grad)
    assert_same(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_path_keeps_batch_shapes_and_leaves_the_input_alone(dtype):
    """A 3-D activation (batch, tokens, width), as the linears see it; the input is not written to."""
    spec = TensorQuant("int", 4, True, "narrow")
    x = inputs(8, 576, dtype, seed=3, special=False).reshape(2, 4, 576)
    before = x.clone()
    out = fake_quant(x, spec, ste=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_same(out, reference(x, spec))
    assert_same(x, before)


def test_no_clamp_shortcut_is_only_taken_when_no_code_can_leave_the_grid():
    """Narrow grid, no clip: the clamp mask is skipped (identity backward) for finite rows with normal scales;
    a NaN / subnormal row makes the fast path form the mask and match the reference's zero gradients there."""
    spec = TensorQuant("int", 4, True, "narrow")
    x = inputs(6, 64, torch.float32, seed=5, special=False).requires_grad_()
    y = fake_quant(x, spec, ste=True)
    assert quant_node(y).saved_tensors == ()  # no mask kept
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    xs = inputs(6, 64, torch.float32, seed=5, special=True).requires_grad_()
    ys = fake_quant(xs, spec, ste=True)
    assert len(quant_node(ys).saved_tensors) == 1
    ys.sum().backward()
    xr = xs.detach().clone().requires_grad_()
    reference(xr, spec).sum().backward()
    assert_same(xs.grad, xr.grad)
    assert (xs.grad[2] == 0).any()  # the NaN row's scale is 1: large codes are clamped, their gradient is 0
