"""The one fine-tune harness (``rolora_plugin/app/train.py``: :class:`FinetuneSettings` → :func:`finetune`) and
the settings each of its users hands it: ``rolora train`` (constant schedule after the warm-up, data order from
the seed), ``benchmarks/_finetune.py`` (``RunSettings.finetune_settings``: cosine, ``data_seed``, per-method
rotation / QAT / optimizer). A tiny model trains end to end: the same seed draws the same LoRA initialisation,
plain-LoRA QAT is on during training only, the caller's callbacks run after the settings' own."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

from rolora_plugin import QATConfig
import torch

pytest.importorskip("peft")

from rolora_plugin import RoLoRACallback, RotationConfig  # noqa: E402
from rolora_plugin.app.train import (  # noqa: E402
    FinetuneSettings,
    TrainConfig,
    attach_lora,
    finetune,
    finetune_settings,
    load_base_model,
    settings_callbacks,
    tokenize_dataset,
    training_arguments,
)
from rolora_plugin.quant import fake_quant_active  # noqa: E402
from tests.app.fixtures import save_tiny  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _finetune as ft  # noqa: E402

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, tokenized rows) of a tiny llama with the character tokenizer."""
    path = save_tiny(tmp_path_factory.mktemp("harness") / "tiny")
    _, tok = load_base_model(str(path))
    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(8)]
    return path, tokenize_dataset(tok, pairs, 64)


def test_rolora_train_settings(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=7, learning_rate=1e-3, batch_size=3, grad_accum=2,
                      warmup_steps=2, logging_steps=3, seed=5, save_steps=4, rotate=True)  # fmt: skip
    s = finetune_settings(cfg)
    assert (s.steps, s.lr, s.batch_size, s.grad_accum, s.warmup_steps, s.logging_steps, s.seed, s.save_steps) == (7, 1e-3, 3, 2, 2, 3, 5, 4)
    assert s.lora == cfg.lora_kwargs() and s.rotation == cfg.rotation_config() and s.rotation.seed == 5
    assert s.schedule == "constant_with_warmup" and s.data_seed is None and s.optimizer == "adamw"
    assert finetune_settings(TrainConfig(output_dir=str(tmp_path / "o2"), rotate=False)).rotation is None


@pytest.mark.parametrize("method", sorted(set(ft.METHODS) - set(ft.NOT_TRAINED)))
def test_benchmark_runs_are_harness_settings(method):
    run = ft.RunSettings(method=method, targets="all-linear", seed=3, steps=50, lr=1e-3, rank=8, alpha=16)
    s = run.finetune_settings()
    rotate, qat = ft.METHODS[method]
    assert (s.steps, s.lr, s.batch_size, s.seed, s.data_seed, s.logging_steps) == (50, 1e-3, 4, 3, 3, 1)
    assert (s.schedule, s.warmup_steps, s.optimizer) == ("cosine", 5, "adamw")
    assert s.lora == {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0}
    assert s.rotation == (RotationConfig(seed=3) if rotate else None)
    assert s.qat == QATConfig.from_dict({"enabled": True, "preset": qat} if isinstance(qat, str) else {"enabled": qat})
    assert ft.RunSettings(method="rolora", targets="qv", seed=0, steps=200).finetune_settings().warmup_steps == 10


