"""Reproduction table: SmolLM2-135M perplexity (BoolQ passages) under weight-activation quantization.

One command reproduces the table and appends it (machine, date, command) to benchmarks/RESULTS.md::

    python benchmarks/quant_table.py                      # default grid, 8 x 512 eval tokens, 16 x 512 calibration
    python benchmarks/quant_table.py --quick              # W4A4 / W6A6 only, fewer chunks (smoke run)
    python benchmarks/quant_table.py --tasks --limit 20   # also the 7-task lm-eval average per cell

Rows: FP32, then W8A8 / W6A6 / W4A8 / W4A4 with RTN, RTN + weight clip search, GPTQ + clip search; columns:
unrotated, R1+R4, R1+R2+R4 (``rotate_model_``). Weights per output channel, symmetric; activations per token,
symmetric; every linear but lm_head quantized; embeddings and lm_head in FP32. GPTQ Hessians come from
full-precision activations, so one set of quantized weights serves every activation width of a row group.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import append_results  # noqa: E402

from rolora_plugin import RotationConfig, rotate_model_  # noqa: E402
from rolora_plugin.app.assets import calibration_chunks, load_smollm2, text_chunks  # noqa: E402
from rolora_plugin.metrics import perplexity  # noqa: E402
from rolora_plugin.quant import (  # noqa: E402
    QUANT_RECORD_KEY,
    QuantConfig,
    get_quantization_record,
    install_activation_quantizers,
    quantize_model_,
)

ROTATIONS = {"none": None, "R1+R4": RotationConfig(seed=0), "R1+R2+R4": RotationConfig(seed=0, r2=True)}
# (weight bits, [activation bits]) groups: the weights are quantized once per group
SETTINGS = [(8, [8]), (6, [6]), (4, [8, 4])]
# method -> (QuantConfig fields, settings it runs on by default; None = all). --all-cells runs every combination.
METHODS = {
    "RTN": (dict(method="rtn"), None),
    "RTN+clip": (dict(method="rtn", w_clip_search=True), {"W4A4"}),
    "GPTQ+clip": (dict(method="gptq", w_clip_search=True), {"W6A6", "W4A8", "W4A4"}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-chunks", type=int, default=8, help="evaluation chunks of BoolQ passages (default 8)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-chunks", type=int, default=16, help="GPTQ calibration chunks (disjoint text)")
    p.add_argument("--a-clip", type=float, default=1.0, help="activation clip ratio for A<8 rows (QuaRot uses 0.9)")
    p.add_argument("--kv-bits", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--rotations", nargs="+", default=list(ROTATIONS), choices=list(ROTATIONS))
    p.add_argument("--settings", nargs="+", default=None, help="subset like W4A4 W6A6 (default: all)")
    p.add_argument("--quick", action="store_true", help="W6A6 and W4A4 only, 4 eval chunks, 8 calibration chunks")
    p.add_argument("--tasks", action="store_true", help="also run the 7-task lm-eval average (slow)")
    p.add_argument("--limit", type=int, default=20, help="examples per task with --tasks")
    p.add_argument("--all-cells", action="store_true", help="every method on every setting (default: clip/GPTQ where it matters)")
    p.add_argument("--clip-grid", type=int, default=50, help="weight clip search: candidates 1 - i/grid ...")
    p.add_argument("--clip-max-shrink", type=float, default=0.5, help="... for i < max_shrink * grid (QuaRot: 100, 0.8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core box)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--folding", action="store_true", help="run the norm-folding study (weight-only W4 g64) instead")
    args = p.parse_args(argv)
    if args.quick:
        args.n_chunks, args.calib_chunks, args.settings = 4, 8, args.settings or ["W6A6", "W4A4"]
    return args


def wanted_settings(args) -> list[tuple[int, list[int]]]:
    if not args.settings:
        return SETTINGS
    keep = {(int(s[1 : s.index("A")]), int(s[s.index("A") + 1 :])) for s in args.settings}
    return [(w, [a for a in acts if (w, a) in keep]) for w, acts in SETTINGS if any((w, a) in keep for a in acts)]


def evaluate(model, tok, chunks, args) -> dict:
    out = {"ppl": perplexity(model, chunks, progress=False)}
    if args.tasks:
        from rolora_plugin.app.evaluate import evaluate_tasks

        out["avg"] = evaluate_tasks(model, tok, limit=args.limit)["average"]
    return out


def with_activation_bits(model, a_bits: int, a_clip: float):
    """Copy of a weight-quantized model with per-token activation quantizers of ``a_bits`` installed."""
    m = copy.deepcopy(model)
    record = get_quantization_record(m)
    record.config = dataclasses.replace(record.config, a_bits=a_bits, a_clip_ratio=a_clip if a_bits < 8 else 1.0)
    install_activation_quantizers(m, record)
    setattr(m.config, QUANT_RECORD_KEY, record.to_dict())
    return m


def run(args) -> tuple[dict, dict]:
    torch.set_num_threads(args.threads)
    base, tok = load_smollm2()
    chunks = text_chunks(tok, args.n_chunks, args.seq_len)
    calib = list(calibration_chunks(tok, args.calib_chunks, args.seq_len).split(4))
    fp = evaluate(base, tok, chunks, args)
    print(f"FP32: {fp}", flush=True)
    cells: dict = {}
    for rot_name in args.rotations:
        rotated = copy.deepcopy(base)
        if ROTATIONS[rot_name] is not None:
            rotate_model_(rotated, ROTATIONS[rot_name], progress=False)
        for method in args.methods:
            extra, only = METHODS[method]
            extra = dict(extra, w_clip_grid=args.clip_grid, w_clip_max_shrink=args.clip_max_shrink)
            for w_bits, acts in wanted_settings(args):
                acts = [a for a in acts if args.all_cells or only is None or f"W{w_bits}A{a}" in only]
                if not acts:
                    continue
                t0 = time.time()
                wq = copy.deepcopy(rotated)
                quantize_model_(wq, QuantConfig(w_bits=w_bits, a_bits=16, kv_bits=args.kv_bits, **extra), calibration=calib, progress=False)
                for a_bits in acts:
                    res = evaluate(with_activation_bits(wq, a_bits, args.a_clip), tok, chunks, args)
                    cells[(f"W{w_bits}A{a_bits}", method, rot_name)] = res
                    print(f"W{w_bits}A{a_bits} {method:9s} {rot_name:9s} {res} ({time.time() - t0:.0f}s)", flush=True)
                del wq
        del rotated
    return fp, cells


def table(fp: dict, cells: dict, args) -> str:
    rots = args.rotations
    lines = ["| setting | method | " + " | ".join(rots) + " |", "|---|---|" + "---|" * len(rots)]
    lines.append("| FP32 | - | " + " | ".join(_fmt(fp, fp) for _ in rots) + " |")
    for w_bits, acts in wanted_settings(args):
        for a_bits in acts:
            for method in args.methods:
                row = [_fmt(cells.get((f"W{w_bits}A{a_bits}", method, r)), fp) for r in rots]
                if set(row) == {"-"}:
                    continue
                lines.append(f"| W{w_bits}A{a_bits} | {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(res, fp) -> str:
    if res is None:
        return "-"
    s = f"{res['ppl']:.2f} ({res['ppl'] / fp['ppl']:.2f}×)"
    return s + (f", avg {res['avg']:.3f}" if "avg" in res else "")


def goals(fp: dict, cells: dict) -> str:
    """Status of the issue's goals (only those whose cells were run)."""
    def ratio(key):
        return cells[key]["ppl"] / fp["ppl"] if key in cells else None

    checks = []
    w6 = [r for r in (ratio(("W6A6", m, rot)) for m in METHODS for rot in ("R1+R4", "R1+R2+R4")) if r is not None]
    if w6:
        checks.append(("W6A6 rotated (best cell) ≤ 1.08× FP", min(w6), min(w6) <= 1.08))
    r = ratio(("W4A4", "GPTQ+clip", "R1+R2+R4"))
    if r is not None:
        checks.append(("W4A4 R1+R2+R4 GPTQ+clip ≤ 1.6× FP", r, r <= 1.6))
    r = ratio(("W4A4", "RTN", "none"))
    if r is not None:
        checks.append(("W4A4 unrotated RTN > 50× FP", r, r > 50))
    return "\n".join(f"- {'met' if ok else 'NOT met'}: {name} — measured {val:.2f}×" for name, val, ok in checks)


