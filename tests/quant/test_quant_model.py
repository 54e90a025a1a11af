"""Fake-quant maths against float64 references, STE gradients, clip search, QuantConfig and quantize_model_."""

import copy
import json

import pytest
import torch
from tests.helpers import FAMILIES, random_ids, tiny_model

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.online import add_attention_transform
from rolora_plugin.quant import (
    QuantConfig,
    QuantizationError,
    compute_scales,
    fake_quantize_activation,
    fake_quantize_weight,
    get_quantization_record,
    install_activation_quantizers,
    mse_clip_search,
    quant_range,
    quantize_activation,
    quantize_model_,
    quantize_weight,
    remove_activation_quantizers,
    weight_scales,
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# Tolerance table: |out - ref| <= tol * (|ref| + step) elementwise. float64 computes exactly what the reference does.
# float32 (also the compute dtype of bfloat16) differs from float64 by a few ulps in s = max/qmax and x/s;
# bfloat16 outputs are additionally rounded to 8 significant bits.
QUANT_TOL = {torch.float64: 0.0, torch.float32: 1e-6, torch.bfloat16: 2.0**-8}
# Elements whose float64 pre-rounding value round(x/s)+z lies this close to a rounding boundary may round the
# other way in float32; they must then differ by exactly one step.
TIE_BAND = {torch.float64: 0.0, torch.float32: 1e-4, torch.bfloat16: 1e-4}


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# ---------------------------------------------------------------------------------------------- float64 references


def ref_row_qdq(row: torch.Tensor, bits: int, sym: bool, clip: float):
    """One row in float64, formula written out: returns (dequantized, pre-rounding value v, step s, qmin, qmax)."""
    row = row.to(torch.float64)
    if sym:
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        s = row.abs().max() * clip / qmax
        z = torch.zeros((), dtype=torch.float64)
    else:
        qmax, qmin = 2**bits - 1, 0
        lo, hi = min(row.min().item(), 0.0) * clip, max(row.max().item(), 0.0) * clip
        s = torch.tensor((hi - lo) / qmax, dtype=torch.float64)
    s = s if s > 0 else torch.ones((), dtype=torch.float64)
    if not sym:
        z = torch.round(-torch.tensor(lo, dtype=torch.float64) / s)
    v = row / s + z
    return (torch.clamp(torch.round(row / s) + z, qmin, qmax) - z) * s, v, s, qmin, qmax


def ref_weight_qdq(w, bits, group_size, sym, clip=1.0):
    out, vs, steps = torch.empty(w.shape, dtype=torch.float64), torch.empty(w.shape, dtype=torch.float64), torch.empty(w.shape, dtype=torch.float64)
    g = group_size or w.shape[1]
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            c = clip if isinstance(clip, float) else float(clip[r, c0 // g])
            q, v, s, _, _ = ref_row_qdq(w[r, c0 : c0 + g], bits, sym, c)
            out[r, c0 : c0 + g], vs[r, c0 : c0 + g], steps[r, c0 : c0 + g] = q, v, s
    return out, vs, steps


def ref_act_qdq(x, bits, sym, clip):
    flat = x.reshape(-1, x.shape[-1])
    out, vs, steps = ref_weight_qdq(flat, bits, None, sym, clip)
    return out.reshape(x.shape), vs.reshape(x.shape), steps.reshape(x.shape)


def assert_quant_close(out, ref, v, step, dtype):
    """Elementwise check with the per-dtype tolerance table and the tie-flip rule."""
    out, ref = out.to(torch.float64), ref.to(torch.float64)
    if dtype == torch.float64:
        assert torch.equal(out, ref), f"float64 must match the reference exactly, max diff {(out - ref).abs().max()}"
        return
    diff = (out - ref).abs()
    ok = diff <= QUANT_TOL[dtype] * (ref.abs() + step)
    near_tie = ((v - torch.floor(v)) - 0.5).abs() < TIE_BAND[dtype]
    one_step = (diff - step).abs() <= QUANT_TOL[dtype] * (ref.abs() + 2 * step)
    bad = ~(ok | (near_tie & one_step))
    assert not bad.any(), f"{int(bad.sum())} elements off, e.g. out={out[bad][:3].tolist()} ref={ref[bad][:3].tolist()}"


def heavy_tailed(shape, seed, dtype=torch.float64):
    """Gaussian values with a few large outliers (what LLM weights/activations look like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.02, 8.0, 1.0)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- tensor maths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_quantize_weight_matches_float64_reference(dtype, bits, sym, group_size):
    w = heavy_tailed((12, 64), seed=bits * 10 + sym, dtype=dtype)
    out = quantize_weight(w, bits, group_size, sym)
    assert out.dtype == dtype and out.shape == w.shape
    ref, v, step = ref_weight_qdq(w, bits, group_size, sym)
    assert_quant_close(out, ref, v, step, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.85])
def test_quantize_activation_matches_float64_reference(dtype, bits, sym, clip):
    x = heavy_tailed((2, 5, 48), seed=bits + 7 * sym, dtype=dtype) + (0.0 if sym else 0.7)
    out = quantize_activation(x, bits, sym, clip)
    ref, v, step = ref_act_qdq(x, bits, sym, clip)
    assert_quant_close(out, ref, v, step, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_group_clip_ratios_tensor_matches_reference(dtype):
    w = heavy_tailed((6, 32), seed=3, dtype=dtype)
    ratios = torch.linspace(0.5, 1.0, 12, dtype=torch.float64).reshape(6, 2)
    ref, v, step = ref_weight_qdq(w, 4, 16, True, ratios)
    assert_quant_close(quantize_weight(w, 4, 16, True, ratios), ref, v, step, dtype)


@pytest.mark.parametrize("sym", [True, False])
def test_outputs_lie_on_the_integer_grid(sym):
    w = heavy_tailed((8, 32), seed=11)
    scale, zero = weight_scales(w, 3, 8, sym)
    q = quantize_weight(w, 3, 8, sym).reshape(8, 4, 8) / scale + zero
    qmin, qmax = quant_range(3, sym)
    assert torch.allclose(q, torch.round(q), atol=1e-9)
    assert torch.round(q).min() >= qmin and torch.round(q).max() <= qmax
    assert scale.shape == zero.shape == (8, 4, 1)


def test_sixteen_bits_means_off_and_zero_rows_are_kept():
    x = heavy_tailed((3, 8), seed=1)
    assert quantize_weight(x, 16) is x and quantize_activation(x, 16) is x and fake_quantize_activation(x, 16) is x
    z = torch.zeros(2, 8)
    assert torch.equal(quantize_weight(z, 4, sym=False), z) and torch.equal(compute_scales(z, 4)[0], torch.ones(2, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [True, False])
def test_fake_quant_forward_equals_quantize(dtype, sym):
    x = heavy_tailed((4, 32), seed=5, dtype=dtype)
    assert torch.equal(fake_quantize_activation(x, 4, sym, 0.9), quantize_activation(x, 4, sym, 0.9))
    assert torch.equal(fake_quantize_weight(x, 4, 8, sym, 0.9), quantize_weight(x, 4, 8, sym, 0.9))


def _ref_inside(v: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    r = torch.round(v)
    return ((r >= qmin) & (r <= qmax)).to(torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.6])
def test_ste_gradient_is_identity_inside_clip_range_and_zero_outside(dtype, sym, clip):
    x = heavy_tailed((3, 4, 40), seed=21, dtype=dtype).requires_grad_(True)
    upstream = heavy_tailed((3, 4, 40), seed=22, dtype=dtype)
    (fake_quantize_activation(x, 4, sym, clip) * upstream).sum().backward()
    _, v, _ = ref_act_qdq(x.detach(), 4, sym, clip)
    inside = _ref_inside(v, *quant_range(4, sym))
    expected = upstream.to(torch.float64) * inside
    near = ((v - torch.floor(v)) - 0.5).abs() < TIE_BAND[dtype]  # boundary elements may flip outside float64
    assert torch.equal(x.grad.to(torch.float64)[~near], expected[~near])
    if clip == 1.0:
        assert bool(inside.all()), "without clipping every element is inside the range"
    else:
        assert 0 < int((inside == 0).sum()) < inside.numel() // 4, "clip 0.6 must zero the gradient of the outliers"


@pytest.mark.parametrize("group_size", [None, 8])
def test_ste_weight_gradient(group_size):
    w = heavy_tailed((6, 32), seed=2).requires_grad_(True)
    fake_quantize_weight(w, 3, group_size, True, 0.7).sum().backward()
    _, v, _ = ref_weight_qdq(w.detach(), 3, group_size, True, 0.7)
    assert torch.equal(w.grad, _ref_inside(v, *quant_range(3, True)))


def ref_clip_search(w, bits, group_size, sym, grid, max_shrink, norm):
    """Brute force per row/group in float64 with the reference quantizer; ties keep the larger ratio."""
    g = group_size or w.shape[1]
    best = torch.ones(w.shape[0], w.shape[1] // g, dtype=torch.float64)
    for r in range(w.shape[0]):
        for j in range(w.shape[1] // g):
            row = w[r, j * g : (j + 1) * g].to(torch.float64)
            errs = [((ref_row_qdq(row, bits, sym, 1 - i / grid)[0] - row).abs() ** norm).sum() for i in range(int(max_shrink * grid))]
            best[r, j] = 1 - min(range(len(errs)), key=lambda i: (errs[i], i)) / grid
    return best


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("norm", [2.0, 2.4])
def test_clip_search_matches_bruteforce_reference(sym, group_size, norm):
    w = heavy_tailed((5, 32), seed=9)
    got = mse_clip_search(w, 3, group_size, sym, grid=20, max_shrink=0.5, norm=norm)
    assert torch.equal(got, ref_clip_search(w, 3, group_size, sym, 20, 0.5, norm))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_clip_search_never_worse_than_no_clipping(dtype, sym, group_size):
    w = heavy_tailed((16, 64), seed=31, dtype=dtype)
    ratios = mse_clip_search(w, 3, group_size, sym, norm=2.0)
    wc = w.to(torch.float32 if dtype != torch.float64 else dtype)  # errors measured in the compute dtype
    err_clip = (quantize_weight(wc, 3, group_size, sym, ratios) - wc).pow(2).reshape(16, -1, group_size or 64).sum(-1)
    err_none = (quantize_weight(wc, 3, group_size, sym) - wc).pow(2).reshape(16, -1, group_size or 64).sum(-1)
    assert bool((err_clip <= err_none).all())
    assert err_clip.sum() < 0.95 * err_none.sum(), "heavy-tailed weights at 3 bits must gain from clipping"


# ---------------------------------------------------------------------------------------------- bad tensor inputs


@pytest.mark.parametrize("bits", [1, 17, 0, 4.0, True])
def test_bits_outside_2_to_16_are_rejected(bits):
    with pytest.raises(ValueError, match=r"int in 2\.\.16"):
        quantize_weight(torch.randn(2, 8), bits)
    with pytest.raises(ValueError, match=r"int in 2\.\.16"):
        fake_quantize_activation(torch.randn(2, 8), bits)


def test_bad_group_size_and_clip_ratio_are_rejected():
    with pytest.raises(ValueError, match="group_size 5 does not divide the input width 8"):
        quantize_weight(torch.randn(2, 8), 4, group_size=5)
    with pytest.raises(ValueError, match=r"clip_ratio must be a number in \(0, 1\]"):
        quantize_activation(torch.randn(2, 8), 4, clip_ratio=1.5)
    with pytest.raises(ValueError, match="expected a 2-D weight"):
        quantize_weight(torch.randn(8), 4)


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
    from rolora_plugin.rotation import install_online_rotations

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
