"""QuantConfig validation and round trip; quantize_model_: weights, activation / KV quantizers, records, refusals."""

import copy
import json

import pytest
import torch
from tests.helpers import FAMILIES, random_ids, tiny_model

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.model.online import add_attention_transform
from rolora_plugin.quant import (
    QuantConfig,
    QuantizationError,
    get_quantization_record,
    install_activation_quantizers,
    mse_clip_search,
    quantize_activation,
    quantize_model_,
    quantize_weight,
    remove_activation_quantizers,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# ---------------------------------------------------------------------------------------------- QuantConfig


def test_config_round_trips_through_dict_and_json():
    cfg = QuantConfig(w_bits=3, a_bits=8, kv_bits=4, w_group_size=64, w_sym=False, method="gptq", skip=["lm_head", "gate"])
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["skip"] == ["lm_head", "gate"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(w_bits=1), r"QuantConfig.w_bits must be an int in 2\.\.16"),
        (dict(a_bits=32), r"QuantConfig.a_bits must be an int in 2\.\.16"),
        (dict(kv_bits=3.5), r"QuantConfig.kv_bits must be an int in 2\.\.16"),
        (dict(w_group_size=0), "w_group_size must be a positive int or None"),
        (dict(a_clip_ratio=0.0), r"a_clip_ratio must be a number in \(0, 1\]"),
        (dict(method="awq"), "method must be 'rtn' or 'gptq'"),
        (dict(gptq_damp=0), "gptq_damp must be > 0"),
        (dict(gptq_block_size=0), "gptq_block_size must be a positive int"),
        (dict(w_clip_max_shrink=1.0), r"w_clip_max_shrink must be in \[0, 1\)"),
        (dict(w_sym="yes"), "w_sym must be True or False"),
        (dict(skip="lm_head"), "skip must be a list of module names"),
        (dict(w_bits=16, a_bits=16), "all 16 \\(off\\)"),
    ],
)
def test_config_rejects_bad_values_with_actionable_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bits'\]"):
        QuantConfig.from_dict({"bits": 4})


# ---------------------------------------------------------------------------------------------- quantize_model_