# ---------------------------------------------------------------------------------------------- folding study


def fold_norms_(model) -> None:
    """Fold each decoder layer's RMSNorm weights into the linears reading them (``W ← W diag(g)``, ``g ← 1``)."""
    from rolora_plugin.model.architectures import get_architecture

    spec = get_architecture(model)
    with torch.no_grad():
        for layer in model.get_submodule(spec.layers):
            for norm_path, readers in ((spec.input_norm, spec.attention_inputs()), (spec.post_attention_norm, spec.mlp_inputs())):
                norm = layer.get_submodule(norm_path)
                for path in readers:
                    lin = layer.get_submodule(path)
                    lin.weight.copy_((lin.weight.double() * norm.weight.double()).to(lin.weight.dtype))
                norm.weight.fill_(1.0)


def degrid_(model, seed: int = 0) -> None:
    """Add U(-d/2, d/2) noise per Q4_1 block of 32 (d = block range / 15) to the decoder linears: weights that look
    like the continuous originals instead of lying on the GGUF 16-level grid."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, lin in _decoder_linears(model):
            w = lin.weight.view(lin.out_features, -1, 32)
            d = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
            w.add_((torch.rand(w.shape, generator=g) - 0.5) * d)


def _decoder_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def grid_fraction(model) -> float:
    """Fraction of 32-wide row blocks of the decoder linears holding at most 16 distinct values."""
    hits = total = 0
    for _, lin in _decoder_linears(model):
        w = lin.weight.detach().view(-1, 32)
        distinct = (w.sort(-1).values.diff(dim=-1) != 0).sum(-1) + 1
        hits, total = hits + int((distinct <= 16).sum()), total + w.shape[0]
    return hits / total


def norm_spread(model) -> str:
    """max/median of the RMSNorm weights (median over layers), for input and post-attention norms."""
    stats = {}
    for which in ("input_layernorm", "post_attention_layernorm"):
        w = [layer.get_submodule(which).weight.detach().abs() for layer in model.model.layers]
        r = [float(x.max() / x.median()) for x in w]
        stats[which] = f"{sorted(r)[len(r) // 2]:.1f} (max {max(r):.1f})"
    return ", ".join(f"{k}: {v}" for k, v in stats.items())


def weight_error(model, cfg: QuantConfig) -> float:
    """Mean relative RTN error ‖W − Q(W)‖/‖W‖ over the linears that read a norm (q/k/v/gate/up)."""
    from rolora_plugin.quant import quantize_weight

    errs = [float((quantize_weight(m.weight.detach(), cfg.w_bits, cfg.w_group_size, cfg.w_sym) - m.weight.detach()).norm() / m.weight.detach().norm())
            for n, m in _decoder_linears(model) if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    return sum(errs) / len(errs)


def folding_study(args) -> str:
    torch.set_num_threads(args.threads)
    base, tok = load_smollm2()
    chunks = text_chunks(tok, args.n_chunks, args.seq_len)
    calib = list(calibration_chunks(tok, args.calib_chunks, args.seq_len).split(4))
    w4 = dict(w_bits=4, a_bits=16, w_group_size=64, w_clip_grid=args.clip_grid, w_clip_max_shrink=args.clip_max_shrink)
    all3 = (dict(method="rtn"), dict(method="rtn", w_clip_search=True), dict(method="gptq", w_clip_search=True))
    variants = {  # name -> (edit, methods); the first three compute the same function as the shipped model
        "unfolded (as shipped)": (lambda m: None, all3[:2]),
        "norms folded": (fold_norms_, all3),
        "norms folded + R1+R4": (lambda m: rotate_model_(m, RotationConfig(), progress=False), all3),
        "de-gridded, unfolded": (degrid_, all3[:1]),
        "de-gridded, norms folded": (lambda m: (degrid_(m), fold_norms_(m)), all3[:1]),
    }
    rows = [f"- Q4_1 grid: {grid_fraction(base):.3f} of the 32-wide weight blocks hold ≤ 16 distinct values (a random "
            f"float matrix: 0). RMSNorm weight max/median per layer (median over layers): {norm_spread(base)}.", "",
            "| variant | FP ppl | W4 g64 RTN | W4 g64 RTN+clip | W4 g64 GPTQ+clip | rel. weight error q/k/v/gate/up (RTN) |",
            "|---|---|---|---|---|---|"]
    fp_cache: dict = {}
    for name, (make, methods) in variants.items():
        model = copy.deepcopy(base)
        make(model)
        key = "de-gridded" if name.startswith("de-gridded") else "shipped"
        if key not in fp_cache:
            fp_cache[key] = perplexity(model, chunks, progress=False)
        fp = fp_cache[key]
        cells = []
        for extra in methods:
            q = copy.deepcopy(model)
            quantize_model_(q, QuantConfig(**w4, **extra), calibration=calib, progress=False)
            ppl = perplexity(q, chunks, progress=False)
            cells.append(f"{ppl:.2f} ({ppl / fp:.2f}×)")
            print(name, extra, cells[-1], flush=True)
            del q
        cells += ["-"] * (3 - len(cells))
        rows.append(f"| {name} | {fp:.2f} | " + " | ".join(cells) + f" | {weight_error(model, QuantConfig(**w4)):.4f} |")
    return "\n".join(rows)


def main(argv=None):
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if args.folding:
        body = folding_study(args)
        print(body)
        if not args.no_append:
            append_results("Norm folding and weight-only W4 RTN (benchmarks/quant_table.py --folding)", body)
        return
    t0 = time.time()
    fp, cells = run(args)
    body = (
        f"SmolLM2-135M-Instruct (dequantized Q4_1 GGUF weights), perplexity on {args.n_chunks}×{args.seq_len} BoolQ-passage "
        f"tokens; GPTQ calibration {args.calib_chunks}×{args.seq_len} disjoint tokens; weights per-channel sym, activations "
        f"per-token sym (clip {args.a_clip} below 8 bits), KV {args.kv_bits} bits; lm_head and embeddings FP32; weight clip search "
        f"p=2.4, ratios 1 - i/{args.clip_grid} for i < {args.clip_max_shrink}·{args.clip_grid}. "
        f"Total time {time.time() - t0:.0f} s.\n\n" + table(fp, cells, args) + "\n\nGoals:\n" + goals(fp, cells)
    )
    print(body)
    if not args.no_append:
        append_results("Quantization table (benchmarks/quant_table.py)", body)


if __name__ == "__main__":
    main()
