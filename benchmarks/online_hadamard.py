"""Online Hadamard on CPU: radix choices against the automatic stage rule, side by side in one run.

    python benchmarks/online_hadamard.py [--rows 512 8192] [--dtypes float32 bfloat16] [--rounds 7]
                                         [--widths ...] [--widths-8192 ...] [--compile] [--no-append]

For every (tokens, dtype, width) the variants run interleaved (each round calls every variant once, in a shuffled
order, so load drifts and the allocator state left by the previous call hit all alike) and the median is reported. Times are **CPU time of this process** (``time.process_time``, one torch thread): on the
shared 2-core box the other engineers' jobs stretch wall time by 2-10×, CPU time much less (cache and memory
contention remain, so numbers still move ±20% between runs).

Variants (each ``x @ R`` with random signs, R = diag(s)·(D ⊗ H_p)/sqrt(p)):

* ``before``: the code before issue 17 (D as its own stage, Sylvester blocks of at most 128, every left stage a
  broadcast ``torch.matmul``, autograd through the GEMMs);
* ``≤16``, ``≤32``, ``≤64``, ``≤128``: today's stage executor with D as its own GEMM stage and H_p split into
  Sylvester blocks of at most that size;
* ``radix-2``: D stage plus :func:`rolora_plugin.hadamard.transform.fwht` butterflies (``--compile`` adds it compiled);
* ``auto``: ``OrthogonalTransform.apply``, stages from ``_stage_sizes`` (the cost model in hadamard.py);
* references: ``down_proj`` (``x @ Wᵀ``, W of shape (h, n): h is the hidden size of the model whose
  intermediate size n is, else n/4) and ``copy`` (``x.clone()``).

Forward for all variants; forward + backward (input gradient only, as for a frozen base weight) for
``before``, ``auto`` and ``down_proj``. 7B-scale widths at 8192 tokens are left to benchmarks/gpu_suite.sh by
default (one fp32 down_proj there takes ~15 s on one CPU thread).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, machine  # noqa: E402

from rolora_plugin.hadamard.transform import _block_sizes, _kron_apply, _stage_factors, build_transform, fwht  # noqa: E402

WIDTHS = [64, 128, 576, 896, 1536, 4096, 4864, 5120, 11008, 13824, 14336, 18944]
WIDTHS_8192 = [576, 896, 1536, 4096, 4864]
# hidden size for a width that is a model's intermediate size (SmolLM2, Qwen2-0.5B, LLaMA-2-7B/13B, Mistral-7B,
# Qwen2-7B); other widths get n // 4
DOWN_OUT = {1536: 576, 4864: 896, 11008: 4096, 13824: 5120, 14336: 4096, 18944: 3584}
RADIX_BITS = {"≤16": 4, "≤32": 5, "≤64": 6, "≤128": 7}
BACKWARD = ("before", "auto", "down_proj")


def radix_stages(t, bits: int) -> tuple[int, ...]:
    d = t.n // t.pow2
    return ((d,) if d > 1 else ()) + _block_sizes(t.pow2, bits)


def planned(t, sizes, dtype):
    """``x ↦ (x·s) @ R`` with the given stage orders (autograd through the GEMMs)."""
    mats = [m.to(dtype) for m in _stage_factors(t.dense, t.pow2, sizes)]
    signs = t.signs.to(dtype)
    return lambda x: _kron_apply(x * signs, mats, transposed=False)


def before(t, dtype):
    """The transform as it was before issue 17: radix-128 stages, broadcast matmul for every left stage."""
    mats = [m.to(dtype) for m in _stage_factors(t.dense, t.pow2, radix_stages(t, 7))]
    signs = t.signs.to(dtype)

    def run(x):
        y, after = (x * signs).reshape(-1, t.n), 1
        for i, m in enumerate(reversed(mats)):
            s = m.shape[0]
            y = y.reshape(-1, s) @ m if i == 0 else torch.matmul(m.T, y.reshape(-1, s, after))
            after *= s
        return y.reshape(x.shape)

    return run


def butterfly(t, dtype):
    d, p = t.n // t.pow2, t.pow2
    dense = None if t.dense is None else t.dense.to(dtype)
    signs = t.signs.to(dtype)

    def run(x):
        y = fwht((x * signs).reshape(-1, d, p)) / math.sqrt(p)
        return (torch.matmul(dense.T, y) if dense is not None else y).reshape(x.shape)

    return run


def variants(t, dtype, compile_: bool) -> dict:
    fns = {"before": before(t, dtype)}
    fns.update({name: planned(t, radix_stages(t, bits), dtype) for name, bits in RADIX_BITS.items()})
    fns["radix-2"] = butterfly(t, dtype)
    if compile_:
        fns["radix-2 compiled"] = torch.compile(butterfly(t, dtype), dynamic=False)
        fns["≤128 compiled"] = torch.compile(planned(t, radix_stages(t, 7), dtype), dynamic=False)
    fns["auto"] = t.apply
    w = torch.randn(DOWN_OUT.get(t.n, t.n // 4), t.n, dtype=dtype)
    fns["down_proj"] = lambda x: torch.nn.functional.linear(x, w)
    fns["copy"] = lambda x: x.clone()
    return fns


def timed_calls(fns: dict, x: torch.Tensor) -> dict:
    """name -> zero-argument callable: forward for every variant, ``name+bwd`` for those in BACKWARD."""
    calls = {name: (lambda f=f: f(x)) for name, f in fns.items()}
    xg = x.detach().clone().requires_grad_(True)
    for name in BACKWARD:
        calls[name + "+bwd"] = lambda f=fns[name]: _forward_backward(f, xg)
    return calls


def _forward_backward(f, x):
    y = f(x)
    return torch.autograd.grad(y, x, torch.ones_like(y))


def medians(calls: dict, rounds: int) -> dict:
    """CPU-time medians in seconds over rounds that call every variant once, in a new random order each round
    (one warm-up call each): what a call finds in the allocator and caches depends on the call before it."""
    times = {k: [] for k in calls}
    for fn in calls.values():
        fn()
    order = list(calls)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for k in order:
            t0 = time.process_time()
            calls[k]()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_one(n: int, rows: int, dtype, rounds: int, compile_: bool) -> dict:
    t = build_transform(n, random_signs=True, seed=0)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n), dtype=torch.float32).to(dtype)
    with torch.no_grad():
        fwd = medians({k: v for k, v in timed_calls(variants(t, dtype, compile_), x).items() if "+bwd" not in k},
                      rounds)  # fmt: skip
    bwd = medians({k: v for k, v in timed_calls(variants(t, dtype, False), x).items() if "+bwd" in k}, rounds)
    from rolora_plugin.hadamard.transform import _stage_sizes

    return {"n": n, "desc": t.description, "stages": _stage_sizes(n // t.pow2, t.pow2, dtype), **fwd, **bwd}


def table(rows_: list[dict], tokens: int, dtype, compile_: bool) -> str:
    fwd_cols = ["before"] + list(RADIX_BITS) + ["radix-2"] + (["radix-2 compiled", "≤128 compiled"] if compile_ else []) + ["auto"]
    head = ["width", "construction", "auto stages"] + [f"{c} fwd" for c in fwd_cols] + [
        "down_proj fwd", "copy", "before fwd+bwd", "auto fwd+bwd", "down_proj fwd+bwd",
        "before / down_proj (f+b)", "auto / down_proj (f+b)", "auto / copy (fwd)", "speed-up before→auto (f+b)"]  # fmt: skip
    out = [f"{tokens} tokens, {str(dtype).removeprefix('torch.')}, CPU time per call in ms (median).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows_:
        ms = lambda k: f"{1e3 * r[k]:.2f}"  # noqa: E731
        cells = [str(r["n"]), r["desc"].replace("diag(±1)·", ""), "·".join(map(str, r["stages"]))]
        cells += [ms(c) for c in fwd_cols] + [ms("down_proj"), ms("copy")]
        cells += [ms("before+bwd"), ms("auto+bwd"), ms("down_proj+bwd")]
        cells += [f"{100 * r['before+bwd'] / r['down_proj+bwd']:.1f}%", f"{100 * r['auto+bwd'] / r['down_proj+bwd']:.1f}%",
                  f"{r['auto'] / r['copy']:.1f}×", f"{r['before+bwd'] / r['auto+bwd']:.2f}×"]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[512, 8192], help="token counts (B·T)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--widths", type=int, nargs="+", default=WIDTHS, help="widths at token counts below 8192")
    p.add_argument("--widths-8192", type=int, nargs="+", default=WIDTHS_8192, help="widths at ≥ 8192 tokens")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rounds-8192", type=int, default=5, help="rounds at ≥ 8192 tokens")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd radix-2 and ≤128 variants")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    parts = []
    for rows in args.rows:
        for name in args.dtypes:
            dtype = getattr(torch, name)
            widths, rounds = (args.widths_8192, args.rounds_8192) if rows >= 8192 else (args.widths, args.rounds)
            results = [bench_one(n, rows, dtype, rounds, args.compile) for n in widths]
            parts.append(table(results, rows, dtype, args.compile))
            print(parts[-1] + "\n", flush=True)
    load1 = os.getloadavg()
    note = (f"One torch thread, {args.rounds} interleaved rounds per cell ({args.rounds_8192} at ≥ 8192 tokens). Load average (1/5/15 min) "
            f"{load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at the start, {load1[0]:.1f}/{load1[1]:.1f}/"
            f"{load1[2]:.1f} at the end, on {os.cpu_count()} cores.")  # fmt: skip
    body = "\n\n".join(parts + [note])
    print(f"machine: {machine()}\n{note}")
    if not args.no_append:
        append_results("Online Hadamard on CPU: radix choices vs the automatic stage rule (benchmarks/online_hadamard.py)", body)


if __name__ == "__main__":
    main()
