"""RoLoRA with PyTorch FSDP2 (``fully_shard``) through the HF Trainer / accelerate: peft LoRA + RoLoRACallback.

Launch::

    # two processes, FSDP2 (CPU: gloo; on GPUs the same command uses nccl)
    torchrun --nproc_per_node 2 examples/fsdp/train_fsdp2.py --fsdp --model BASE_DIR --out OUT_DIR --make-tiny
    # one process, no FSDP: the reference the sharded run must match
    python examples/fsdp/train_fsdp2.py --model BASE_DIR --out OUT_DIR

The Trainer is given ``fsdp="full_shard auto_wrap"`` and ``fsdp_config={"fsdp_version": 2,
"transformer_layer_cls_to_wrap": [<decoder layer>], "reshard_after_forward": True, "state_dict_type":
"FULL_STATE_DICT"}``. What happens:

1. Every rank loads the full model and peft attaches LoRA. ``RoLoRACallback`` rotates in ``on_init_end`` —
   before accelerate shards anything (``fully_shard`` runs in ``accelerator.prepare`` inside ``train()``), so the
   rotation edits ordinary full tensors, one seeded rotation on every rank, and the online Hadamard before
   ``down_proj`` (R4) lives inside each sharded decoder layer's MLP (its matrices are not parameters: FSDP never
   shards them). In ``on_train_begin`` (after sharding) the ranks compare their rotation records.
2. Training: each decoder layer is all-gathered for its forward / backward; LoRA factors are sharded like the
   rest (FSDP2 handles frozen and trainable parameters in one group).
3. At the end of training the callback exports the merged model to ``OUT_DIR/merged``: every rank all-gathers
   the (small) LoRA factors (``DTensor.full_tensor``), rank 0 merges them into the base model reloaded from
   ``BASE_DIR`` and re-rotated from the record (checksums verified). Then every rank checks that the full
   weights agree bit for bit, and ``trainer.save_model`` writes the consolidated adapter with
   ``rolora_rotation.json`` beside it.

``--resume-from CHECKPOINT`` (or ``last``) continues from a checkpoint (``--save-steps N`` writes them, with
``rolora_rotation.json``); the callback refuses one whose rotation differs from the model's.

Outputs: ``OUT_DIR/adapter``, ``OUT_DIR/merged``, ``OUT_DIR/summary.json`` (losses, world size, whether the
parameters really were FSDP2 DTensors, the rotation record).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("train_fsdp2")
SEQ_LEN = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local model directory (save_pretrained layout)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (launch with torchrun, >= 2 processes)")
    p.add_argument("--make-tiny", action="store_true", help="write a tiny random Llama to --model first")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=4, help="samples per optimizer step over all ranks")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0, help="training seed (data, LoRA init)")
    p.add_argument("--rotation-seed", type=int, default=7)
    p.add_argument("--qat", action="store_true", help="RoLoRA's QAT (int W4A4 fake quantization) from step 1, on LoRA")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--resume-from", default=None, help="checkpoint folder to resume from ('last': the newest in OUT_DIR/trainer)")
    return p.parse_args(argv)


def make_tiny_llama(path: str) -> None:
    """A tiny random Llama (2 layers, tied embeddings, non-trivial RMSNorm gains) saved to ``path``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length random token sequences (labels = inputs): per-rank mean losses average to the global mean."""

    def __init__(self, n: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, SEQ_LEN), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": self.ids[i]}


def fsdp2_config(layer_cls: str) -> dict:
    """The Trainer's ``fsdp_config`` for FSDP2 (accelerate's ``FullyShardedDataParallelPlugin`` fields).

    ``sync_module_states`` / ``cpu_ram_efficient_loading`` stay off: every rank loads the full checkpoint (which
    RoLoRA needs anyway, to rotate before sharding), and accelerate's broadcast of module states requires an
    accelerator device.
    """
    return {"fsdp_version": 2, "transformer_layer_cls_to_wrap": [layer_cls], "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT", "sync_module_states": False, "cpu_ram_efficient_loading": False,
            "activation_checkpointing": False}  # fmt: skip


def training_args(a: argparse.Namespace, world: int, layer_cls: str):
    from transformers import TrainingArguments

    if a.global_batch % world:
        raise SystemExit(f"--global-batch {a.global_batch} must be divisible by the number of processes ({world})")
    if a.fsdp and world < 2:
        raise SystemExit("--fsdp shards across processes: launch with torchrun --nproc_per_node 2 (or more)")
    fsdp = {"fsdp": "full_shard auto_wrap", "fsdp_config": fsdp2_config(layer_cls)} if a.fsdp else {}
    return TrainingArguments(
        output_dir=str(Path(a.out) / "trainer"), per_device_train_batch_size=a.global_batch // world,
        max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0,
        seed=a.seed, data_seed=a.seed, train_sampling_strategy="sequential", report_to=[], logging_steps=1,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, **fsdp,
    )  # fmt: skip


def enable_fsdp_on_cpu(trainer) -> bool:
    """CPU-only test runs: switch on accelerate's FSDP2 path, which accelerate 1.15 leaves off without an accelerator.

    PyTorch's ``fully_shard`` runs on CPU with gloo (torch 2.13), but accelerate's ``AcceleratorState`` turns a
    ``fsdp_plugin`` into ``DistributedType.FSDP`` only for ``MULTI_GPU`` / ``MULTI_NPU`` / ``MULTI_XPU`` / ...
    launches; on ``MULTI_CPU`` it silently drops it and the Trainer trains unsharded (DDP-style). This sets the
    shared state the way accelerate does on GPUs (``distributed_type = FSDP`` in both ``AcceleratorState`` and
    ``PartialState``, which every later ``AcceleratorState()`` copies from; ``fsdp_plugin`` built from the
    Trainer's own ``fsdp_plugin_args``); everything after it — ``fully_shard`` of every decoder layer and the root
    in ``accelerator.prepare``, FSDP2 optimizer, state-dict gathering on save — is accelerate's and torch's own
    code. A no-op on GPUs or without ``fsdp_config``. Returns whether FSDP is enabled.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if trainer.is_fsdp_enabled or trainer.args.fsdp_plugin_args is None or torch.cuda.is_available():
        return trainer.is_fsdp_enabled
    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ does on GPUs
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True
    logger.info("FSDP2 enabled on CPU (gloo): accelerate's MULTI_CPU state switched to FSDP")
    return True


def build_trainer(a: argparse.Namespace, args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, default_data_collator

    from rolora_plugin import RoLoRACallback, RotationConfig
    from rolora_plugin.lora.config import ExportConfig, MonitorConfig, QATConfig, RoLoRAConfig

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)  # full weights on every rank
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    rolora = RoLoRAConfig(
        rotation=RotationConfig(seed=a.rotation_seed, r2=True),
        monitor=MonitorConfig(every_n_steps=0),
        qat=QATConfig(enabled=a.qat, start_step=1),  # the fake-quant forwards run inside the sharded layers
        export=ExportConfig(merged_output_dir=str(Path(a.out) / "merged"), overwrite=True),
    )
    data = TokenDataset(a.global_batch * a.steps, model.config.vocab_size, a.seed)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                   callbacks=[RoLoRACallback(rolora)])  # fmt: skip