def test_training_arguments_carry_the_settings(tmp_path):
    s = FinetuneSettings(steps=9, lr=2e-3, batch_size=2, seed=1, lora=LORA, schedule="cosine", warmup_steps=1,
                         optimizer="sgd", data_seed=4, save_steps=3, grad_accum=2, logging_steps=2)  # fmt: skip
    args = training_arguments(s, str(tmp_path))
    assert (args.max_steps, args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (9, 2e-3, 2, 2)
    assert (args.seed, args.data_seed, args.warmup_steps, args.logging_steps, args.weight_decay) == (1, 4, 1, 2, 0.0)
    assert args.lr_scheduler_type == "cosine" and args.optim == "sgd" and args.optim_args == "momentum=0.9"
    assert args.save_strategy == "steps" and (args.save_steps, args.save_total_limit) == (3, 2)
    plain = training_arguments(FinetuneSettings(steps=1, lr=1e-3, batch_size=1, seed=0, lora=LORA), str(tmp_path))
    assert plain.save_strategy == "no" and plain.lr_scheduler_type == "constant_with_warmup"
    assert plain.data_seed is None and plain.use_cpu and plain.disable_tqdm
    with pytest.raises(ValueError, match=r"FinetuneSettings.optimizer must be 'adamw' or 'sgd', got 'adam'"):
        FinetuneSettings(steps=1, lr=1e-3, batch_size=1, seed=0, lora=LORA, optimizer="adam")


def test_settings_callbacks():
    base = {"steps": 1, "lr": 1e-3, "batch_size": 1, "seed": 0, "lora": LORA}
    (cb,) = settings_callbacks(FinetuneSettings(**base, rotation=RotationConfig(seed=2), lora_lr_scale="norm-rms",
                                                qat={"enabled": True, "preset": "nvfp4"}))  # fmt: skip
    assert isinstance(cb, RoLoRACallback) and cb.config.rotation.seed == 2 and cb.config.lora_lr_scale == "norm-rms"
    assert cb.config.qat.enabled and cb.config.qat.preset == "nvfp4" and cb.config.monitor.every_n_steps == 0
    assert settings_callbacks(FinetuneSettings(**base)) == []
    assert settings_callbacks(FinetuneSettings(**base, qat={"enabled": False})) == []
    (qat,) = settings_callbacks(FinetuneSettings(**base, qat={"enabled": True}))
    assert type(qat).__name__ == "PlainQAT"


def test_one_seed_draws_one_lora_initialisation(tiny):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny[0])
    s = FinetuneSettings(steps=1, lr=1e-3, batch_size=2, seed=7, lora=LORA)
    a, b = (attach_lora(copy.deepcopy(base), s) for _ in range(2))
    torch.manual_seed(123)  # the global RNG state before the call does not matter
    c = attach_lora(copy.deepcopy(base), s)
    lora_a = [{n: p for n, p in m.named_parameters() if "lora_" in n} for m in (a, b, c)]
    assert lora_a[0] and all(torch.equal(lora_a[0][n], other[n]) for other in lora_a[1:] for n in lora_a[0])


def test_finetune_trains_with_plain_qat_and_the_callers_callbacks_last(tiny):
    from transformers import TrainerCallback

    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(fake_quant_active(model))

    model, tok = load_base_model(str(tiny[0]))
    s = FinetuneSettings(steps=3, lr=1e-2, batch_size=2, seed=0, lora=LORA, qat={"enabled": True}, warmup_steps=1)
    trainer = finetune(model, tok, tiny[1], s, callbacks=[Probe()])
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("PlainQAT") < names.index("Probe")
    assert trainer.state.global_step == 3 and seen == [True, True, True] and not fake_quant_active(trainer.model)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)


def test_resume_accepts_a_run_config_written_before_typed_sections(tmp_path):
    """Checkpoints of an earlier version stored ``rotation`` / ``qat`` as bare override mappings (``{}``): the same
    run, so --resume goes on; a setting that really changed is still refused by name."""
    from rolora_plugin.app.train import TrainInputError, _check_same_run
    from rolora_plugin.app.train_config import TrainConfig

    cfg = TrainConfig(output_dir=str(tmp_path / "out"), seed=3)
    earlier = {**cfg.to_dict(), "rotation": {}, "qat": {}}
    _check_same_run(earlier, cfg, tmp_path)
    _check_same_run({**earlier, "max_steps": 7}, cfg, tmp_path)  # may change on resume
    with pytest.raises(TrainInputError, match=r"other settings \(learning_rate\)"):
        _check_same_run({**earlier, "learning_rate": 1e-3}, cfg, tmp_path)
    with pytest.raises(TrainInputError, match=r"other settings \(rotation\)"):
        _check_same_run({**earlier, "rotation": {"r2": True}}, cfg, tmp_path)


def test_plain_qat_starts_at_its_start_step(tiny):
    """A LoRA run's QAT, like RoLoRACallback's, switches on at ``qat.start_step``, not before."""
    from transformers import TrainerCallback

    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(fake_quant_active(model))

    model, tok = load_base_model(str(tiny[0]))
    s = FinetuneSettings(steps=3, lr=1e-2, batch_size=2, seed=0, lora=LORA, qat={"enabled": True, "start_step": 2})
    finetune(model, tok, tiny[1], s, callbacks=[Probe()])
    assert seen == [False, False, True]
