"""Axolotl integration.

* Default run (no Axolotl needed): the ``rolora:`` pydantic args, and the plugin's hook logic driven in-process
  in Axolotl's hook order with a stand-in ``axolotl.integrations.base.BasePlugin``.
* ``@pytest.mark.axolotl`` (run by ``.ci/run`` as ``pytest -m axolotl``): ``axolotl train
  examples/axolotl/rolora.yml`` with axolotl 0.19.0 (transformers 5.16.1, peft 0.20.0; the newest release on
  Python 3.11) in its own venv, built or reused by ``.ci/axolotl_env.sh 0.19``; offline, CPU, a tiny local Llama
  and a local JSON dataset. A venv that cannot be built fails the test (no skip). Axolotl 0.21 (Python 3.12:
  entry point, resume, ``merge-lora``) is tested in ``test_axolotl_021.py``.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tests.helpers import random_ids, rel_err, tiny_model

from rolora_plugin import RotationConfig, get_rotation_record
from rolora_plugin.errors import RotationError

REPO = Path(__file__).resolve().parents[2]
FLOAT32_MERGE_RTOL = 1e-5  # merged export vs rotated base + unmerged adapter, float32 weights


class Cfg(dict):
    """Axolotl's ``DictDefault`` in miniature: attribute access, None for missing keys."""

    def __getattr__(self, key):
        return self.get(key)


# ---------------------------------------------------------------------------------------------- args

@pytest.fixture
def pydantic():
    return pytest.importorskip("pydantic")  # a dependency of Axolotl, not of rolora-plugin


def test_args_build_the_callback_config(pydantic):
    from rolora_plugin.integrations.axolotl.args import RoLoRAArgs

    assert RoLoRAArgs().rolora is None
    options = RoLoRAArgs(rolora={"rotation": {"seed": 3, "r2": True}, "qat": {"enabled": True, "start_step": 5}}).rolora
    cfg = options.to_rolora_config()
    assert cfg.rotation == RotationConfig(seed=3, r2=True)
    assert cfg.qat.enabled and cfg.qat.start_step == 5 and cfg.monitor.every_n_steps == 50
    assert cfg.export.merged_output_dir is None and options.export.merge  # the plugin exports from disk itself
    assert cfg.lora_lr_scale == "none"
    assert RoLoRAArgs(rolora={"lora_lr_scale": "norm-rms"}).rolora.to_rolora_config().lora_lr_scale == "norm-rms"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"rotation": {"seed": -1}}, "RotationConfig.seed must be a non-negative int"),
        ({"rotation": {"sed": 1}}, "unknown field(s) ['sed']; valid fields are"),
        ({"rotation": {"r1": False, "r4": False}}, "enable at least one"),
        ({"monitor": {"every_n_steps": -2}}, "MonitorConfig.every_n_steps must be an int >= 0"),
        ({"qat": {"a_clip_ratio": 2.0}}, "QATConfig.a_clip_ratio must be in (0, 1]"),
        ({"export": {"merge": "maybe"}}, "rolora.export.merge"),
        ({"monitr": {}}, "rolora.monitr"),
        ({"lora_lr_scale": "rms"}, "lora_lr_scale"),
    ],
)
def test_args_errors_say_what_to_fix(pydantic, section, message):
    from rolora_plugin.integrations.axolotl.args import RoLoRAArgs

    with pytest.raises(pydantic.ValidationError) as e:
        RoLoRAArgs(rolora=section)
    assert message in str(e.value)


def test_args_refuse_quantized_base(pydantic):
    from rolora_plugin.integrations.axolotl.args import RoLoRAArgs

    with pytest.raises(pydantic.ValidationError, match="load_in_4bit loads quantized weights"):
        RoLoRAArgs.model_validate({"rolora": {}, "load_in_4bit": True})
    RoLoRAArgs.model_validate({"load_in_4bit": True})  # without rolora: not our business


# ---------------------------------------------------------------------------------------------- plugin hooks


@pytest.fixture
def plugin(monkeypatch, pydantic):
    """A fresh RoLoRAPlugin built on a stand-in ``BasePlugin`` (Axolotl itself is not installed here)."""
    module = _fresh_plugin_module(monkeypatch)
    yield module.RoLoRAPlugin(), module
    sys.modules.pop("rolora_plugin.integrations.axolotl.plugin", None)


