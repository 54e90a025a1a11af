"""GPTQ: blocked Cholesky sweep vs the unblocked float64 OBS reference, error vs RTN, model pipeline."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import random_ids, tiny_model

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.quant.gptq import (
    HessianAccumulator,
    _hessians,
    capture_layer_inputs,
    gptq_quantize_weight,
    gptq_quantize_weight_ref,
)
from rolora_plugin.quant import QuantConfig, QuantizationError, mse_clip_search, quantize_model_, quantize_weight

# Tolerance table for GPTQ vs its float64 reference. float64: same maths, different association (blocked
# Cholesky vs explicit inverse), so only rounding-level differences. float32: many dependent column updates,
# so elementwise agreement is not expected; the layer-output error must agree within a few percent.
GPTQ_ELEMENT_RTOL = {torch.float64: 1e-9}
GPTQ_OUTPUT_ERR_RTOL = {torch.float32: 0.05, torch.bfloat16: 0.05}


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def correlated_inputs(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """X (n, d) with strongly correlated features (decaying spectrum, random mixing): the case GPTQ exploits."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (z @ mix + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)).to(dtype)


def weights(out: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, d, generator=g, dtype=torch.float64).to(dtype)


def hessian_ref(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return 2.0 / x.shape[0] * x.T @ x


def out_err(x, w, q) -> float:
    x = x.to(torch.float64)
    return (x @ (w.to(torch.float64) - q.to(torch.float64)).T).norm().item()


def test_hessian_accumulator_matches_two_over_n_xtx():
    x = correlated_inputs(300, 24, seed=1)
    acc = HessianAccumulator(24, dtype=torch.float64)
    for chunk in (x[:7], x[7:150].reshape(11, 13, 24), x[150:]):
        acc.add(chunk)
    assert acc.count == 300
    assert torch.allclose(acc.hessian, hessian_ref(x), rtol=1e-12, atol=1e-12)


CASES = [
    dict(group_size=None, act_order=False, sym=True),
    dict(group_size=None, act_order=True, sym=False),
    dict(group_size=8, act_order=False, sym=True),
    dict(group_size=8, act_order=True, sym=True),
    dict(group_size=16, act_order=False, sym=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("block_size", [128, 12])
@pytest.mark.parametrize("clip", [False, True])
def test_gptq_matches_unblocked_float64_reference(case, block_size, clip):
    x, w = correlated_inputs(256, 48, seed=3), weights(10, 48, seed=4)
    search = dict(grid=20, max_shrink=0.5, norm=2.4) if clip else None
    h = hessian_ref(x)
    got = gptq_quantize_weight(w, h, 3, block_size=block_size, clip_search=search, **case)
    ref = gptq_quantize_weight_ref(w, h, 3, clip_search=search, **case)
    assert (got - ref).abs().max() <= GPTQ_ELEMENT_RTOL[torch.float64] * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gptq_low_precision_output_error_matches_reference(dtype):
    x, w = correlated_inputs(256, 64, seed=5), weights(16, 64, seed=6)
    h = hessian_ref(x)
    got = gptq_quantize_weight(w.to(dtype), h.to(torch.float32), 4, group_size=16)
    ref = gptq_quantize_weight_ref(w, h, 4, group_size=16)
    assert got.dtype == dtype
    e_got, e_ref = out_err(x, w, got), out_err(x, w, ref)
    assert abs(e_got - e_ref) <= GPTQ_OUTPUT_ERR_RTOL[dtype] * e_ref


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gptq_with_diagonal_hessian_is_exactly_rtn(case, dtype):
    """No correlation between inputs → no error to propagate: GPTQ must reduce to round-to-nearest."""
    w = weights(12, 32, seed=7, dtype=dtype)
    h = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 0.1)
    got = gptq_quantize_weight(w, h, 3, block_size=8, **case)
    assert torch.equal(got, quantize_weight(w, 3, case["group_size"], case["sym"]))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    x, w = correlated_inputs(512, 64, seed=bits), weights(32, 64, seed=10 + bits)
    h = hessian_ref(x)
    e_gptq = out_err(x, w, gptq_quantize_weight(w, h, bits, group_size=group_size))
    e_rtn = out_err(x, w, quantize_weight(w, bits, group_size))
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_dead_inputs_give_zero_columns_and_no_nan():
    x = correlated_inputs(128, 16, seed=2)
    x[:, [3, 9]] = 0.0
    q = gptq_quantize_weight(weights(8, 16, seed=3), hessian_ref(x), 4)
    assert torch.isfinite(q).all() and torch.equal(q[:, [3, 9]], torch.zeros(8, 2, dtype=q.dtype))


def test_gptq_clip_search_uses_the_searched_scales():
    """With a diagonal Hessian, GPTQ + clip search must equal RTN with mse_clip_search's ratios."""
    w = weights(6, 32, seed=12)
    search = dict(grid=30, max_shrink=0.6, norm=2.0)
    got = gptq_quantize_weight(w, torch.eye(32, dtype=torch.float64), 3, clip_search=search)
    assert torch.equal(got, quantize_weight(w, 3, None, True, mse_clip_search(w, 3, None, True, **search)))


# ---------------------------------------------------------------------------------------------- model pipeline


def test_captured_layer_inputs_replay_the_models_own_forward():
    model = tiny_model("qwen2", layers=3)
    rotate_model_(model, RotationConfig(r2=True, r3=True), progress=False)
    ids = random_ids(seed=3)
    layers = list(model.model.layers)
    with torch.no_grad():
        hidden, calls = capture_layer_inputs(model, layers, [{"input_ids": ids, "use_cache": False}])
        assert "position_embeddings" in calls[0][0][1] and "attention_mask" in calls[0][0][1]
        h = hidden[0]
        for i, layer in enumerate(layers):
            h = layer(h, *calls[i][0][0], **calls[i][0][1])
        logits = model.lm_head(model.model.norm(h))
        assert torch.allclose(logits, model(ids).logits, rtol=0, atol=1e-6 * logits.abs().max())


def test_hessian_of_down_proj_is_taken_after_the_online_r4():
    model = tiny_model("llama", dtype=torch.float64)
    rotate_model_(model, RotationConfig(), progress=False)
    layer = model.model.layers[0]
    mlp_in = {}
    layer.mlp.register_forward_pre_hook(lambda m, args: mlp_in.setdefault("x", args[0]))
    with torch.no_grad():
        hidden, calls = capture_layer_inputs(model, [layer], [{"input_ids": random_ids(), "use_cache": False}])
        accs = _hessians(layer, {"down": layer.mlp.down_proj}, ["down"], hidden, calls[0], [None])
        x = mlp_in["x"]
        u = layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
    h_rot, h_plain = hessian_ref(layer.mlp.rolora_r4(u)), hessian_ref(u)
    got = accs["down"].hessian.to(torch.float64)
    assert torch.allclose(got, h_rot, rtol=1e-5, atol=1e-6 * h_rot.abs().max())
    assert not torch.allclose(got, h_plain, rtol=1e-2, atol=1e-2 * h_plain.abs().max())


def test_padded_tokens_are_excluded_from_the_hessian():
    model = tiny_model("llama")
    layer = model.model.layers[0]
    ids = random_ids(batch=2, seq=16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    with torch.no_grad():
        hidden, calls = capture_layer_inputs(model, [layer], [batch])
        accs = _hessians(layer, {"q": layer.self_attn.q_proj}, ["q"], hidden, calls[0], [mask.bool()])
    assert accs["q"].count == int(mask.sum())


@pytest.mark.parametrize("rotate", [False, True])
def test_each_hessian_comes_from_inputs_of_the_already_quantized_prefix(monkeypatch, rotate):
    """true-sequential GPTQ: the Hessian of every linear equals the one its input gives in the final quantized model
    (earlier layers and earlier linears of the same layer already quantized)."""
    import rolora_plugin.quant.gptq as gptq

    model = tiny_model("llama", layers=3)
    if rotate:
        rotate_model_(model, RotationConfig(r2=True), progress=False)
    seen, real = {}, gptq.gptq_quantize_weight
    monkeypatch.setattr(gptq, "gptq_quantize_weight", lambda w, h, *a, **k: (seen.__setitem__(w.data_ptr(), h.clone()), real(w, h, *a, **k))[1])
    calib = [random_ids(batch=2, seq=16, seed=s) for s in range(3)]
    record = quantize_model_(model, QuantConfig(w_bits=3, a_bits=16, method="gptq"), calibration=calib, progress=False)
    accs = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in record.quantized}
    for n in record.quantized:
        model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: accs[n].add(args[0]))
    with torch.no_grad():
        for ids in calib:
            model(ids)
    assert len(seen) == len(record.quantized) == 21
    for n, acc in accs.items():
        got = seen[model.get_submodule(n).weight.data_ptr()]
        assert torch.allclose(got, acc.hessian, rtol=1e-4, atol=1e-5 * acc.hessian.abs().max()), n


def _kl_to_fp(ref_logits, logits) -> float:
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize("family, rotate", [("llama", False), ("llama", True), ("phi3", True), ("qwen2", False)])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_end_to_end_is_closer_to_fp_than_rtn(family, rotate, bits):
    """Held-out KL(FP ‖ quantized) of next-token distributions: GPTQ must clearly beat RTN (weight-only)."""
    base = tiny_model(family)
    if rotate:
        rotate_model_(base, RotationConfig(r2=True), progress=False)
    held_out = random_ids(batch=4, seq=32, seed=100)
    with torch.no_grad():
        ref = base(held_out).logits
    kl = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(base)
        calib = [random_ids(batch=4, seq=32, seed=s) for s in range(4)]
        quantize_model_(model, QuantConfig(w_bits=bits, a_bits=16, method=method), calibration=calib, progress=False)
        with torch.no_grad():
            kl[method] = _kl_to_fp(ref, model(held_out).logits)
    assert kl["gptq"] < 0.8 * kl["rtn"], kl


def test_gptq_quantizes_exactly_the_chosen_linears_and_runs_with_activation_quant():
    model = tiny_model("mistral", tie=False)
    head = model.lm_head.weight.detach().clone()
    calib = [{"input_ids": random_ids(seed=s)} for s in range(2)]
    record = quantize_model_(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=8, method="gptq", w_clip_search=True, gptq_act_order=True, w_group_size=32), calibration=calib, progress=False)
    assert torch.equal(model.lm_head.weight, head)
    assert len(record.quantized) == 14 and all(0 < e < 0.5 for e in record.weight_error.values())
    assert torch.isfinite(model(random_ids()).logits).all()


@pytest.mark.parametrize("calibration, message", [([], "needs calibration data"), ([[1, 2, 3]], "must be input_ids tensors")])
def test_bad_calibration_is_rejected(calibration, message):
    with pytest.raises(QuantizationError, match=message):
        quantize_model_(tiny_model("llama"), QuantConfig(method="gptq"), calibration=calibration, progress=False)
