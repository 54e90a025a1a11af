"""Calibrated activation clipping (quant.calibration), asymmetric activations end to end, QuantConfig presets."""

import pytest
import torch
from tests.helpers import logits, random_ids, tiny_model

from rolora_plugin.quant.primitives import TensorQuant

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.quant import (
    ClipErrorMeter,
    QuantConfig,
    QuantizationError,
    get_quantization_record,
    install_activation_quantizers,
    quantize_activation,
    quantize_model_,
    search_activation_clips,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _heavy_tailed(n=512, d=64, seed=0):
    """(n, d) tokens with Student-t(2) entries (z / sqrt(χ²₂ / 2)): a few large values per token, so 4-bit
    per-token quantization gains from clipping."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    chi = torch.randn(n, d, 2, generator=g, dtype=torch.float64).pow(2).sum(-1)
    return (z / (chi / 2).sqrt()).float()


def _ref_errors(lin, x, cands, sym=True):
    w = lin.weight.detach().double()
    return [float(((quantize_activation(x.double(), 4, sym, c) - x.double()) @ w.T).pow(2).sum()) for c in cands]


@pytest.mark.parametrize("out_features", [32, 160], ids=["out<in", "out>in-gram"])
@pytest.mark.parametrize("max_elements", [1 << 23, 3000], ids=["one-matmul", "candidate-blocks"])
def test_meter_errors_match_a_float64_reference_and_best_is_the_argmin(out_features, max_elements, monkeypatch):
    monkeypatch.setattr(ClipErrorMeter, "max_elements", max_elements)
    lin = torch.nn.Linear(64, out_features, bias=False)
    x = _heavy_tailed()
    cands = (1.0, 0.9, 0.7, 0.5)
    meter = ClipErrorMeter(lin, TensorQuant(bits=4, sym=True), candidates=cands)
    meter(lin, (x[:200],))
    meter(lin, (x[200:],))  # accumulated over calls
    ref = _ref_errors(lin, x, cands)
    torch.testing.assert_close(meter.errors, torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=0)
    assert meter.tokens == 512
    assert meter.best() == cands[min(range(4), key=ref.__getitem__)]


def test_meter_gram_follows_a_weight_edited_in_place():
    """The wide-output path caches G = ŴᵀŴ; an in-place edit of the weight between batches must not reuse it."""
    lin = torch.nn.Linear(16, 48, bias=False)
    x = _heavy_tailed(64, 16)
    meter = ClipErrorMeter(lin, TensorQuant(bits=4), (1.0, 0.8))
    meter(lin, (x,))
    with torch.no_grad():
        lin.weight.mul_(3.0)
    meter(lin, (x,))
    lin.weight.requires_grad_(False)
    ref = [a / 9.0 + a for a in _ref_errors(lin, x, (1.0, 0.8))]  # first batch measured at 1/3 of the weight
    torch.testing.assert_close(meter.errors, torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=0)


def test_meter_passes_on_the_input_quantized_with_the_apply_ratio():
    lin = torch.nn.Linear(64, 8)
    x = _heavy_tailed(16)
    out = ClipErrorMeter(lin, TensorQuant(bits=4), (1.0, 0.8), apply_ratio=0.8)(lin, (x, "extra"))
    torch.testing.assert_close(out[0], quantize_activation(x, 4, True, 0.8), rtol=0, atol=0)
    assert out[1] == "extra"


def test_gaussian_tokens_choose_clipping_and_a_clip_never_loses_to_none():
    """Rotated activations look Gaussian per token: at 4 bits a finer step beats the clamped tail there (measured
    0.85x the unclipped error at c = 0.9, d = 64); a heavy tail (Student-t(2)) keeps c = 1."""
    lin = torch.nn.Linear(64, 32, bias=False)
    meter = ClipErrorMeter(lin, TensorQuant(bits=4), (1.0, 0.9, 0.8, 0.7, 0.6, 0.5))
    meter(lin, (torch.randn(512, 64, generator=torch.Generator().manual_seed(0)),))
    assert meter.best() < 1.0
    heavy = ClipErrorMeter(lin, TensorQuant(bits=4), (1.0, 0.8, 0.6))
    heavy(lin, (_heavy_tailed(),))
    assert heavy.best() == 1.0
    k = meter.candidates.index(meter.best())
    assert meter.errors[k] <= meter.errors[0]
    assert ClipErrorMeter(lin, TensorQuant(bits=4), (1.0, 0.5)).best() == 1.0  # nothing measured: no clipping


def test_search_activation_clips_on_a_model_returns_a_ratio_per_linear_and_restores_it():
    model = tiny_model("llama")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    before = logits(model, random_ids())
    ratios = search_activation_clips(model, linears, [random_ids(seed=1)], TensorQuant(bits=4), candidates=(0.8, 0.6))
    assert set(ratios) == set(linears)
    assert all(r in (1.0, 0.8, 0.6) for r in ratios.values())
    assert not any(lin._forward_pre_hooks for lin in linears.values())  # meters removed
    torch.testing.assert_close(logits(model, random_ids()), before, rtol=0, atol=0)
    with pytest.raises(QuantizationError, match="needs calibration data"):
        search_activation_clips(model, linears, [], TensorQuant(bits=4))


def test_quantize_model_with_a_clip_search_records_and_reinstalls_the_ratios():
    model = tiny_model("llama")
    rotate_model_(model, RotationConfig(seed=0), progress=False)
    cfg = QuantConfig(w_bits=4, a_bits=4, a_clip_search=True, a_clip_candidates=(0.9, 0.7))
    record = quantize_model_(model, cfg, calibration=[random_ids(seed=2)], progress=False)
    assert set(record.a_clip_ratios) == set(record.quantized)
    ids = random_ids(seed=3)
    out = logits(model, ids)
    loaded = get_quantization_record(model)
    assert loaded.a_clip_ratios == record.a_clip_ratios  # survives the dict round trip in model.config
    install_activation_quantizers(model, loaded)
    torch.testing.assert_close(logits(model, ids), out, rtol=0, atol=0)
    name = record.quantized[0]
    hook = model.get_submodule(name).__dict__["_rolora_act_quant"][0]
    assert hook.spec.clip_ratio == record.a_clip_ratios[name]
    with pytest.raises(QuantizationError, match="calibration"):
        quantize_model_(tiny_model("llama"), cfg, progress=False)


def test_asymmetric_activations_end_to_end():
    ids = random_ids(seed=4)
    outs = {}
    for sym in (True, False):
        model = tiny_model("llama")
        quantize_model_(model, QuantConfig(w_bits=16, a_bits=4, a_sym=sym), progress=False)
        hooks = [m.__dict__["_rolora_act_quant"][0] for m in model.modules() if "_rolora_act_quant" in m.__dict__]
        assert hooks and all(h.spec.sym is sym for h in hooks)
        outs[sym] = logits(model, ids)
    fp = logits(tiny_model("llama"), ids)
    assert not torch.equal(outs[True], outs[False])
    for out in outs.values():  # both are 4-bit approximations of the same function
        assert (out - fp).norm() < 0.5 * fp.norm()
    x = _heavy_tailed(8).double()
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    ref = (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s
    torch.testing.assert_close(quantize_activation(x, 4, sym=False), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(a_clip_candidates=()), "a_clip_candidates must be a non-empty list"),
        (dict(a_clip_candidates=(1.2,)), r"a_clip_candidates entries must be a number in \(0, 1\]"),
        (dict(a_clip_search="yes"), "a_clip_search must be True or False"),
    ],
)
def test_config_rejects_bad_activation_search_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_config_with_activation_search_round_trips():
    cfg = QuantConfig(a_clip_search=True, a_clip_candidates=[0.9, 0.8])
    assert cfg.a_clip_candidates == (0.9, 0.8)
    assert QuantConfig.from_json(cfg.to_json()) == cfg


def test_presets_are_valid_configs_with_overrides_and_refuse_unknown_names():
    w4a4 = QuantConfig.preset("w4a4")
    assert (w4a4.w_bits, w4a4.a_bits, w4a4.kv_bits, w4a4.method) == (4, 4, 16, "gptq")
    assert w4a4.a_clip_search and w4a4.w_clip_search and w4a4.skip == ("lm_head",)
    assert QuantConfig.preset("w4a4kv4").kv_bits == 4
    assert QuantConfig.preset("w4a4", gptq_act_order=False).gptq_act_order is False
    assert QuantConfig.from_dict(w4a4.to_dict()) == w4a4
    with pytest.raises(ValueError, match=r"unknown QuantConfig preset 'w3a3'; choose one of \[.*'w4a4'"):
        QuantConfig.preset("w3a3")


def test_w4a4_preset_quantizes_a_rotated_tiny_model_with_calibration():
    model = tiny_model("llama")
    rotate_model_(model, RotationConfig(seed=0, r2=True), progress=False)
    ids = random_ids(seed=5)
    fp = logits(model, ids)
    record = quantize_model_(model, QuantConfig.preset("w4a4"), calibration=[random_ids(seed=6)], progress=False)
    assert record.a_clip_ratios and record.weight_error
    out = logits(model, ids)
    assert torch.isfinite(out).all() and 0 < (out - fp).norm() < fp.norm()


def test_gptq_quantized_inputs_calibrates_on_the_quantized_activations():
    """Same weights as GPTQ run by hand with the activation quantizers already active; differs from FP Hessians."""
    import copy

    from rolora_plugin.quant import ActivationQuantizer, gptq_quantize_model_

    base = tiny_model("llama")
    rotate_model_(base, RotationConfig(seed=0), progress=False)
    calib = [random_ids(seed=7)]
    cfg = QuantConfig(method="gptq", a_sym=False, gptq_quantized_inputs=True)
    ours, plain, by_hand = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    record = quantize_model_(ours, cfg, calibration=calib, progress=False)
    quantize_model_(plain, QuantConfig(method="gptq", a_sym=False), calibration=calib, progress=False)
    lins = {n: by_hand.get_submodule(n) for n in record.quantized}
    handles = [m.register_forward_pre_hook(ActivationQuantizer(TensorQuant(bits=4, sym=False))) for m in lins.values()]
    gptq_quantize_model_(by_hand, cfg, calib, progress=False)
    for h in handles:
        h.remove()
    for n in record.quantized:
        torch.testing.assert_close(ours.get_submodule(n).weight, lins[n].weight, rtol=0, atol=0)
    assert any(not torch.equal(ours.get_submodule(n).weight, plain.get_submodule(n).weight) for n in record.quantized)
    hooks = [len(ours.get_submodule(n)._forward_pre_hooks) for n in record.quantized]
    assert hooks == [len(plain.get_submodule(n)._forward_pre_hooks) for n in record.quantized]  # temporary ones removed


def test_mixed_activation_bits_are_installed_searched_and_labelled():
    cfg = QuantConfig.preset("w4a4-gate-up-a8")
    assert cfg.activation_bits("model.layers.0.mlp.gate_proj") == 8
    assert cfg.activation_bits("model.layers.0.mlp.down_proj") == 4
    assert cfg.label() == "W4A4 (A8: gate_proj; A8: up_proj)" and QuantConfig.preset("w4a4kv4").label() == "W4A4KV4"
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    model = tiny_model("llama")
    record = quantize_model_(model, cfg, calibration=[random_ids(seed=8)], progress=False)
    bits = {n: model.get_submodule(n).__dict__["_rolora_act_quant"][0].spec.bits for n in record.quantized}
    assert {n.rsplit(".", 1)[-1] for n, b in bits.items() if b == 8} == {"gate_proj", "up_proj"}
    assert set(bits.values()) == {4, 8} and set(record.a_clip_ratios) == set(record.quantized)
    off = tiny_model("llama")
    record = quantize_model_(off, QuantConfig(w_bits=4, a_bits=4, a_bits_for={"down_proj": 16}), progress=False)
    assert not any("_rolora_act_quant" in off.get_submodule(n).__dict__ for n in record.quantized if n.endswith("down_proj"))
    with pytest.raises(ValueError, match=r"a_bits_for\['gate_proj'\] must be an int in 2\.\.16"):
        QuantConfig(a_bits_for={"gate_proj": 1})
    with pytest.raises(ValueError, match="a_bits_for must map linear names to bits"):
        QuantConfig(a_bits_for=["gate_proj"])


# ---------------------------------------------------------------------------------------------- calibration validation


def _bad_calibration_cases(vocab: int):
    ids = random_ids(vocab, 2, 8)
    return {
        "float ids": ([ids.float()], "dtype torch.float32"),
        "bool ids": ([ids.bool()], "dtype torch.bool"),
        "3-D ids": ([ids.unsqueeze(0)], "expected (seq,) or (batch, seq)"),
        "empty ids": ([ids[:, :0]], "is empty"),
        "out of vocabulary": ([ids + vocab], "vocabulary is [0,"),
        "negative id": ([ids - vocab], "vocabulary is [0,"),
        "mask shape": ([{"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long)}], "attention_mask shape"),
        "not a batch": (["some text"], "got str"),
    }


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("case", list(_bad_calibration_cases(101).keys()))
def test_bad_calibration_is_refused_before_any_weight_changes(method, case):
    model = tiny_model("llama", seed=0)
    vocab = model.get_input_embeddings().num_embeddings
    calibration, needle = _bad_calibration_cases(vocab)[case]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        quantize_model_(model, QuantConfig(method=method), calibration, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert get_quantization_record(model) is None


def test_a_one_shot_calibration_iterator_feeds_gptq_and_the_clip_search_alike():
    model = tiny_model("llama", seed=0)
    rotate_model_(model, RotationConfig(), progress=False)
    vocab = model.get_input_embeddings().num_embeddings
    batches = [random_ids(vocab, 2, 16, seed=s) for s in range(2)]
    ref = tiny_model("llama", seed=0)
    rotate_model_(ref, RotationConfig(), progress=False)
    cfg = QuantConfig(method="gptq", a_clip_search=True)
    quantize_model_(ref, cfg, batches, progress=False)
    quantize_model_(model, cfg, iter(batches), progress=False)  # a generator is consumed once
    assert get_quantization_record(model).a_clip_ratios == get_quantization_record(ref).a_clip_ratios
    x = random_ids(vocab, 1, 12, seed=9)
    assert torch.equal(logits(model, x), logits(ref, x))
