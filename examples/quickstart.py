"""Quickstart: rotate the embedded SmolLM2-135M, check the function is unchanged, then compare W4A4 RTN.

    python examples/quickstart.py [--chunks 4]
"""

import argparse
import copy

import torch

from rolora_plugin import QuantConfig, RotationConfig, quantize_model_, rotate_model_
from rolora_plugin.app.assets import load_smollm2, text_chunks
from rolora_plugin.metrics import perplexity


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--chunks", type=int, default=4, help="number of 512-token BoolQ chunks for perplexity")
    args = p.parse_args()
    model, tok = load_smollm2(torch.float32)
    chunks = text_chunks(tok, n_chunks=args.chunks, seq_len=512)

    rotated = copy.deepcopy(model)
    record = rotate_model_(rotated, RotationConfig(seed=0, r2=True))  # R1 + R2 + R4
    print("rotations:", {k: v["description"] for k, v in record.rotations.items()})
    print(f"FP32 perplexity: original {perplexity(model, chunks):.3f}  rotated {perplexity(rotated, chunks):.3f}")

    w4a4 = QuantConfig(w_bits=4, a_bits=4)  # RTN, per-channel weights, per-token activations, lm_head kept
    for name, m in (("original", model), ("rotated", rotated)):
        quantize_model_(m, w4a4)
        print(f"W4A4 RTN perplexity, {name}: {perplexity(m, chunks):.1f}")


if __name__ == "__main__":
    main()
