"""RoLoRA with DeepSpeed ZeRO-2/3 (or a single plain process): HF Trainer + peft LoRA + RoLoRACallback.

Launch (CPU shown; on GPUs drop DS_ACCELERATOR and use nccl as usual)::

    # two processes, ZeRO-3 (or examples/deepspeed/zero2.json)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed/train_ds.py \\
        --deepspeed examples/deepspeed/zero3.json --model BASE_DIR --out OUT_DIR
    # the same with DeepSpeed's launcher
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/deepspeed/train_ds.py --deepspeed ... --model ... --out ...
    # one process, no DeepSpeed: the reference the distributed runs must match
    python examples/deepspeed/train_ds.py --model BASE_DIR --out OUT_DIR

``BASE_DIR`` is a local causal-LM directory (``save_pretrained``); with ``--make-tiny`` a tiny random Llama is
written there first (tied embeddings, to exercise untying under ZeRO-3). Training data is synthetic
token ids (fixed length, so per-rank mean losses average to the global mean exactly).

What happens:

1. ``TrainingArguments(deepspeed=...)`` is created **before** the model, so under ZeRO-3 ``from_pretrained``
   loads it already partitioned (``deepspeed.zero.Init``).
2. peft attaches LoRA; ``RoLoRACallback`` rotates in ``on_init_end`` (before the optimizer and the DeepSpeed engine
   exist). Weights are edited one layer at a time inside ``GatheredParameters(..., modifier_rank=0)``; every rank
   runs the same seeded rotation, and the callback calls ``check_rank_agreement`` in ``on_train_begin``
   (all-gather of the record's digest), which fails loudly if the ranks disagree.
3. At the end of training the callback exports the merged model to ``OUT_DIR/merged``
   (``ExportConfig.merged_output_dir``). Under ZeRO-3 every rank gathers the adapter, rank 0 merges it into the
   base model reloaded unpartitioned and re-rotated from the record (checksums verified); otherwise rank 0
   merges a copy of the live model. Then every rank checks that all weights agree bit for bit and
   ``trainer.save_model`` writes the (consolidated) adapter with ``rolora_rotation.json`` beside it.

Outputs: ``OUT_DIR/adapter`` (peft adapter + ``rolora_rotation.json``), ``OUT_DIR/merged`` (plain
safetensors model + record), ``OUT_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("train_ds")
SEQ_LEN = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local model directory (save_pretrained layout)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (omit for a plain single-process run)")
    p.add_argument("--make-tiny", action="store_true", help="write a tiny random Llama to --model first")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=4, help="samples per optimizer step over all ranks")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0, help="training seed (data, LoRA init)")
    p.add_argument("--rotation-seed", type=int, default=7)
    p.add_argument("--lora-lr-scale", choices=("none", "norm-rms"), default="none",
                   help="RoLoRAConfig.lora_lr_scale: 'norm-rms' scales the LoRA factors of folded-norm readers in on_init_end")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def set_cpu_defaults() -> None:
    """CPU-only runs: DeepSpeed's CPU accelerator (gloo) and a cached JIT build directory."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cache = Path(os.environ.get("ROLORA_CACHE", Path.home() / ".cache" / "rolora-plugin"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))


def configure_cpu_distributed_state() -> dict:
    """Work around DeepSpeed's ``auto`` batch size on multi-process CPU runs; returns ``accelerator_config``.

    On CPU, accelerate records world size 1 on every rank, so ``train_batch_size = micro * gas * world`` comes out
    wrong and DeepSpeed 0.19.8 refuses to start. Creating accelerate's shared state
    ourselves with the gloo backend while ``ACCELERATE_USE_DEEPSPEED`` is set, then telling the Trainer to use
    that configured state, gives the right world size. The variable is removed again afterwards.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return {}
    from accelerate import PartialState

    if torch.cuda.is_available():  # the pitfall is CPU-only; just start the process group
        PartialState()
        return {}

    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    return {"use_configured_state": True}


def make_tiny_llama(path: str) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norm weights, so norm folding is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length random token sequences (labels = inputs), reproducible from ``seed``."""

    def __init__(self, n: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, SEQ_LEN), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": self.ids[i]}


