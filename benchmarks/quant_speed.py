"""Wall time of ``quantize_model_(…, QuantConfig.preset("w4a4"))`` on SmolLM2-135M rotated R1+R4, and what it made.

    python benchmarks/quant_speed.py                              # this checkout, 3 repeats
    python benchmarks/quant_speed.py --baseline /path/to/older/checkout   # side by side, interleaved

Each measurement is a fresh subprocess (load, rotate, quantize with ``--calib-chunks``×256 BoolQ calibration tokens,
then the BoolQ-passage perplexity at 4×256 tokens). With ``--baseline`` the older checkout's ``rolora_plugin`` is put
first on ``PYTHONPATH`` and the two alternate (baseline, current, baseline, …), so machine noise hits both alike.
Reported: the median total and its two phases (GPTQ weights; the activation clip search), the perplexity, and a
digest of the quantized weights with the chosen clip ratios (equal digests: the same model, bit for bit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine

HERE = Path(__file__).resolve()


def measure(calib_chunks: int) -> dict:
    """One measurement in this process (the child side)."""
    import torch

    torch.set_num_threads(int(os.environ.get("ROLORA_BENCH_THREADS", "2")))
    import rolora_plugin
    from rolora_plugin import RotationConfig, rotate_model_
    from rolora_plugin.app.assets import calibration_chunks, load_smollm2, text_chunks
    from rolora_plugin.metrics import perplexity
    from rolora_plugin.quant import QuantConfig, get_quantization_record, quantize_model_
    from rolora_plugin.quant import model as qmodel

    phases = {"clip_search": 0.0}
    search = qmodel.search_activation_clips

    def timed_search(*args, **kwargs):
        t = time.perf_counter()
        try:
            return search(*args, **kwargs)
        finally:
            phases["clip_search"] += time.perf_counter() - t

    qmodel.search_activation_clips = timed_search
    model, tok = load_smollm2(torch.float32)
    rotate_model_(model, RotationConfig(seed=0), progress=False)
    calibration = calibration_chunks(tok, calib_chunks, 256)
    t0 = time.perf_counter()
    quantize_model_(model, QuantConfig.preset("w4a4"), calibration=list(calibration.split(1)), progress=False)
    total = time.perf_counter() - t0
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode() + p.detach().contiguous().numpy().tobytes())
    h.update(json.dumps(get_quantization_record(model), sort_keys=True, default=str).encode())
    ppl = perplexity(model, text_chunks(tok, 4, 256), progress=False)
    return {"total_s": total, "clip_search_s": phases["clip_search"], "gptq_s": total - phases["clip_search"],
            "ppl": ppl, "digest": h.hexdigest()[:12], "code": str(Path(rolora_plugin.__file__).parent.parent)}


def _child(code_root: Path | None, calib_chunks: int) -> dict:
    env = dict(os.environ)
    if code_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code_root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run([sys.executable, str(HERE), "--child", "--calib-chunks", str(calib_chunks)], env=env,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, default=None, help="an older checkout to time side by side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calib-chunks", type=int, default=4, help="calibration sequences of 256 tokens (default 4)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-append", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.calib_chunks)))
        return
    if args.baseline is not None and not (args.baseline / "rolora_plugin" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {args.baseline} holds no rolora_plugin package; give the root of a checkout")
    sides = ([("baseline", args.baseline)] if args.baseline else []) + [("current", HERE.parent.parent)]
    runs: dict = {name: [] for name, _ in sides}
    for r in range(args.repeats):
        for name, root in sides:
            runs[name].append(_child(root, args.calib_chunks))
            print(f"repeat {r + 1}/{args.repeats} {name}: {runs[name][-1]['total_s']:.1f} s", file=sys.stderr)
    lines = ["| code | total s (median) | GPTQ weights s | activation clip search s | ppl W4A4 | model digest |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    med = {}
    for name, root in sides:
        rs = runs[name]
        med[name] = statistics.median(x["total_s"] for x in rs)
        lines.append(f"| {name} ({root}) | {med[name]:.1f} | {statistics.median(x['gptq_s'] for x in rs):.1f} | "
                     f"{statistics.median(x['clip_search_s'] for x in rs):.1f} | {rs[0]['ppl']:.3f} | "
                     f"{', '.join(sorted({x['digest'] for x in rs}))} |")  # fmt: skip
    body = "\n".join(lines)
    if args.baseline:
        body += f"\n\nspeed-up (median baseline / median current): {med['baseline'] / med['current']:.2f}×"
    body += (f"\n\n{args.repeats} repeats, calibration {args.calib_chunks}×256 tokens, "
             f"{os.environ.get('ROLORA_BENCH_THREADS', '2')} threads. machine: {machine()}")  # fmt: skip
    print(body)
    if not args.no_append:
        append_results("W4A4 preset quantization time (benchmarks/quant_speed.py)", body)


if __name__ == "__main__":
    main()
