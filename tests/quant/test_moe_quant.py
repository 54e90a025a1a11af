"""W4A4 on Mixture-of-Experts models (per-expert weights, expert inputs, GPTQ Hessians from routed tokens) and on
the language tower of a LLaVA model only."""

from __future__ import annotations

import logging

import pytest
import torch

from rolora_plugin import rotate_model_
from rolora_plugin.errors import QuantizationError
from rolora_plugin._peft import base_experts
from rolora_plugin.model.online import add_expert_gate_transform, expert_gate_transforms
from rolora_plugin.quant import QuantConfig, quantize_model_
from rolora_plugin.quant.model import remove_activation_quantizers
from rolora_plugin.quant.primitives import quantize_weight
from tests.core.moe_helpers import MOE_FAMILIES, tiny_moe
from tests.helpers import logits, random_ids, rel_err, tiny_llava


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: fastest (and polite) on one thread


def _experts(model):
    return {i: base_experts(layer.mlp.experts) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}


@pytest.mark.parametrize("group", [None, 16])
def test_rtn_quantizes_every_expert_per_output_channel(group):
    model = tiny_moe("qwen2_moe")
    before = {i: (e.gate_up_proj.detach().clone(), e.down_proj.detach().clone()) for i, e in _experts(model).items()}
    record = quantize_model_(model, QuantConfig(w_bits=4, a_bits=16, w_group_size=group), progress=False)
    assert record.experts == ["model.layers.0.mlp.experts"]  # layer 1 is a dense MLP (its linears are in .quantized)
    assert "model.layers.1.mlp.down_proj" in record.quantized and "model.layers.0.mlp.shared_expert.down_proj" in record.quantized
    for i, experts in _experts(model).items():
        for p, w0 in zip((experts.gate_up_proj, experts.down_proj), before[i]):
            for e in range(p.shape[0]):  # each expert on its own grid: RTN of that expert's [out, in] matrix
                assert torch.equal(p[e], quantize_weight(w0[e], 4, group, True)), (i, e)
    assert 0 < record.weight_error["model.layers.0.mlp.experts.down_proj"] < 0.5


def test_rtn_bad_group_size_for_experts_is_refused():
    model = tiny_moe("mixtral")  # expert width 48, hidden 64
    with pytest.raises(QuantizationError, match="experts.down_proj"):
        quantize_model_(model, QuantConfig(w_bits=4, a_bits=16, w_group_size=32), progress=False)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_w4a4_rtn_on_rotated_moe_quantizes_expert_inputs_after_r4(family):
    ids = random_ids()
    model = tiny_moe(family)
    ref = logits(model, ids)
    rotate_model_(model, progress=False)
    record = quantize_model_(model, QuantConfig(w_bits=16, a_bits=4), progress=False)
    experts = list(_experts(model).values())
    assert record.experts and all(expert_gate_transforms(e) == ("r4", "act_quant") for e in experts)
    seen = []
    add_expert_gate_transform(experts[0], "probe", lambda x: seen.append(x) or x)  # what down_proj reads
    quantized = logits(model, ids)
    assert seen and all(len(torch.unique(row)) <= 16 for row in seen[0])  # per token on a 4-bit grid
    assert rel_err(quantized, ref) > 1e-3
    remove_activation_quantizers(model)
    assert expert_gate_transforms(experts[0]) == ("r4", "probe") and all(expert_gate_transforms(e) == ("r4",) for e in experts[1:])
    assert rel_err(logits(model, ids), ref) <= 1e-4  # back to the (rotated) full-precision function