def training_args(a: argparse.Namespace, world: int, accelerator_config: dict):
    from transformers import TrainingArguments

    if a.global_batch % world:
        raise SystemExit(f"--global-batch {a.global_batch} must be divisible by the number of processes ({world})")
    return TrainingArguments(
        output_dir=str(Path(a.out) / "trainer"), per_device_train_batch_size=a.global_batch // world,
        max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0,
        seed=a.seed, data_seed=a.seed, train_sampling_strategy="sequential", save_strategy="no", report_to=[],
        logging_steps=1, disable_tqdm=True, deepspeed=a.deepspeed, accelerator_config=accelerator_config or None,
        use_cpu=not torch.cuda.is_available() and a.deepspeed is None, dataloader_num_workers=0,
    )  # fmt: skip


def build_trainer(a: argparse.Namespace, args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, default_data_collator

    from rolora_plugin import RoLoRACallback, RotationConfig
    from rolora_plugin.lora.config import ExportConfig, MonitorConfig, RoLoRAConfig

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)  # partitioned here under ZeRO-3
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model, lora)
    rolora = RoLoRAConfig(
        rotation=RotationConfig(seed=a.rotation_seed, r2=True),
        lora_lr_scale=a.lora_lr_scale,  # under ZeRO-3 the factors are edited inside GatheredParameters
        monitor=MonitorConfig(every_n_steps=0),
        export=ExportConfig(merged_output_dir=str(Path(a.out) / "merged")),  # merged + exported in on_train_end
    )
    # rotates in on_init_end; every save_pretrained also writes rolora_rotation.json
    callback = RoLoRACallback(rolora)
    data = TokenDataset(a.global_batch, model.config.vocab_size, a.seed)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator, callbacks=[callback])


def finish(trainer, a: argparse.Namespace) -> dict:
    """Check weights agree across ranks, then save the adapter (+ ``rolora_rotation.json``)."""
    from rolora_plugin import get_rotation_record
    from rolora_plugin.integrations.deepspeed import check_rank_agreement, is_zero3_partitioned

    model = trainer.model
    record = get_rotation_record(model.get_base_model())
    check_rank_agreement(record, model=model)  # bit-identical weights on every rank, or a loud error
    adapter_dir = Path(a.out) / "adapter"
    trainer.save_model(str(adapter_dir))  # consolidates ZeRO-3 partitions (stage3_gather_16bit_weights_on_model_save)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    partitioned = is_zero3_partitioned(model)  # really ZeRO-3 partitioned?
    return {
        "losses": losses, "world_size": trainer.args.world_size, "deepspeed": a.deepspeed,
        "zero3_partitioned": partitioned, "record": record.to_dict(), "lora_lr_scale": a.lora_lr_scale,
    }  # fmt: skip


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s [rank %(process)d] %(message)s")
    a = parse_args(argv)
    set_cpu_defaults()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.make_tiny and int(os.environ.get("RANK", "0")) == 0 and not (Path(a.model) / "config.json").exists():
        make_tiny_llama(a.model)
    accelerator_config = configure_cpu_distributed_state()
    if world > 1:
        torch.distributed.barrier()  # the tiny model is written before anyone loads it
    args = training_args(a, world, accelerator_config)  # before the model: enables zero.Init under ZeRO-3
    trainer = build_trainer(a, args)  # RoLoRACallback rotates here, on every rank
    trainer.train()  # the callback checks the ranks agree first and exports the merge last
    summary = finish(trainer, a)
    del trainer
    if int(os.environ.get("RANK", "0")) == 0:
        from rolora_plugin.io.publish import atomic_write_text

        atomic_write_text(Path(a.out) / "summary.json", json.dumps(summary, indent=2))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
