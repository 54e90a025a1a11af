"""What training LoRA in the rotated basis changes (issue 15's FP gap), float64.

R1 folds a reader's norm gain ``g`` and the rotation ``R`` into its frozen weight, and rotates an attached LoRA
``A`` the same way: ``A' = A diag(g) R`` (B is untouched on the input side). The rotated and unrotated models are
then the same function with the same LoRA init — only the parametrisation of ``A`` differs, by the fixed map
``M = diag(g) R``. Gradient descent is not invariant to it: ``∇_A' = ∇_A M^{-T}``, so an SGD step on ``A'`` maps
back to ``ΔA = -η ∇_A (M Mᵀ)^{-1} = -η ∇_A diag(1/g²)``. ``R`` drops out of SGD (only the folded gain acts, as a
per-channel preconditioner), while Adam's per-coordinate normalisation is taken in ``R``'s coordinates, so under
Adam the rotation itself changes the trajectory. The tests pin these identities on a real peft model; the
benchmark (benchmarks/RESULTS.md, finetune table) measures what they cost in FP perplexity and buy at W4A4.
"""

import copy

import pytest
import torch
from tests.helpers import F64_NORM_RTOL, float64_norms, lora, random_ids, rel_err, tiny_model

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin._peft import unwrap_peft
from rolora_plugin.model.architectures import get_architecture, get_submodule

pytest.importorskip("peft")
F64 = torch.float64
TARGETS = ["q_proj", "v_proj"]  # readers of the input norm: the layers whose A sees a folded gain
LR = 1e-2
EXACT = 1e3 * F64_NORM_RTOL  # a step and a forward of float64 rounding


@pytest.fixture(autouse=True)
def _float64_norms():
    """Stock HF RMSNorm computes in float32; in float64 the identities hold to rounding."""
    with float64_norms(tiny_model("llama")):
        yield


def _unrotated():
    model = tiny_model("llama", dtype=F64, seed=0)
    torch.manual_seed(5)
    return lora(model, TARGETS)  # B != 0: A gets gradients


def _rotated(model, seed):
    out = copy.deepcopy(model)
    rotate_model_(out, RotationConfig(seed=seed), progress=False)
    return out


def _lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def _backward(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def _step(model, ids, optimizer: str):
    _backward(model, ids)
    params = _lora_params(model)
    opt = torch.optim.SGD(params, lr=LR) if optimizer == "sgd" else torch.optim.Adam(params, lr=LR, eps=1e-30)
    opt.step()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _preconditioned_sgd_step(model, ids):
    """SGD on the unrotated model with every A's gradient multiplied by diag(1/g²), g = the reader's norm gain."""
    _backward(model, ids)
    inner = unwrap_peft(model)
    spec = get_architecture(inner)
    with torch.no_grad():
        for layer in spec.decoder_layers(inner):
            g2 = get_submodule(layer, spec.input_norm).weight.detach().pow(2)
            for name in TARGETS:
                mod = get_submodule(layer, f"self_attn.{name}")
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                a -= LR * a.grad / g2
                b -= LR * b.grad


def test_rotation_keeps_the_function_and_maps_the_lora_init():
    ids = random_ids(seed=1)
    plain = _unrotated()
    rot = _rotated(plain, seed=0)
    assert rel_err(_logits(rot, ids), _logits(plain, ids)) < EXACT


def test_sgd_in_the_rotated_basis_is_sgd_preconditioned_by_the_folded_gain():
    ids, probe = random_ids(seed=1), random_ids(seed=2)
    plain = _unrotated()
    rot = _rotated(plain, seed=0)
    reference = copy.deepcopy(plain)
    _step(rot, ids, "sgd")
    _step(plain, ids, "sgd")
    _preconditioned_sgd_step(reference, ids)
    assert rel_err(_logits(rot, probe), _logits(reference, probe)) < EXACT  # the identity, to rounding
    assert rel_err(_logits(rot, probe), _logits(plain, probe)) > 1e-3  # plain SGD is another step: g is not 1 (measured ~1e-2)


def test_the_rotation_drops_out_of_sgd_but_not_out_of_adam():
    ids, probe = random_ids(seed=1), random_ids(seed=2)
    plain = _unrotated()
    out = {}
    for optimizer in ("sgd", "adam"):
        a, b = _rotated(plain, seed=0), _rotated(plain, seed=1)  # two different random Hadamard rotations
        _step(a, ids, optimizer)
        _step(b, ids, optimizer)
        out[optimizer] = rel_err(_logits(a, probe), _logits(b, probe))
    assert out["sgd"] < EXACT, out
    assert out["adam"] > 1e-3, out  # (measured ~0.2) Adam normalises per coordinate, and the coordinates are R's
