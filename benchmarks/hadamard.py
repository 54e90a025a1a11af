"""Online Hadamard transform speed: radix-2 butterflies vs blocked (radix-128 GEMM) stages vs a dense matmul.

    python benchmarks/hadamard.py [--tokens 2048] [--repeats 7] [--no-append]

CPU: float32, tokens × width. GPU (when CUDA is available): bf16 at 8192 tokens, also as a ratio to a
same-size memcpy (the goal of issue 7 is ≤ 1.5× memcpy on an H100).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, machine, median_time  # noqa: E402

from rolora_plugin.hadamard.transform import build_transform, fwht  # noqa: E402

WIDTHS = [576, 1536, 4096, 4864, 5120, 11008, 14336]


def radix2(t, x):
    d = t.n // t.pow2
    y = fwht(x.reshape(*x.shape[:-1], d, t.pow2)) / math.sqrt(t.pow2)
    if t.dense is not None:
        y = torch.matmul(t.dense.to(x.dtype).T, y)
    return y.reshape(x.shape)


def bench(device, dtype, tokens, repeats):
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for n in WIDTHS:
        t = build_transform(n)
        x = torch.randn(tokens, n, device=device, dtype=dtype)
        dense = t.matrix(dtype, device)

        def timed(fn):
            fn()
            sync()
            med, _ = median_time(lambda: (fn(), sync()), repeats)
            return med

        r = {
            "blocked": timed(lambda: t.apply(x)),
            "radix-2": timed(lambda: radix2(t, x)),
            "dense": timed(lambda: x @ dense),
            "memcpy": timed(lambda: x.clone()),
        }
        rows.append((n, t.description, r))
    return rows


def table(rows, tokens, device, dtype):
    out = [
        f"{tokens} tokens, {dtype}, {device}; median ms.",
        "",
        "| width | construction | blocked | radix-2 | dense matmul | memcpy | blocked / memcpy | radix-2 / blocked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, desc, r in rows:
        ms = {k: 1e3 * v for k, v in r.items()}
        out.append(
            f"| {n} | {desc} | {ms['blocked']:.2f} | {ms['radix-2']:.2f} | {ms['dense']:.2f} | {ms['memcpy']:.2f} | "
            f"{r['blocked'] / r['memcpy']:.1f}× | {r['radix-2'] / r['blocked']:.1f}× |"
        )
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    parts = [table(bench(torch.device("cpu"), torch.float32, args.tokens, args.repeats), args.tokens, "cpu", torch.float32)]
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        parts.append(table(bench(dev, torch.bfloat16, 8192, args.repeats), 8192, "cuda", torch.bfloat16))
    else:
        parts.append("GPU (bf16, 8192 tokens, goal ≤ 1.5× memcpy on an H100): not measured — no GPU on this machine.")
    body = "\n\n".join(parts)
    print(f"machine: {machine()}\n\n{body}")
    if not args.no_append:
        append_results("Online Hadamard transform (benchmarks/hadamard.py)", body)


if __name__ == "__main__":
    main()