def _linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rotate", [False, True])
def test_rtn_weights_equal_quantize_weight_and_skipped_stay_exact(family, rotate):
    model = tiny_model(family, tie=False)
    if rotate:
        rotate_model_(model, RotationConfig(r2=True), progress=False)
    before, embed = _linear_weights(model), model.get_input_embeddings().weight.detach().clone()
    cfg = QuantConfig(w_bits=4, a_bits=8, w_group_size=32, w_clip_search=True, w_clip_grid=20)
    record = quantize_model_(model, cfg, progress=False)
    after = _linear_weights(model)
    assert record.skipped == ["lm_head"] and "lm_head" not in record.quantized and len(record.quantized) >= 8
    assert torch.equal(after["lm_head"], before["lm_head"]) and torch.equal(model.get_input_embeddings().weight, embed)
    for name in record.quantized:
        ratios = mse_clip_search(before[name], 4, 32, True, grid=20, max_shrink=0.8, norm=2.4)
        assert torch.equal(after[name], quantize_weight(before[name], 4, 32, True, ratios)), name
    assert get_quantization_record(model).config == cfg
    assert torch.isfinite(model(random_ids()).logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_quantizer_quantizes_each_linear_input_per_token(family):
    model = tiny_model(family, dtype=torch.float64)
    ref = copy.deepcopy(model)
    quantize_model_(model, QuantConfig(w_bits=16, a_bits=4, a_clip_ratio=0.9), progress=False)
    raw, seen = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":  # one probe before our quantizer, one after
            mod.register_forward_pre_hook(lambda m, args, n=name: raw.__setitem__(n, args[0]), prepend=True)
            mod.register_forward_hook(lambda m, args, out, n=name: seen.__setitem__(n, (args[0], out)))
    model(random_ids())
    assert set(seen) == set(raw) and len(seen) >= 8
    for name, (x, out) in seen.items():
        lin = ref.get_submodule(name)
        assert torch.equal(x, quantize_activation(raw[name], 4, True, 0.9)), name
        assert torch.equal(out, torch.nn.functional.linear(x, lin.weight, lin.bias)), name


def test_activation_quantization_runs_after_the_online_r4_rotation():
    """down_proj's input must be Q(R4(u)), not R4(Q(u)): recompute the MLP by hand in float64."""
    model = tiny_model("llama", dtype=torch.float64)
    rotate_model_(model, RotationConfig(), progress=False)
    quantize_model_(model, QuantConfig(w_bits=16, a_bits=4), progress=False)
    mlp = model.model.layers[1].mlp
    io = {}
    mlp.register_forward_hook(lambda m, args, out: io.update(x=args[0], y=out))
    model(random_ids())

    def qa(t):
        return quantize_activation(t, 4, True)

    u = mlp.act_fn(torch.nn.functional.linear(qa(io["x"]), mlp.gate_proj.weight)) * torch.nn.functional.linear(qa(io["x"]), mlp.up_proj.weight)
    right = torch.nn.functional.linear(qa(mlp.rolora_r4(u)), mlp.down_proj.weight)
    wrong = torch.nn.functional.linear(mlp.rolora_r4(qa(u)), mlp.down_proj.weight)
    scale = right.abs().max()
    assert (io["y"] - right).abs().max() <= 1e-12 * scale
    assert (io["y"] - wrong).abs().max() > 1e-3 * scale


def test_kv_quantization_runs_after_rope_and_r3():
    model = tiny_model("llama", dtype=torch.float64)
    rotate_model_(model, RotationConfig(r3=True), progress=False)
    plain = copy.deepcopy(model)
    quantize_model_(model, QuantConfig(w_bits=16, a_bits=16, kv_bits=4), progress=False)
    probes = []
    for m in (plain, model):
        store = {}
        add_attention_transform(m.model.layers[0].self_attn, "probe", lambda q, k, v, s=store: (s.update(k=k, v=v), (q, k, v))[1], m.config)
        probes.append(store)
    ids = random_ids()
    plain(ids), model(ids)
    for t in ("k", "v"):
        assert torch.equal(probes[1][t], quantize_activation(probes[0][t], 4, sym=False)), t
        assert not torch.equal(probes[1][t], probes[0][t])
    assert get_quantization_record(model).kv_layers == 2


def test_reinstalling_online_rotations_keeps_r3_before_the_kv_quantizer():
    from rolora_plugin import get_rotation_record
    from rolora_plugin.rotate.rotation import install_online_rotations

    model = tiny_model("llama", dtype=torch.float64)
    rotate_model_(model, RotationConfig(r3=True), progress=False)
    quantize_model_(model, QuantConfig(w_bits=16, a_bits=16, kv_bits=4), progress=False)
    ids = random_ids()
    with torch.no_grad():
        out = model(ids).logits
        install_online_rotations(model, get_rotation_record(model))  # e.g. what load_rotated does
        assert list(vars(model.model.layers[0].self_attn)["_rolora_attn_transforms"]) == ["r3", "kv_quant"]
        assert torch.equal(model(ids).logits, out)


def test_rotating_a_quantized_model_is_refused():
    from rolora_plugin import RotationError

    model = tiny_model("llama")
    quantize_model_(model, QuantConfig(w_bits=4, a_bits=8), progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RotationError, match="already W4A8-quantized"):
        rotate_model_(model, RotationConfig(), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_reinstalling_quantizers_from_the_record_reproduces_outputs():
    model = tiny_model("qwen2")
    quantize_model_(model, QuantConfig(w_bits=4, a_bits=4, kv_bits=8), progress=False)
    ids = random_ids()
    out = model(ids).logits
    remove_activation_quantizers(model)
    assert not torch.equal(model(ids).logits, out)
    install_activation_quantizers(model, get_quantization_record(model))
    assert torch.equal(model(ids).logits, out)


# ---------------------------------------------------------------------------------------------- bad model inputs


def test_quantizing_twice_is_an_error():
    model = tiny_model("llama")
    quantize_model_(model, QuantConfig(), progress=False)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model_(model, QuantConfig(), progress=False)


def test_group_size_not_dividing_a_width_names_the_layer_and_edits_nothing():
    model = tiny_model("llama")  # hidden 64, intermediate 96: group 64 fits q/k/v/o/gate/up, not down_proj
    before = _linear_weights(model)
    with pytest.raises(QuantizationError, match=r"does not divide the input width 96 of layer 'model.layers.0.mlp.down_proj'"):
        quantize_model_(model, QuantConfig(w_group_size=64), progress=False)
    assert all(torch.equal(w, before[n]) for n, w in _linear_weights(model).items())
    assert get_quantization_record(model) is None


def test_gptq_without_calibration_is_an_error():
    with pytest.raises(QuantizationError, match="needs calibration data"):
        quantize_model_(tiny_model("llama"), QuantConfig(method="gptq"), progress=False)


def test_tied_lm_head_must_stay_skipped():
    model = tiny_model("llama", tie=True)
    with pytest.raises(QuantizationError, match="shares its weight with the input embeddings"):
        quantize_model_(model, QuantConfig(skip=()), progress=False)


def test_lora_layers_must_be_merged_first():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(QuantizationError, match="merge the adapters first"):
        quantize_model_(model, QuantConfig(), progress=False)


# ---------------------------------------------------------------------------------------------- weight-method dispatch


def test_every_weight_method_has_a_handler():
    from rolora_plugin.quant import WEIGHT_HANDLERS, WEIGHT_METHODS

    assert set(WEIGHT_HANDLERS) == set(WEIGHT_METHODS) == {"rtn", "gptq"}


def test_quantize_model_dispatches_on_the_method_handler(monkeypatch):
    """A method's handler does the weights; activations and the record are handled around it for every method."""
    from rolora_plugin.quant import WEIGHT_HANDLERS

    seen = []
    monkeypatch.setitem(WEIGHT_HANDLERS, "rtn", lambda model, cfg, linears, calib, progress: seen.append(list(linears)) or {n: 0.5 for n in linears})
    model = tiny_model("llama", tie=False)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    record = quantize_model_(model, QuantConfig(w_bits=4, a_bits=8), progress=False)
    assert seen == [record.quantized] and record.weight_error == {n: 0.5 for n in record.quantized}
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)  # only the handler edits weights
    assert get_quantization_record(model).config.a_bits == 8