def finish(trainer, a: argparse.Namespace) -> dict:
    """Check the full weights agree across ranks, then save the adapter (+ ``rolora_rotation.json``)."""
    from rolora_plugin import get_rotation_record
    from rolora_plugin.distributed import is_fsdp2_sharded
    from rolora_plugin.integrations.deepspeed import check_rank_agreement

    model = trainer.model
    record = get_rotation_record(model.get_base_model())
    check_rank_agreement(record, model=model)  # all-gathers every DTensor: bit-identical full weights or a loud error
    trainer.save_model(str(Path(a.out) / "adapter"))  # FULL_STATE_DICT: consolidated on rank 0
    return {
        "sharded_layers_with_online_r4": _sharded_layers_with_online_r4(model),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "world_size": trainer.args.world_size,
        "fsdp2_sharded": is_fsdp2_sharded(model), "record": record.to_dict(), "global_step": trainer.state.global_step,
    }  # fmt: skip


def _sharded_layers_with_online_r4(model) -> list[int]:
    """Indices of the decoder layers that are FSDP2 units (``fully_shard``) and carry the online R4 in their MLP."""
    from torch.distributed.fsdp import FSDPModule

    from rolora_plugin.model.online import OnlineHadamard

    layers = model.get_base_model().model.layers
    return [i for i, layer in enumerate(layers)
            if isinstance(layer, FSDPModule) and isinstance(getattr(layer.mlp, "rolora_r4", None), OnlineHadamard)]  # fmt: skip


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s [rank %(process)d] %(message)s")
    a = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if a.make_tiny and rank == 0 and not (Path(a.model) / "config.json").exists():
        make_tiny_llama(a.model)
    if world > 1:
        from accelerate import PartialState

        PartialState(backend=None if torch.cuda.is_available() else "gloo")
        torch.distributed.barrier()  # the tiny model is written before anyone loads it
    args = training_args(a, world, "LlamaDecoderLayer")
    trainer = build_trainer(a, args)  # RoLoRACallback rotates here, on every rank, before sharding
    if a.fsdp:
        enable_fsdp_on_cpu(trainer)
    trainer.train(resume_from_checkpoint=True if a.resume_from == "last" else a.resume_from)
    summary = finish(trainer, a)
    if rank == 0:
        from rolora_plugin.io.publish import atomic_write_text

        atomic_write_text(Path(a.out) / "summary.json", json.dumps(summary, indent=2))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
