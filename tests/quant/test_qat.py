"""Fake-quant training (QAT): the LoRA-factor STE backward and the fake-quantized forward of a LoRA model."""

import copy

import pytest
import torch
import torch.nn.functional as F

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.quant import QuantConfig, enable_fake_quant_, fake_quant_active, fake_quantized, quantize_model_, quantize_weight
from rolora_plugin.quant.qat import _FakeQuantLoRALinear
from tests.helpers import logits, lora, random_ids, rel_err, tiny_model

FP32_MERGE_RTOL = 1e-5  # issue 4 acceptance: LoRA forward vs merged forward in float32
ALL_ROTATIONS = RotationConfig(r2=True, r3=True)


def quant_config(w_bits: int, a_bits: int) -> QuantConfig:
    """The fake-quant setting QAT uses by default: RTN, per channel, symmetric, nothing skipped."""
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, skip=())


def test_fake_quant_lora_backward_equals_ste_through_the_effective_weight():
    """The LoRA-factor backward == autograd through Q_w(W + Σ s B A) with an identity STE (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(24, 32, dtype=torch.float64, generator=g)
    factors = [torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_() for shape in ((4, 32), (24, 4), (2, 32), (24, 2))]
    scalings = [0.5, 2.0]

    def quantize(m):
        return quantize_weight(m, 4, 8, ste=True)

    y = _FakeQuantLoRALinear.apply(x, w, quantize, scalings, *factors)
    a1, b1, a2, b2 = factors
    ref = F.linear(x, quantize(w + 0.5 * b1 @ a1 + 2.0 * b2 @ a2))  # no clipping: quant.py's STE is the identity here
    grad = torch.randn(y.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(y, [x, *factors], grad)
    want = torch.autograd.grad(ref, [x, *factors], grad)
    assert rel_err(y, ref) <= 1e-12
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_fake_quantized_peft_model_equals_merged_then_quantize_model(family):
    """W4A4 fake quant of a LoRA model (after the online R4) == merge + quant.py's quantize_model_ (RTN W4A4)."""
    ids = random_ids()
    model = tiny_model(family)
    rotate_model_(model, ALL_ROTATIONS, progress=False)
    peft_model = lora(model, "all-linear")
    fp = logits(peft_model, ids)
    with fake_quantized(peft_model, quant_config(4, 4)):
        fq = logits(peft_model, ids)
    assert not fake_quant_active(peft_model) and rel_err(logits(peft_model, ids), fp) == 0
    merged = copy.deepcopy(peft_model).merge_and_unload()
    quantize_model_(merged, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert rel_err(fq, logits(merged, ids)) <= FP32_MERGE_RTOL
    assert rel_err(fq, fp) > 100 * FP32_MERGE_RTOL
    handle = enable_fake_quant_(peft_model, quant_config(4, 4), targets="lora")
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_fake_quant_(peft_model, quant_config(4, 4))
    handle.remove()


def test_library_code_never_calls_the_deprecated_fake_quantize_aliases():
    """QAT forward + backward, the fake-quant context and quantize_model_ (activations and KV) emit no alias warning."""
    import warnings

    model = tiny_model("llama", tie=False)
    rotate_model_(model, ALL_ROTATIONS, progress=False)
    peft_model = lora(model, "all-linear")
    ids = random_ids()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"fake_quantize_\w+\(\.\.\.\) is deprecated", category=DeprecationWarning)
        handle = enable_fake_quant_(peft_model, quant_config(4, 4))
        peft_model(ids).logits.sum().backward()
        handle.remove()
        with fake_quantized(peft_model, quant_config(4, 8)):
            logits(peft_model, ids)
        merged = copy.deepcopy(peft_model).merge_and_unload()
        quantize_model_(merged, QuantConfig(w_bits=4, a_bits=4, kv_bits=4), progress=False)
        logits(merged, ids)


def test_fake_quant_targets_resolve_through_the_family_spec():
    """Leaf names map onto the family's layer linears (Phi-3: q_proj → qkv_proj); "lora" keeps the LoRA layers only."""
    model = tiny_model("phi3", layers=2)
    peft_model = lora(model, ["qkv_proj"])
    handle = enable_fake_quant_(peft_model, quant_config(4, 4), targets=["q_proj", "down_proj"])
    assert sorted(n.rsplit(".", 1)[-1] for n in handle.modules) == ["down_proj", "down_proj", "qkv_proj", "qkv_proj"]
    handle.remove()
    handle = enable_fake_quant_(peft_model, quant_config(4, 4), targets="lora")
    assert [n.rsplit(".", 1)[-1] for n in handle.modules] == ["qkv_proj", "qkv_proj"]
    handle.remove()
    assert not fake_quant_active(peft_model)
    with pytest.raises(ValueError, match=r"fake-quant target 'wq' is not a linear of a .* decoder layer; valid names"):
        enable_fake_quant_(peft_model, quant_config(4, 4), targets=["wq"])
    with pytest.raises(ValueError, match="fake quant targets must be"):
        enable_fake_quant_(peft_model, quant_config(4, 4), targets="everything")


def test_linears_reading_one_input_share_its_fake_quant_with_equal_values_and_gradients():
    """q/k/v and gate/up read one tensor: QAT quantizes it once per forward; logits and every LoRA gradient equal
    those of a run where each linear quantizes its own copy (the sharing switched off by a fresh state dict per call)."""
    from rolora_plugin.quant import qat

    ids = random_ids()
    model = tiny_model("llama")
    rotate_model_(model, RotationConfig(), progress=False)
    peft_model = lora(model, "all-linear")
    handle = enable_fake_quant_(peft_model, quant_config(4, 4))
    states = [m.__dict__[qat._FQ_ATTR] for m in handle.modules.values()]
    assert len({id(s.shared) for s in states}) == 1

    def run():
        peft_model.zero_grad(set_to_none=True)
        out = peft_model(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    calls = []
    real = qat.fake_quant
    qat.fake_quant = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        shared_out, shared_grads = run()
        n_shared = len(calls)
        for s in states:  # one private dict per state: nothing is shared
            s.shared = {}
        calls.clear()
        own_out, own_grads = run()
        n_own = len(calls)
    finally:
        qat.fake_quant = real
        handle.remove()
    assert n_shared < n_own  # the input of q/k/v (and gate/up) was quantized once
    assert torch.equal(shared_out, own_out)
    assert shared_grads.keys() == own_grads.keys() and shared_grads
    for name in own_grads:
        assert rel_err(shared_grads[name], own_grads[name]) <= 1e-6, name
