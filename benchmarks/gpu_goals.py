"""The GPU goals of issue 17 as one table (run through benchmarks/gpu_suite.sh on an H100/H200).

    python benchmarks/gpu_goals.py [--skip-train-step] [--skip-rotation] [--no-append]
    python benchmarks/gpu_goals.py --device cpu --tokens 64 --skip-rotation --skip-train-step --no-append  # smoke run

Rows (LLaMA-2-7B shapes, bf16):

* online Hadamard ``x @ R`` at 8192 tokens for widths 4096, 11008, 14336 (random signs, forward and the
  transposed/backward direction) through ``OrthogonalTransform.apply`` (the Triton kernel when triton imports),
  the PyTorch GEMM-stage path, and a same-size device memcpy (``y.copy_(x)``); medians of
  ``triton.testing.do_bench`` (L2 flushed between calls), CUDA events when triton is missing. Goal ≤ 1.2× memcpy;
* rotation pass (R1+R2+R4, float64 maths) of a LLaMA-2-7B-shaped random bf16 model: timed on 2- and 4-layer
  models and extrapolated linearly to 32 layers (t = a + b·layers). Goal ≤ 0.15 s;
* train step: ``benchmarks/train_step.py`` (CUDA picked automatically: random Llama with 7B shapes, 4 layers,
  B=4, T=1024) in a child process, its rolora and rolora+qat rows. Goals ≤ +2%, ≤ +12%.

Each part runs under its own time limit; a part that fails or times out prints "not measured" with the reason.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import append_results, machine  # noqa: E402

from rolora_plugin.hadamard.transform import _kron_apply, build_transform  # noqa: E402
from rolora_plugin.hadamard.kernels import dispatch_triton_hadamard, is_triton_available  # noqa: E402

HADAMARD_WIDTHS = (4096, 11008, 14336)


def bench_ms(fn, device: str = "cuda") -> float:
    """Median milliseconds of ``fn()`` on the device (wall clock medians on CPU, for the smoke run)."""
    if device == "cpu":
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    if is_triton_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torch_path(t, x, transposed: bool):
    mats, signs = t._factors(x.device, x.dtype)
    if transposed:
        return lambda: _kron_apply(x, mats, transposed=True) * signs
    return lambda: _kron_apply(x * signs, mats, transposed=False)


def hadamard_rows(device: str, tokens: int) -> list[str]:
    rows = []
    for n in HADAMARD_WIDTHS:
        t = build_transform(n, random_signs=True, seed=0)
        x = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        kernel = dispatch_triton_hadamard(x, t, False) is not None
        memcpy = bench_ms(lambda: y.copy_(x), device)
        fwd, bwd = bench_ms(lambda: t.apply(x), device), bench_ms(lambda: t.apply_transposed(x), device)
        ref_fwd = bench_ms(torch_path(t, x, False), device)
        gbs = 2 * x.numel() * x.element_size() / (memcpy * 1e-3) / 1e9
        path = "Triton kernel" if kernel else "PyTorch stages (kernel not used)"
        rows.append(f"| online Hadamard {n} ({t.description}), {tokens} tokens, bf16, {device} | {path}: fwd {fwd:.3f} ms, "
                    f"transposed {bwd:.3f} ms; PyTorch stages fwd {ref_fwd:.3f} ms; memcpy {memcpy:.3f} ms "
                    f"({gbs:.0f} GB/s) | **{fwd / memcpy:.2f}×** memcpy (transposed {bwd / memcpy:.2f}×) | ≤ 1.2× | "
                    f"{'met' if max(fwd, bwd) <= 1.2 * memcpy else 'not met'} |")  # fmt: skip
    return rows


def llama7b(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def rotation_seconds(layers: int) -> float:
    from rolora_plugin import RotationConfig, rotate_model_

    model = llama7b(layers)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rotate_model_(model, RotationConfig(r1=True, r2=True, r4=True))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return seconds


def rotation_rows() -> list[str]:
    rotation_seconds(1)  # warm-up: CUDA context, cuBLAS handles, kernels
    t2, t4 = rotation_seconds(2), rotation_seconds(4)
    per_layer = (t4 - t2) / 2
    t32 = t2 + 30 * per_layer
    return [f"| rotation pass R1+R2+R4 (float64 maths), LLaMA-2-7B shapes, bf16 | 2 layers {t2:.3f} s, 4 layers "
            f"{t4:.3f} s → {per_layer * 1e3:.1f} ms/layer | **{t32:.3f} s** (32 layers, extrapolated) | ≤ 0.15 s | "
            f"{'met' if t32 <= 0.15 else 'not met'} |"]  # fmt: skip


def train_step_rows(timeout: int) -> list[str]:
    proc = subprocess.run([sys.executable, str(HERE / "train_step.py"), "--no-append"], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE.parent)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}")
    found = dict(re.findall(r"^\| (rolora(?:\+qat)?) \| [0-9.]+ \| ([+-][0-9.]+)% \|", proc.stdout, re.M))
    shape = next((ln for ln in proc.stdout.splitlines() if ln.startswith("Shapes:")), "")
    rows = []
    for name, goal in (("rolora", 2.0), ("rolora+qat", 12.0)):
        pct = float(found[name])
        rows.append(f"| train step {name} vs peft LoRA | {shape.removeprefix('Shapes: ')} | **{pct:+.1f}%** | "
                    f"≤ +{goal:.0f}% | {'met' if pct <= goal else 'not met'} |")  # fmt: skip
    return rows


def guarded(name: str, fn, *args) -> list[str]:
    t0 = time.perf_counter()
    try:
        rows = fn(*args)
    except Exception as exc:  # one failing part must not hide the others
        rows = [f"| {name} | not measured: {type(exc).__name__}: {str(exc)[:200]} | | | |"]
    print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-train-step", action="store_true")
    p.add_argument("--skip-rotation", action="store_true")
    p.add_argument("--train-step-timeout", type=int, default=300)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run of the script only")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_goals.py needs a CUDA device (or --device cpu for a smoke run)")
    lines = ["| goal | measured | result | target | status |", "|---|---|---|---|---|"]
    lines += guarded("online Hadamard", hadamard_rows, args.device, args.tokens)
    lines += [] if args.skip_rotation else guarded("rotation pass", rotation_rows)
    lines += [] if args.skip_train_step else guarded("train step", train_step_rows, args.train_step_timeout)
    body = "\n".join(lines)
    print(f"machine: {machine()}\n\n{body}", flush=True)
    if not args.no_append:
        append_results("GPU goals of issue 17 (benchmarks/gpu_suite.sh)", body)


if __name__ == "__main__":
    main()