def _fresh_plugin_module(monkeypatch):
    base = types.ModuleType("axolotl.integrations.base")
    base.BasePlugin = type("BasePlugin", (), {})
    for name in ("axolotl", "axolotl.integrations"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "axolotl.integrations.base", base)
    monkeypatch.delitem(sys.modules, "rolora_plugin.integrations.axolotl.plugin", raising=False)
    module = importlib.import_module("rolora_plugin.integrations.axolotl.plugin")  # fresh, on the stand-in base
    assert module.RoLoRAPlugin.__mro__[1] is base.BasePlugin and module.RoLoRAPlugin._primary is None
    return module


def test_plugin_does_nothing_without_a_rolora_section(plugin):
    p, _ = plugin
    cfg = Cfg(adapter="lora", lora_target_modules=["q_proj"])
    p.register(cfg)
    p.pre_model_load(cfg)
    model = tiny_model("llama")
    p.post_model_build(cfg, model)
    p.pre_lora_load(cfg, model)
    assert get_rotation_record(model) is None and "lora_mlp_kernel" not in cfg and cfg.lora_target_modules == ["q_proj"]
    assert p.add_callbacks_pre_trainer(cfg, model) == []
    p.post_train(cfg, model)  # no output_dir needed: inactive


def test_plugin_turns_fused_lora_kernels_off_with_a_reason(plugin, caplog):
    p, module = plugin
    cfg = Cfg(rolora=None, lora_mlp_kernel=True)  # an empty `rolora:` section means "on, with defaults"
    with caplog.at_level(logging.INFO, logger="axolotl.integrations.rolora"):
        p.register(cfg)
    assert cfg["rolora"] == {} and all(cfg[k] is False for k in module.FUSED_LORA_KERNELS)
    assert "overriding lora_mlp_kernel: true -> false" in caplog.text
    assert "would skip RoLoRA's online Hadamard rotations" in caplog.text


def test_plugin_hook_sequence_rotates_maps_targets_and_exports_once(plugin, tmp_path, monkeypatch):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from rolora_plugin.integrations.hf_trainer import RoLoRACallback
    from rolora_plugin.io.export import load_rotated, read_rotation_record

    p, module = plugin
    exports = []
    monkeypatch.setattr(module, "merge_and_export", lambda *a, **kw: exports.append(a) or _real_export(*a, **kw))
    tiny_model("phi3", tie=False).save_pretrained(tmp_path / "base")  # fused qkv_proj / gate_up_proj family
    out = tmp_path / "out"
    user_targets = ["q_proj", "v_proj", "down_proj"]
    cfg = Cfg(rolora={"rotation": {"seed": 5, "r2": True}}, base_model=str(tmp_path / "base"), output_dir=str(out),
              lora_target_modules=list(user_targets))  # fmt: skip
    p.register(cfg)
    p.pre_model_load(cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    p.post_model_build(cfg, model)
    assert get_rotation_record(model).config == RotationConfig(seed=5, r2=True)

    p.pre_lora_load(cfg, model)
    assert cfg.lora_target_modules == ["down_proj", "qkv_proj"]  # what Axolotl hands to peft
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=cfg.lora_target_modules))
    p.post_lora_load(cfg, peft_model)
    assert cfg.lora_target_modules == user_targets  # the user's config again
    (callback,) = p.add_callbacks_pre_trainer(cfg, peft_model)
    assert isinstance(callback, RoLoRACallback) and callback.config.rotation == RotationConfig(seed=5, r2=True)

    _train_a_little(peft_model)
    p.post_train(cfg, peft_model)  # Axolotl's first call: before the final save, nothing to export yet
    assert exports == []
    peft_model.save_pretrained(out)  # Axolotl's save_trained_model
    p.post_train(cfg, peft_model)  # second call: export
    p.post_train_unload(cfg)  # and no second export
    assert len(exports) == 1 and read_rotation_record(out) == get_rotation_record(model)
    ids = random_ids()
    with torch.no_grad():
        merged = load_rotated(out / "rolora-merged")(ids).logits
        reference = PeftModel.from_pretrained(_rotated_base(tmp_path / "base"), out)(ids).logits
    assert rel_err(merged, reference) < FLOAT32_MERGE_RTOL


