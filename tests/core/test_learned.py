"""Learned rotations (rolora_plugin.rotate.learned): exactness, orthogonality, objective, record round trip, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from rolora_plugin import RotationConfig, RotationError, RotationRecord, get_rotation_record, rotate_model_
from rolora_plugin.model.architectures import ModelDims, get_architecture
from rolora_plugin.io.export import LEARNED_FILE, RECORD_FILE, load_rotated, merge_and_export, quantize_and_export
from rolora_plugin.rotate.learned import ORTHOGONALITY_TOL, collect_sites, learn_rotations, orthogonality_error, rotation_objective
from rolora_plugin.io.records import load_learned
from rolora_plugin.quant import QuantConfig
from rolora_plugin.rotate.rotation import build_rotations
from tests.helpers import F64_NORM_RTOL, float64_norms, logits, random_ids, rel_err, tiny_model

FAST = dict(learn_steps=4, learn_tokens=32, learn_lr=3e-3)


def _calib(n=2, seq=16):
    return [random_ids(batch=1, seq=seq, seed=100 + k) for k in range(n)]


def _learned(model, learn=("r1",), **kw):
    cfg = RotationConfig(r2=True, learn=learn, **{**FAST, **kw})
    return rotate_model_(model, cfg, calibration=_calib(), progress=False)


def _outlier_model(dtype=torch.float32):
    """Tiny llama whose residual stream has a few large channels (as real LLMs do), untied."""
    model = tiny_model("llama", dtype=dtype, tie=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :3] *= 30.0
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_learned_r1_r2_float64_exact(family):
    ids = random_ids()
    model = tiny_model(family, dtype=torch.float64)
    with float64_norms(model):
        ref = logits(model, ids)
        record = _learned(model, learn=("r1", "r2"))
        assert rel_err(logits(model, ids), ref) <= F64_NORM_RTOL
    assert record.rotations["r1"]["learned"] and record.rotations["r2"]["learned"]
    assert record.rotations["r1"]["description"].startswith("learned-r1(")


def test_learned_r1_stock_norms_float64():
    ids = random_ids()
    model = tiny_model("llama", dtype=torch.float64)
    ref = logits(model, ids)
    _learned(model)
    assert rel_err(logits(model, ids), ref) <= 1e-6  # stock norms compute in float32


def test_learned_matrices_orthogonal_and_not_the_hadamard_start():
    model = _outlier_model()
    record = _learned(model, learn=("r1", "r2"), learn_steps=30)
    transforms = record.verify()
    start = build_rotations(record.config, record.dims)
    for name in ("r1", "r2"):
        m = transforms[name].dense
        assert m.dtype == torch.float64 and orthogonality_error(m) <= ORTHOGONALITY_TOL
        assert not torch.equal(m, start[name].matrix())


def test_objective_decreases_on_outlier_channels():
    model = _outlier_model()
    spec, dims = get_architecture(model), ModelDims.from_config(model.config)
    cfg = RotationConfig(learn=("r1",), learn_steps=30, learn_tokens=32, learn_lr=3e-3)
    start = build_rotations(cfg, dims)
    learned = learn_rotations(model, spec, dims, cfg, start, _calib(), progress=False)
    quant = QuantConfig.preset(cfg.learn_quant)
    sites = collect_sites(model, spec, cfg, _calib(), torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = rotation_objective(sites, {"r1": start["r1"].matrix().float()}, quant).item()
        after = rotation_objective(sites, {"r1": learned["r1"].dense.float()}, quant).item()
    assert after < 0.95 * before


def test_same_seed_bit_identical_other_seed_differs():
    mats, models = [], []
    for seed in (0, 0, 1):
        models.append(_outlier_model())  # the learned matrix lives with its model (a record alone cannot rebuild it)
        record = _learned(models[-1], seed=seed)
        mats.append(record.verify()["r1"].dense)
    assert torch.equal(mats[0], mats[1]) and not torch.equal(mats[0], mats[2])


def test_a_learned_matrix_is_not_kept_after_its_model_is_gone():
    """The record and the model hold the learned matrices, nothing module-level does: once both are gone the matrix
    is freed, and a record rebuilt from its dict (config.json) cannot verify without them."""
    import gc
    import weakref

    model = _outlier_model()
    record = _learned(model)
    assert record.verify()["r1"].description.startswith("learned-r1")
    assert get_rotation_record(model).verify()["r1"] is record.learned["r1"]  # the model holds the same matrix
    alive = weakref.ref(record.learned["r1"])
    data = record.to_dict()
    del model, record
    gc.collect()
    assert alive() is None
    with pytest.raises(RotationError, match="does not hold"):
        RotationRecord.from_dict(data).verify()


def test_missing_calibration_refused_before_any_edit():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RotationError, match="calibration"):
        rotate_model_(model, RotationConfig(learn=("r1",)), progress=False)
    assert get_rotation_record(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    model = _outlier_model()
    _learned(model, learn=("r1", "r2"))
    ids = random_ids()
    out = merge_and_export(model, tmp_path_factory.mktemp("learned") / "export")
    return out, logits(model, ids), ids


def test_export_round_trip_same_logits(export_dir):
    out, ref, ids = export_dir
    assert (out / LEARNED_FILE).is_file() and (out / RECORD_FILE).is_file()
    loaded = load_rotated(out)
    assert rel_err(logits(loaded, ids), ref) <= 1e-6  # reload picks another attention kernel: float32 rounding only
    record = get_rotation_record(loaded)
    assert set(loaded._rolora_learned_rotations) == {"r1", "r2"}
    assert record.verify()["r1"].checksum() == record.rotations["r1"]["checksum"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)  # the learned matrices live in a subfolder (rolora/)
    return dst


def test_tampered_matrix_refused(export_dir, tmp_path):
    from safetensors.torch import load, save

    out = _copy(export_dir[0], tmp_path / "tampered")
    tensors = load((out / LEARNED_FILE).read_bytes())
    tensors["r1"][0, 0] += 1e-9
    (out / LEARNED_FILE).write_bytes(save(tensors))
    with pytest.raises(RotationError, match="sha256"):
        load_rotated(out)


def test_missing_matrix_file_refused(export_dir, tmp_path):
    out = _copy(export_dir[0], tmp_path / "missing")
    (out / LEARNED_FILE).unlink()
    with pytest.raises(RotationError, match="missing"):
        load_rotated(out)


def test_non_orthogonal_matrix_refused_even_with_a_matching_sha(export_dir, tmp_path):
    import hashlib

    from safetensors.torch import load, save

    out = _copy(export_dir[0], tmp_path / "skewed")
    tensors = load((out / LEARNED_FILE).read_bytes())
    tensors["r1"] = tensors["r1"] * 1.001
    (out / LEARNED_FILE).write_bytes(save(tensors))
    record = RotationRecord.from_dict(json.loads((out / RECORD_FILE).read_text()))  # the JSON alone: nothing verified yet
    record.rotations["r1"]["sha256"] = hashlib.sha256(tensors["r1"].numpy().tobytes()).hexdigest()
    with pytest.raises(RotationError, match="not orthogonal"):
        load_learned(out, record)


def test_compressed_export_round_trip(tmp_path):
    model = _outlier_model()
    ids = random_ids()
    rot = RotationConfig(r2=True, learn=("r1",), **FAST)
    out = quantize_and_export(model, tmp_path / "w4a4", QuantConfig(w_bits=4, a_bits=4), calibration=_calib(), rotation=rot, progress=False, not_servable_ok=True)
    assert (out / LEARNED_FILE).is_file()
    assert rel_err(logits(load_rotated(out), ids), logits(model, ids)) <= 1e-5


def test_streaming_refuses_a_learning_config(tmp_path):
    from rolora_plugin.io.streaming import rotate_checkpoint

    with pytest.raises(RotationError, match="cannot learn"):
        rotate_checkpoint(tmp_path / "src", tmp_path / "out", RotationConfig(learn=("r1",)))


def test_record_json_marks_learned(export_dir):
    data = json.loads((export_dir[0] / RECORD_FILE).read_text())
    assert data["rotations"]["r1"]["learned"] is True and len(data["rotations"]["r1"]["sha256"]) == 64
    assert "learned" not in data["rotations"]["r4"]


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learn=("r3",)), "cannot be learned"),
        (dict(learn="r1"), "list of rotation names"),
        (dict(learn=("r2",)), "r2=False"),
        (dict(learn=("r1",), learn_steps=0), "learn_steps"),
        (dict(learn_tokens=1.5), "learn_tokens"),
        (dict(learn_layers_per_step=-1), "learn_layers_per_step"),
        (dict(learn_lr=0.0), "learn_lr"),
        (dict(learn_lr=True), "learn_lr"),
        (dict(learn_quant=""), "learn_quant"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RotationConfig(**kwargs)


def test_unknown_learn_quant_preset_refused_before_any_edit():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown QuantConfig preset 'w3a3'"):
        rotate_model_(model, RotationConfig(learn=("r1",), learn_quant="w3a3"), calibration=_calib(), progress=False)
    assert get_rotation_record(model) is None


def test_config_presets_and_round_trip():
    assert RotationConfig.preset("default") == RotationConfig()
    cfg = RotationConfig.preset("w4a4", seed=3)
    assert cfg.seed == 3 and cfg.r1 and cfg.r2 and cfg.r4 and cfg.learn == ("r1", "r2")
    assert RotationConfig.preset("w4a4-hadamard") == RotationConfig(r2=True)
    assert RotationConfig.from_json(RotationConfig(learn=["r1"]).to_json()) == RotationConfig(learn=("r1",))
    with pytest.raises(ValueError, match="unknown RotationConfig preset"):
        RotationConfig.preset("w2a2")


def test_hf_save_hook_writes_the_matrices_beside_the_record(tmp_path):
    from rolora_plugin.integrations.hf_trainer import install_save_hook

    model = _outlier_model()
    _learned(model)
    install_save_hook(model)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / LEARNED_FILE).is_file() and (tmp_path / "ckpt" / RECORD_FILE).is_file()
    assert load_learned(tmp_path / "ckpt", get_rotation_record(model))["r1"].checksum() == get_rotation_record(model).rotations["r1"]["checksum"]


def test_adapter_on_the_unrotated_base_merges_with_the_stored_matrix(tmp_path):
    from transformers import AutoModelForCausalLM

    from rolora_plugin.io.export import write_rotation_record
    from tests.helpers import lora

    ids = random_ids()
    _outlier_model().save_pretrained(tmp_path / "base")
    peft_model = lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "all-linear")
    record = _learned(peft_model)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    write_rotation_record(tmp_path / "adapter", record)
    out = merge_and_export(tmp_path / "adapter", tmp_path / "export")  # the base is rotated with the stored R1
    assert rel_err(logits(load_rotated(out), ids), logits(peft_model, ids)) <= 1e-5


@pytest.mark.parametrize("sym", [True, False])
def test_objective_quantizer_matches_the_library_forward(sym):
    from rolora_plugin.quant import quantize_activation
    from rolora_plugin.quant.primitives import TensorQuant, fake_quant

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    x[:, 5] *= 20
    spec = TensorQuant(bits=4, sym=sym)
    assert torch.allclose(fake_quant(x, spec, scale_grad=True), quantize_activation(x, 4, sym), rtol=0, atol=1e-12)
    x.requires_grad_(True)
    fake_quant(x, spec, scale_grad=True).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the scale is in the graph: the gradient differs from the detached-scale STE (which is 1 everywhere unclipped)
    g_scale = x.grad.clone()
    x.grad = None
    fake_quant(x, spec, ste=True).sum().backward()
    assert not torch.allclose(g_scale, x.grad)


def test_learning_r1_on_a_moe_is_refused_before_any_edit():
    from tests.core.moe_helpers import tiny_moe

    model = tiny_moe("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RotationError, match="Mixture-of-Experts"):
        rotate_model_(model, RotationConfig(learn=("r1",), **FAST), calibration=_calib(), progress=False)
    assert get_rotation_record(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_learning_r2_on_a_moe_keeps_the_function():
    from tests.core.moe_helpers import tiny_moe

    model = tiny_moe("mixtral", dtype=torch.float64)
    ids = random_ids()
    ref = logits(model, ids)
    record = rotate_model_(model, RotationConfig(r2=True, learn=("r2",), **FAST), calibration=_calib(), progress=False)
    assert record.rotations["r2"]["learned"] and not record.rotations["r1"].get("learned")
    assert rel_err(logits(model, ids), ref) <= 1e-6  # float64, stock norms (as the MoE rotation tests)
