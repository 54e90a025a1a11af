"""W4A4 with learned vs Hadamard rotations on SmolLM2 (issue 13), on the protocol of ``peer_llmcompressor.py``.

    python benchmarks/learned_rotation.py                       # draws 0 1 for RTN, draw 1 for the w4a4 preset
    python benchmarks/learned_rotation.py --learn r1 r2 --steps 100 --no-append
    python benchmarks/learned_rotation.py --cached-only         # the table from what has been run so far

Rows (ratio of perplexity to FP on BoolQ passages and SciQ support paragraphs, the very token ids of
``benchmarks/peer_llmcompressor.py``, so the numbers compare with its table):

* Hadamard R1+R2+R4 + W4A4 RTN, and Hadamard R1+R2+R3+R4 + ``QuantConfig.preset("w4a4")``: the rows of the peer
  benchmark, taken from its results (``benchmarks/results/peer_llmcompressor/``; run there when missing). R3 is exact and a
  no-op without a KV quantizer, so the second is the Hadamard R1+R2+R4 preset result.
* learned ``--learn`` (R1, optionally R2; the rest Hadamard) + R4 + the same two quantizers: the rotation is learned
  on the same calibration chunks the quantizer uses (``RotationConfig(learn=...)``, :mod:`rolora_plugin.rotate.learned`).

Wall: ``rotate_model_`` including the learning ("rotate s") and the whole quantization ("total s"), torch threads
``--threads``. Each run is cached as JSON under ``benchmarks/results/learned_rotation/`` (committed) keyed by its settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import peer_llmcompressor as peer  # noqa: E402  (same tokens, same FP / Hadamard runs)

SOURCES = peer.SOURCES
QUANTS = ("rtn", "w4a4")
logger = logging.getLogger("learned_rotation")


def cached(key: dict, fn, cached_only: bool) -> dict | None:
    from _common import cached_json, results_dir

    return cached_json(results_dir("learned_rotation"), key, fn, cached_only)


def quant_config(name: str):
    from rolora_plugin.quant import QuantConfig

    return QuantConfig(w_bits=4, a_bits=4) if name == "rtn" else QuantConfig.preset("w4a4")


def learned_config(args):
    from rolora_plugin import RotationConfig

    return RotationConfig(seed=0, r2=True, learn=tuple(args.learn), learn_steps=args.steps, learn_lr=args.lr,
                          learn_tokens=args.tokens, learn_layers_per_step=args.layers_per_step)  # fmt: skip


def run_learned(rot, quant_name: str, tokens: dict, draw: int) -> dict:
    """ppl per source, rotation (incl. learning) wall and total wall of one learned row."""
    from rolora_plugin import rotate_model_
    from rolora_plugin.app.assets import load_smollm2
    from rolora_plugin.metrics import perplexity
    from rolora_plugin.quant import quantize_model_

    model, _ = load_smollm2()
    calib = list(tokens["calib"][str(draw)].split(4))
    t0 = time.perf_counter()
    record = rotate_model_(model, rot, calibration=calib, progress=False)
    t_rot = time.perf_counter() - t0
    quantize_model_(model, quant_config(quant_name), calibration=calib, progress=False)
    wall = time.perf_counter() - t0
    ppl = {s: perplexity(model, c, progress=False) for s, c in tokens["eval"].items()}
    return {"ppl": ppl, "rotate_s": t_rot, "wall_s": wall, "r1": record.rotations["r1"]["description"]}


def hadamard_row(quant_name: str, proto: dict, tokens: dict, draw: int, threads: int, cached_only: bool) -> dict | None:
    recipe = "rot-rtn" if quant_name == "rtn" else "best"
    return peer.cached_run(peer.our_key(recipe, proto, draw, threads), lambda: peer.run_ours(recipe, tokens, draw), cached_only)


def collect(args, proto: dict, tokens: dict) -> dict:
    rot = learned_config(args)
    out = {"fp": peer.cached_run(peer.our_key("fp", proto, 0, args.threads), lambda: peer.run_ours("fp", tokens, 0), args.cached_only)}
    for q in args.quants:
        for draw in args.draws if q == "rtn" else args.preset_draws:
            out[("hadamard", q, draw)] = hadamard_row(q, proto, tokens, draw, args.threads, args.cached_only)
            key = dict(recipe="learned", quant=q, rotation=peer._changed(rot), draw=draw, proto=proto, threads=args.threads)
            out[("learned", q, draw)] = cached(key, lambda q=q, draw=draw: run_learned(rot, q, tokens, draw), args.cached_only)
            for kind in ("hadamard", "learned"):
                r = out[(kind, q, draw)]
                print(f"{kind:8s} {q:5s} draw {draw}: " + (f"ppl {r['ppl']} wall {r['wall_s']:.0f}s" if r else "not cached"), flush=True)
    return out


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def table(results: dict, args) -> str:
    fp = results["fp"]
    lines = ["| rotation | quantizer | draws | " + " | ".join(f"{s} ×FP" for s in SOURCES) + " | rotate s | total s |", "|---" * (5 + len(SOURCES)) + "|"]
    names = {"hadamard": "Hadamard R1+R2+R4", "learned": f"learned {'+'.join(args.learn).upper()} (+Hadamard rest) R1+R2+R4"}
    for q in args.quants:
        draws = args.draws if q == "rtn" else args.preset_draws
        for kind in ("hadamard", "learned"):
            runs = [r for r in (results.get((kind, q, d)) for d in draws) if r]
            cells = [_stats([r["ppl"][s] / fp["ppl"][s] for r in runs]) if fp else "-" for s in SOURCES]
            rot_s = _stats([r["rotate_s"] for r in runs if "rotate_s" in r]) if kind == "learned" else "(in total)"
            qname = "RTN" if q == "rtn" else 'preset("w4a4")'
            lines.append(f"| {names[kind]} | {qname} | {draws} | " + " | ".join(cells) + f" | {rot_s} | {_stats([r['wall_s'] for r in runs])} |")
    return "\n".join(lines)


def describe(args, results: dict, total: float) -> str:
    fp = results["fp"]
    return (
        f"SmolLM2-135M-Instruct, the token ids of benchmarks/peer_llmcompressor.py: eval {args.n_eval}×{args.seq_len} tokens "
        f"of BoolQ passages and of SciQ support paragraphs, calibration {args.n_calib}×{args.seq_len} BoolQ tokens (draw k: "
        f"disjoint slices from the end of the stream); FP ppl {fp and {s: round(v, 2) for s, v in fp['ppl'].items()}}. "
        f"Learned: RotationConfig(r2=True, learn={args.learn}, learn_steps={args.steps}, learn_lr={args.lr:g}, "
        f"learn_tokens={args.tokens}, learn_layers_per_step={args.layers_per_step}), objective W4A4 of "
        f"QuantConfig.preset('w4a4') (asymmetric activations), learned on the quantizer's calibration chunks. Cells: "
        f"ppl / FP, mean [min–max] over the draws. Torch threads {args.threads}; load average at the end "
        f"{os.getloadavg()[0]:.1f} (2 shared cores). This invocation {total:.0f} s (cached runs cost nothing).\n\n" + table(results, args)
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learn", nargs="+", default=["r1"], choices=["r1", "r2"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--layers-per-step", type=int, default=8)
    p.add_argument("--quants", nargs="+", default=list(QUANTS), choices=QUANTS)
    p.add_argument("--draws", type=int, nargs="+", default=[0, 1], help="calibration draws for the RTN rows")
    p.add_argument("--preset-draws", type=int, nargs="+", default=[1], help="draws for the w4a4-preset rows (GPTQ: slow)")
    p.add_argument("--n-eval", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 matches the peer benchmark's cached runs)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--cached-only", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    import torch

    from rolora_plugin.app.assets import load_smollm2

    torch.set_num_threads(args.threads)
    proto = peer.protocol(args)
    _, tok = load_smollm2()
    draws = sorted(set(args.draws) | set(args.preset_draws))
    tokens = torch.load(peer.token_file(tok, proto, draws))
    t0 = time.time()
    body = describe(args, collect(args, proto, tokens), time.time() - t0)
    print(body)
    if not args.no_append:
        from _common import append_results

        append_results("W4A4: learned vs Hadamard rotations (benchmarks/learned_rotation.py)", body)


if __name__ == "__main__":
    main()
