"""Size and exactness of the compressed-tensors W4A4 export of SmolLM2-135M vs its full-precision export.

    python benchmarks/compressed_export.py [--recipe rtn|w4a4] [--calib-chunks 8] [--no-append]

1. Loads SmolLM2-135M-Instruct (fp32, ``rolora_plugin.app.assets``), rotates it (``RotationConfig()``: R1 + R4) and
   writes the full-precision export (``merge_and_export``, ``format="fp"``).
2. Quantizes it (``--recipe rtn``: ``QuantConfig()``, W4A4 RTN per channel; ``w4a4``: ``QuantConfig.preset("w4a4")``,
   GPTQ + clip searches on ``--calib-chunks`` × 256 calibration tokens) and writes ``format="compressed-tensors"``.
3. Reports folder sizes, the packed linears' bytes (codes + scales + shapes) vs their fp32 bytes, export / load
   times, ``load_rotated`` logits vs the in-memory fake-quant model (fp32), and whether compressed-tensors' own
   decompression (transformers ``from_pretrained`` + first forward) gives our weights bit for bit.
4. Prints a table and appends a dated section to ``benchmarks/RESULTS.md``.

Goal (issue 14): packed linear weights ≤ 0.14× their fp32 bytes; logits after ``load_rotated`` rel ≤ 1e-5.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _packed_bytes(out: Path, names: list[str]) -> int:
    from safetensors import safe_open

    names = set(names)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys() if k.rsplit(".", 1)[0] in names)  # noqa: SIM118


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def _ct_bit_exact(out: Path, model, names: list[str], ids) -> int:
    """How many quantized linears compressed-tensors decompresses to exactly our weight (transformers' default load)."""
    from transformers import AutoModelForCausalLM

    ct_model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ct_model(ids[:, :8])
    return sum(torch.equal(ct_model.get_submodule(n).weight, model.get_submodule(n).weight) for n in names)


def _quant_config(args):
    from rolora_plugin import QuantConfig

    return QuantConfig() if args.recipe == "rtn" else QuantConfig.preset(args.recipe)


def run(args) -> str:
    from rolora_plugin import RotationConfig, rotate_model_
    from rolora_plugin.app.assets import load_smollm2, text_chunks

    model, tok = load_smollm2()
    rotate_model_(model, RotationConfig(), progress=False)
    ids = text_chunks(tok, 2, 256)
    work = Path(tempfile.mkdtemp(prefix="rolora-ct-bench-"))
    try:
        return _measure(model, tok, ids, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(model, tok, ids, work: Path, args) -> str:
    from rolora_plugin import quantize_model_
    from rolora_plugin.app.assets import calibration_chunks
    from rolora_plugin.io.export import load_rotated, merge_and_export

    t0 = time.perf_counter()
    fp = merge_and_export(model, work / "fp", tokenizer=tok)
    t_fp = time.perf_counter() - t0
    calib = list(calibration_chunks(tok, args.calib_chunks, 256).split(2)) if args.recipe != "rtn" else None
    t0 = time.perf_counter()
    record = quantize_model_(model, _quant_config(args), calib, progress=False)
    t_quant = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(ids).logits
    t0 = time.perf_counter()
    ct = merge_and_export(model, work / "w4a4", format="compressed-tensors", tokenizer=tok, not_servable_ok=args.recipe in ("rtn", "w4a4"))
    t_ct = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_rotated(ct)
    t_load = time.perf_counter() - t0
    with torch.no_grad():
        rel = _rel(loaded(ids).logits, ref)
    names = record.quantized
    fp32_linear = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
    packed = _packed_bytes(ct, names)
    exact = _ct_bit_exact(ct, model, names, ids)
    rows = [
        ("full-precision export (fp32, rotated)", _mib(_size(fp)), f"{t_fp:.1f}", ""),
        (f"compressed-tensors export ({args.recipe})", _mib(_size(ct)), f"{t_ct:.1f}", f"{_size(ct) / _size(fp):.3f}× the FP folder"),
        (f"  its {len(names)} packed linears (codes + scales + shapes)", _mib(packed), "", f"**{packed / fp32_linear:.4f}×** their fp32 bytes ({_mib(fp32_linear)} MiB)"),
        ("  transforms.safetensors (stored R4, 1536²)", _mib((ct / "transforms.safetensors").stat().st_size) if (ct / "transforms.safetensors").exists() else "0", "", ""),
    ]  # fmt: skip
    table = "| what | MiB | time (s) | note |\n|---|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    body = (
        f"SmolLM2-135M-Instruct, fp32, R1+R4 (`RotationConfig()`), quantization `{args.recipe}` "
        f"(quantize_model_ {t_quant:.1f} s). Eval ids: 2 × 256 tokens of `text_chunks`.\n\n{table}\n\n"
        f"- `load_rotated` of the compressed export: {t_load:.1f} s; logits vs the in-memory fake-quant model: "
        f"max rel {rel:.2e} (goal ≤ 1e-5).\n"
        f"- compressed-tensors' own decompression (transformers `from_pretrained` + first forward, no missing/unexpected "
        f"keys): {exact}/{len(names)} linears bit-identical to our fake-quantized weights.\n"
        "- The rest of the compressed folder is the fp32 embedding and the untied fp32 lm_head (2 × 108 MiB), kept in "
        "high precision as in the FP export."
    )
    print(body)
    return body


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", choices=("rtn", "w4a4", "w4a4-int", "nvfp4", "mxfp4"), default="rtn")
    ap.add_argument("--calib-chunks", type=int, default=8)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    body = run(args)
    if not args.no_append:
        append_results("Compressed-tensors W4A4 export of SmolLM2 (benchmarks/compressed_export.py)", body)


if __name__ == "__main__":
    main()