def test_expert_activation_quantizers_refuse_eager():
    model = tiny_moe("olmoe", impl="eager")
    with pytest.raises(QuantizationError, match="batched_mm"):
        quantize_model_(model, QuantConfig(w_bits=16, a_bits=4), progress=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_gptq_hessians_per_expert_from_the_routed_tokens(family):
    model = tiny_moe(family)
    rotate_model_(model, progress=False)
    calib = [random_ids(seed=5), random_ids(seed=6)]
    record = quantize_model_(model, QuantConfig(w_bits=4, a_bits=16, method="gptq"), calibration=calib, progress=False)
    # the quantized model (W4A16: routers and inputs unquantized) routes the calibration tokens as GPTQ saw them
    counts = {}
    with torch.no_grad():
        for ids in calib:
            for i, router_logits in enumerate(model(input_ids=ids, output_router_logits=True).router_logits):
                if f"model.layers.{i}.mlp.experts" in record.experts:
                    top = router_logits.topk(model.config.num_experts_per_tok, dim=-1).indices.reshape(-1)
                    n = torch.bincount(top, minlength=router_logits.shape[-1])
                    counts[i] = counts.get(i, 0) + n
    assert record.expert_tokens == {f"model.layers.{i}.mlp.experts": c.tolist() for i, c in counts.items()}
    assert sum(sum(c) for c in record.expert_tokens.values()) == len(record.experts) * 2 * 2 * 16 * 2  # top-2


def test_gptq_expert_without_tokens_falls_back_to_rtn(caplog):
    model = tiny_moe("mixtral", experts=8, top_k=1, layers=1)
    w0 = base_experts(model.model.layers[0].mlp.experts).down_proj.detach().clone()
    with caplog.at_level(logging.WARNING, logger="rolora_plugin.quant.gptq"):
        record = quantize_model_(model, QuantConfig(w_bits=4, a_bits=16, method="gptq"), calibration=[random_ids(batch=1, seq=2)], progress=False)
    counts = record.expert_tokens["model.layers.0.mlp.experts"]
    idle = [e for e, c in enumerate(counts) if c == 0]
    assert sum(counts) == 2 and len(idle) >= 6
    assert all(f"expert {e} of model.layers.0.mlp.experts received no calibration tokens" in caplog.text for e in idle)
    down = base_experts(model.model.layers[0].mlp.experts).down_proj
    assert all(torch.equal(down[e], quantize_weight(w0[e], 4, None, True)) for e in idle)


def test_gptq_beats_rtn_on_the_routed_tokens():
    calib = [random_ids(seed=5), random_ids(seed=6)]
    errs = {}
    for method in ("rtn", "gptq"):
        model = tiny_moe("olmoe", layers=1)
        rotate_model_(model, progress=False)
        ref = logits(model, calib[0])
        quantize_model_(model, QuantConfig(w_bits=3, a_bits=16, method=method), calibration=calib, progress=False)
        errs[method] = rel_err(logits(model, calib[0]), ref)
    assert errs["gptq"] < errs["rtn"]


# ---------------------------------------------------------------------------------------------- LLaVA


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_llava_w4a4_quantizes_the_language_tower_only(method):
    model, ids, pixels = tiny_llava()
    rotate_model_(model, progress=False)
    outside = {k: v.clone() for k, v in model.state_dict().items() if "language_model" not in k}
    calib = [{"input_ids": ids, "pixel_values": pixels}]
    record = quantize_model_(model, QuantConfig(method=method), calibration=calib, progress=False)
    assert record.quantized and all(n.startswith("model.language_model.layers.") for n in record.quantized)
    assert any(n.startswith("model.vision_tower.") for n in record.skipped) and "model.multi_modal_projector.linear_2" in record.skipped
    assert all(torch.equal(v, outside[k]) for k, v in model.state_dict().items() if k in outside)  # vision tower untouched
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w4a4_on_a_rotated_moe_stays_close_to_full_precision(method):
    ids = random_ids(seed=9)
    model = tiny_moe("qwen2_moe")
    ref = logits(model, ids)
    rotate_model_(model, progress=False)
    calib = [random_ids(seed=5), random_ids(seed=6)]
    record = quantize_model_(model, QuantConfig(method=method), calibration=calib, progress=False)
    assert record.experts and (method == "rtn") == (record.expert_tokens == {})
    assert rel_err(logits(model, ids), ref) < 1.0  # W4A4 noise, not a broken model


def test_fake_quant_w4a4_refuses_fused_experts_it_cannot_quantize():
    """QAT / the W4A4 monitor fake-quantize nn.Linear layers only: on an MoE that would leave every expert in full
    precision under a W4A4 label, so all-linear fake quant is refused; listed leaves and the FP bypass still work."""
    from rolora_plugin.quant import enable_fake_quant_, fake_quantized

    model = tiny_moe("qwen2_moe")
    ids = random_ids(101, 1, 8)
    ref = logits(model, ids)
    with pytest.raises(ValueError, match="fused MoE experts"):
        enable_fake_quant_(model, QuantConfig())
    assert torch.equal(logits(model, ids), ref)  # nothing was installed
    with fake_quantized(model, None):
        assert torch.equal(logits(model, ids), ref)
    handle = enable_fake_quant_(model, QuantConfig(), targets=["q_proj", "v_proj"])
    assert set(n.rsplit(".", 1)[-1] for n in handle.modules) == {"q_proj", "v_proj"}
    assert not torch.equal(logits(model, ids), ref)
    handle.remove()