def test_a_second_registration_stays_inactive(plugin, caplog):
    """Axolotl 0.21 registers the entry point (``rolora.plugin.RoLoRAPlugin``) and a ``plugins:`` line naming
    ``rolora.RoLoRAPlugin`` as two plugins: only the first instance may act (one callback, one export)."""
    p, module = plugin
    second = module.RoLoRAPlugin()
    cfg = Cfg(rolora={"rotation": {"seed": 1}}, lora_mlp_kernel=True)
    with caplog.at_level(logging.INFO, logger="axolotl.integrations.rolora"):
        second.register(cfg)
    assert cfg.lora_mlp_kernel is True and "registered a second time" in caplog.text
    model = tiny_model("llama")
    second.post_model_build(cfg, model)
    assert get_rotation_record(model) is None and second.add_callbacks_pre_trainer(cfg, model) == []
    p.register(cfg)
    assert cfg.lora_mlp_kernel is False and len(p.add_callbacks_pre_trainer(cfg, model)) == 1


def test_a_later_run_in_the_same_process_is_active(monkeypatch, pydantic):
    """The primary instance is held weakly: once a run's plugins are gone, the next run's first instance does the
    work (a class-level strong reference kept the first instance forever and silently switched RoLoRA off for every
    later run in the process: a notebook, a sweep, this test suite)."""
    import gc

    module = _fresh_plugin_module(monkeypatch)
    try:
        run1 = [module.RoLoRAPlugin(), module.RoLoRAPlugin()]  # entry point + `plugins:` line
        assert [p._duplicate() for p in run1] == [False, True]
        del run1
        gc.collect()
        run2 = [module.RoLoRAPlugin(), module.RoLoRAPlugin()]
        assert [p._duplicate() for p in run2] == [False, True]
        cfg, model = Cfg(rolora={"rotation": {"seed": 1}}), tiny_model("llama")
        run2[0].post_model_build(cfg, model)
        assert get_rotation_record(model) is not None and len(run2[0].add_callbacks_pre_trainer(cfg, model)) == 1
    finally:
        sys.modules.pop("rolora_plugin.integrations.axolotl.plugin", None)


