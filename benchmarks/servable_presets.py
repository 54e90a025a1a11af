"""Servable W4A4 presets on SmolLM2: perplexity beside FP, and what compressed-tensors' own forward computes.

    python benchmarks/servable_presets.py                       # w4a4-int, nvfp4, mxfp4 (+ the research w4a4), Hadamard
    python benchmarks/servable_presets.py --presets nvfp4,mxfp4 --rotations none,block
    python benchmarks/servable_presets.py --presets nvfp4 --cached-only

Per preset and rotation (SmolLM2-135M-Instruct fp32; ``hadamard``: R1+R2+R4 ``RotationConfig.preset("w4a4-hadamard")``,
``block``: R1+R2+R4 block-diagonal at the format's group (``RotationConfig(r2=True, block_size=16|32)``), ``none``: no
rotation), calibration
``--calib`` × 256 BoolQ tokens from the end of the stream, evaluation 4 × 256 tokens of BoolQ passages and of SciQ
support paragraphs from the start): the preset's PTQ (GPTQ + weight clip search), the compressed-tensors export,
``rolora_plugin.io.check.check_export`` (compressed-tensors' decompression + quantized forward + transforms vs
``load_rotated``) and its engine contract. Every run is cached as JSON under
``benchmarks/results/servable_presets/`` keyed by its settings, so an interrupted invocation loses nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from _common import cached_json, results_dir  # noqa: E402

GOALS = {"w4a4-int": 2.0, "nvfp4": 1.25, "mxfp4": 1.4, "w4a4": 1.6}  # issue 30's goals, ratio to FP perplexity


def _rotation(name: str, preset: str):
    from rolora_plugin import QuantConfig, RotationConfig

    if name == "none":
        return None
    if name == "block":
        return RotationConfig(r2=True, block_size=QuantConfig.preset(preset).a_group_size or 64)
    return RotationConfig.preset("w4a4-hadamard")


def _run(preset: str, calib_chunks: int, rotation: str = "hadamard") -> dict:
    import torch

    from rolora_plugin import QuantConfig, quantize_model_, rotate_model_
    from rolora_plugin.app.assets import calibration_chunks, load_smollm2, text_chunks
    from rolora_plugin.io.check import check_export
    from rolora_plugin.io.export import merge_and_export
    from rolora_plugin.metrics import perplexity

    torch.manual_seed(0)
    model, tok = load_smollm2()
    evals = {src: text_chunks(tok, 4, 256, source=src) for src in ("boolq", "sciq")}
    fp = {src: perplexity(model, c, progress=False) for src, c in evals.items()}
    t0 = time.perf_counter()
    rot = _rotation(rotation, preset)
    if rot is not None:
        rotate_model_(model, rot, progress=False)
    cfg = QuantConfig.preset(preset)
    quantize_model_(model, cfg, list(calibration_chunks(tok, calib_chunks, 256).split(1)), progress=False)
    seconds = time.perf_counter() - t0
    q = {src: perplexity(model, c, progress=False) for src, c in evals.items()}
    check = None  # rolora exports rotated models (the record is what load_rotated verifies); unrotated: no export
    if rot is not None:
        with tempfile.TemporaryDirectory() as d:
            out = merge_and_export(model, Path(d) / "export", format="compressed-tensors", tokenizer=tok, not_servable_ok=preset == "w4a4")
            check = check_export(out, evals["boolq"], bf16=True)
    return {"fp_ppl": fp, "ppl": q, "ratio": {s: q[s] / fp[s] for s in fp}, "quantize_seconds": seconds, "check": check,
            "engine": cfg.engine_contract()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="w4a4-int,nvfp4,mxfp4,w4a4")
    ap.add_argument("--calib", type=int, default=8, help="calibration chunks of 256 tokens (default 8)")
    ap.add_argument("--rotations", default="hadamard", help="comma list of hadamard, block, none (default hadamard)")
    ap.add_argument("--cached-only", action="store_true")
    args = ap.parse_args()
    rows = ["| preset | rotation | servable (vLLM scheme) | BoolQ ppl / FP | SciQ ppl / FP | goal | compressed-tensors forward vs load_rotated (rel. logits, ppl) | PTQ s |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for preset, rotation in ((p, r) for p in args.presets.split(",") for r in args.rotations.split(",")):
        key = {"bench": "servable_presets", "v": 1, "preset": preset, "calib": args.calib, "rotation": "w4a4-hadamard" if rotation == "hadamard" else rotation}
        r = cached_json(results_dir("servable_presets"), key, lambda p=preset, rot=rotation: _run(p, args.calib, rot), args.cached_only)
        if r is None:
            rows.append(f"| {preset} | {rotation} | (not run) | | | | | |")
            continue
        e, c = r["engine"], r["check"]
        served = f"yes ({e['scheme']})" if e["servable"] else "no (" + "; ".join(e["reasons"])[:60] + "…)"
        bf16 = f"; bf16-weight emulation {c['bf16_weights']['rel_err']:.1e}" if c and "bf16_weights" in c else ""
        consumer = f"{c['consumer']['rel_err']:.1e}, {c['ppl']['consumer']:.2f} vs {c['ppl']['rolora']:.2f}{bf16}" if c else "- (unrotated: not exported)"
        if c and "consumer_bf16" in c["ppl"]:
            consumer += f"; bf16 forward {c['ppl']['consumer_bf16']:.2f}"
        rows.append(
            f"| {preset} | {rotation} | {served} | {r['ppl']['boolq']:.2f} / {r['fp_ppl']['boolq']:.2f} = **{r['ratio']['boolq']:.2f}×** | "
            f"{r['ppl']['sciq']:.2f} / {r['fp_ppl']['sciq']:.2f} = **{r['ratio']['sciq']:.2f}×** | ≤ {GOALS.get(preset, '-')}× | "
            f"{consumer} | {r['quantize_seconds']:.0f} |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
