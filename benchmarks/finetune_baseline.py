"""The untrained SmolLM2 on the evaluation data of examples/hf_trainer_rolora.py: the reference row for its table.

    python benchmarks/finetune_baseline.py [--task-limit 30]

Same data as the example's defaults used in RESULTS.md: 64 held-out SciQ pairs cut to 96 tokens, 8 × 256 BoolQ
tokens, the 7 tasks at ``--task-limit`` documents each. Rows: FP, W4A4 RTN unrotated, W4A4 RTN after R1+R4.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from rolora_plugin import RotationConfig, rotate_model_
from rolora_plugin.app.assets import instruction_pairs, load_smollm2, pad_collate, text_chunks, tokenize_pairs
from rolora_plugin.app.evaluate import evaluate_tasks
from rolora_plugin.metrics import mean_loss, perplexity
from rolora_plugin.quant import QuantConfig, quantize_model_


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task-limit", type=int, default=30, help="documents per task (0 = skip the tasks)")
    args = p.parse_args(argv)
    model, tok = load_smollm2(torch.float32)
    held = tokenize_pairs(tok, instruction_pairs("sciq", seed=0)[:64], 96)
    batches = [pad_collate(held[i : i + 4], tok.pad_token_id) for i in range(0, len(held), 4)]
    chunks = text_chunks(tok, 8, 256)

    def evaluate(m, name: str) -> None:
        row = {"ppl": perplexity(m, chunks, progress=False), "heldout_loss": mean_loss(m, batches)}
        if args.task_limit:
            row["avg"] = evaluate_tasks(m, tok, limit=args.task_limit)["average"]
        print(name, json.dumps(row), flush=True)

    evaluate(model, "fp")
    unrotated = copy.deepcopy(model)
    quantize_model_(unrotated, QuantConfig(w_bits=4, a_bits=4), progress=False)
    evaluate(unrotated, "w4a4 unrotated")
    rotate_model_(model, RotationConfig(), progress=False)
    quantize_model_(model, QuantConfig(w_bits=4, a_bits=4), progress=False)
    evaluate(model, "w4a4 rotated (R1+R4)")


if __name__ == "__main__":
    main()