def test_post_lora_merge_replaces_axolotls_merge_into_the_unrotated_base(plugin, tmp_path):
    """``axolotl merge-lora`` (0.21, default memory-efficient method) adds the adapter to the *unrotated* base
    shards; ``post_lora_merge`` replaces that output with the merge in the rotated basis (+ record)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from rolora_plugin.io.export import load_rotated, read_rotation_record
    from rolora_plugin.integrations.hf_trainer import install_save_hook

    p, _ = plugin
    tiny_model("llama").save_pretrained(tmp_path / "base")
    cfg = Cfg(rolora={"rotation": {"seed": 5}}, base_model=str(tmp_path / "base"), output_dir=str(tmp_path / "out"))
    p.register(cfg)
    p.pre_model_load(cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    p.post_model_build(cfg, model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    _train_a_little(peft_model)
    install_save_hook(peft_model)  # what the plugin's callback does: the adapter is saved with its record
    peft_model.save_pretrained(tmp_path / "out")
    # what Axolotl's memory-efficient merge writes: the adapter added to the unrotated base
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    PeftModel.from_pretrained(plain, tmp_path / "out").merge_and_unload().save_pretrained(tmp_path / "out" / "merged")
    ids = random_ids()
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        wrong = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32)(ids).logits
    assert rel_err(wrong, expected) > 100 * FLOAT32_MERGE_RTOL  # Axolotl's merge is not the trained model

    p.post_lora_merge(cfg, str(tmp_path / "out"), str(tmp_path / "out" / "merged"))
    assert read_rotation_record(tmp_path / "out" / "merged") == get_rotation_record(model)
    with torch.no_grad():
        fixed = load_rotated(tmp_path / "out" / "merged")(ids).logits
    assert rel_err(fixed, expected) < FLOAT32_MERGE_RTOL

    (tmp_path / "out" / "rolora_rotation.json").unlink()
    with pytest.raises(RotationError, match="has no rolora_rotation.json"):
        p.post_lora_merge(cfg, str(tmp_path / "out"), str(tmp_path / "out" / "merged"))


def _real_export(*args, **kwargs):
    from rolora_plugin.io.export import merge_and_export

    return merge_and_export(*args, **kwargs)


def _rotated_base(path):
    from transformers import AutoModelForCausalLM

    from rolora_plugin import rotate_model_

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rotate_model_(model, RotationConfig(seed=5, r2=True), progress=False)
    return model


def _train_a_little(model) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for seed in range(3):
        ids = random_ids(seed=seed)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def axolotl_venv() -> Path:
    """The Axolotl 0.19 venv from .ci/axolotl_env.sh 0.19 (built on first use: ~7 min); fails loudly if it cannot be built."""
    proc = subprocess.run(["bash", str(REPO / ".ci" / "axolotl_env.sh"), "0.19"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f".ci/axolotl_env.sh 0.19 failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    venv = Path(proc.stdout.strip().splitlines()[-1])
    assert (venv / "bin" / "axolotl").is_file(), f"{venv} has no bin/axolotl"
    return venv


@pytest.fixture(scope="module")
def axolotl_run(axolotl_venv, tmp_path_factory):
    """``axolotl train examples/axolotl/rolora.yml --launcher python`` in a temp dir with the tiny assets."""
    work = tmp_path_factory.mktemp("axolotl")
    env = {**os.environ, "PATH": f"{axolotl_venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}  # fmt: skip
    assets = subprocess.run(["python", str(REPO / "examples" / "axolotl" / "make_tiny_assets.py"), "."], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert assets.returncode == 0, assets.stderr[-4000:]
    cmd = ["axolotl", "train", str(REPO / "examples" / "axolotl" / "rolora.yml"), "--launcher", "python"]
    proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    (work / "axolotl.log").write_text(proc.stdout)
    assert proc.returncode == 0, f"axolotl train failed (exit {proc.returncode}); log tail:\n{proc.stdout[-8000:]}"
    return work, proc.stdout


@pytest.mark.axolotl
def test_axolotl_venv_runs_the_core_with_its_pins(axolotl_venv):
    """rolora_plugin on transformers 5.16.1 / peft 0.20.0: rotate, attach LoRA, merge, all exact."""
    code = (
        "import sys; sys.path.insert(0, '.'); import torch, transformers, peft\n"
        "from tests.helpers import tiny_model, random_ids\n"
        "from rolora_plugin import rotate_model_, RotationConfig\n"
        "from rolora_plugin.lora import get_rolora_peft_model, rolora_lora_config\n"
        "m = tiny_model('llama', dtype=torch.float64); ids = random_ids(); ref = m(ids).logits\n"
        "pm = get_rolora_peft_model(m, rolora_lora_config(m, r=4, target_modules=['q_proj', 'down_proj']), RotationConfig(r2=True, r3=True))\n"
        "err = ((pm(ids).logits - ref).abs().max() / ref.abs().max()).item()\n"
        "print(transformers.__version__, peft.__version__, err); assert err < 1e-6, err  # stock RMSNorm: float32 floor\n"
    )
    proc = subprocess.run([str(axolotl_venv / "bin" / "python"), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("5.16.1 0.20.0 ")


@pytest.mark.axolotl
def test_axolotl_train_rotates_trains_and_exports(axolotl_run):
    from safetensors.torch import load_file

    from rolora_plugin.io.export import load_rotated, read_rotation_record

    work, log = axolotl_run
    out = work / "outputs" / "rolora-tiny"
    record = read_rotation_record(out)
    assert record is not None and record.config == RotationConfig(seed=7, r2=True)  # as in rolora.yml
    record.verify()
    assert read_rotation_record(out / "rolora-merged") == record
    assert "lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel set to false" in log
    assert '"lora_mlp_kernel": false' in log and '"lora_qkv_kernel": false' in log and '"lora_o_kernel": false' in log
    assert "rolora/eval_loss_w4a4" in log  # the monitor ran inside Axolotl's trainer
    assert log.count("merged model with its rotation record exported") == 1  # post_train runs twice

    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(lora_b) == 6 and all(v.abs().max() > 0 for v in lora_b.values())  # q/v/down x 2 layers, trained

    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    merged_model = load_rotated(out / "rolora-merged", dtype=torch.float32)
    norms = [m.weight for n, m in merged_model.named_modules() if n.endswith("norm")]
    assert len(norms) == 5 and all(torch.all(w == 1) for w in norms)  # folded into the linears
    with torch.no_grad():
        merged = merged_model(ids).logits
        reference = _rotated_with_adapter(work / "tiny-llama", record.config, out)(ids).logits
        untrained = _rotated_with_adapter(work / "tiny-llama", record.config, None)(ids).logits
    assert rel_err(merged, reference) < FLOAT32_MERGE_RTOL
    assert rel_err(merged, untrained) > 100 * FLOAT32_MERGE_RTOL


def _rotated_with_adapter(base: Path, rotation: RotationConfig, adapter: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rolora_plugin import rotate_model_

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    rotate_model_(model, rotation, progress=False)
    return PeftModel.from_pretrained(model, str(adapter)).eval() if adapter is not None else model
