"""Time and extra memory of the rotation pass (rotate_model_) on SmolLM2-135M: the fast engine beside its
reference and beside the clone-all-parameters floor, every run in a fresh process, variants interleaved.

    python benchmarks/rotation.py [--repeats 5] [--no-append]

Paths (rolora_plugin.hadamard.edits):
* "fast": the library path, ``edits.edit_`` (fused cast·scale·sign pass, GEMM stages into two reused workspaces,
  the output side applied on the row axis);
* "reference": ``edits.edit_reference``, the definition the fast path is tested against (what the library ran
  until 2026-12-07: separate cast/scale/sign tensors, the output side on transposed copies);
* "dense": the reference with every rotation materialised as a dense n×n float64 matrix (the naive approach).

"floor": cloning every parameter once, timed in the same process right before the pass (a pass that reads and
writes every weight once cannot beat it). Extra memory is the peak RSS during the pass minus the RSS right before
it (Linux: the peak is reset through /proc/self/clear_refs), first pass of a fresh process; the untied lm_head
(R1 makes it a new tensor) is reported and subtracted for the goal.
Goals (issue 33): R1+R2+R4 in float64 ≤ 1.0 s and ≤ 6× the floor; extra beyond the lm_head ≤ 0.05× the model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, machine  # noqa: E402

PATHS = ("fast", "reference", "dense")
CONFIGS = {"R1+R4": {}, "R1+R2+R4": {"r2": True}, "R1+R2+R4, float32 maths": {"r2": True, "compute_dtype": "float32"}}


class DenseTransform:
    """A rotation as a dense n×n matrix (naive baseline)."""

    def __init__(self, t):
        self._t, self.n, self.exact, self.description = t, t.n, t.exact, t.description
        self.m = t.matrix(torch.float64)

    def apply(self, x):
        return x @ self.m.to(x.dtype)

    def apply_transposed(self, x):
        return x @ self.m.T.to(x.dtype)

    def checksum(self):
        return self._t.checksum()


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def worker(config_name: str, path: str) -> dict:
    """One pass in this (fresh) process; returns its measurements."""
    import rolora_plugin.hadamard.edits as edits
    import rolora_plugin.rotate.rotation as rot
    from rolora_plugin import RotationConfig, rotate_model_
    from rolora_plugin.app.assets import smollm2_dir
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    with torch.no_grad():  # fault in every (possibly memory-mapped) weight page before measuring
        for p in model.parameters():
            p.add_(0)
    t0 = time.perf_counter()
    clones = [p.detach().clone() for p in model.parameters()]
    floor = time.perf_counter() - t0
    del clones
    gc.collect()
    config = RotationConfig(**CONFIGS[config_name])
    if path in ("reference", "dense"):
        rot._edit = edits.edit_reference
    if path == "dense":
        real_build = rot.build_rotations
        dense = {k: DenseTransform(v) for k, v in real_build(config, rot.ModelDims.from_config(model.config)).items()}
        rot.build_rotations = lambda c, d: dense
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    head = model.config.vocab_size * model.config.hidden_size * 4
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    rotate_model_(model, config, progress=False)
    elapsed = time.perf_counter() - t0
    extra = _status("VmHWM") - before
    return {"time": elapsed, "floor": floor, "extra": extra, "size": size, "head": head}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    plan = [(c, m) for c in CONFIGS for m in (PATHS if "float32" not in c else ("fast", "reference"))]
    runs: dict = {key: [] for key in plan}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):  # interleaved: one run of every variant per round, each in a fresh process
        for c, m in plan:
            out = subprocess.run([sys.executable, __file__, "--worker", c, m], capture_output=True, text=True, check=True)
            runs[(c, m)].append(json.loads(out.stdout.strip().splitlines()[-1]))
        loads.append(os.getloadavg()[0])
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("time", "floor", "extra")} for k, v in runs.items()}
    first = next(iter(runs.values()))[0]
    size, head = first["size"], first["head"]
    lines = [
        f"SmolLM2-135M fp32 ({size / 2**20:.0f} MiB of parameters), medians of {args.repeats} fresh processes per row, "
        f"variants interleaved, `torch.get_num_threads()={torch.get_num_threads()}`, load average (1 min) "
        f"{min(loads):.1f}–{max(loads):.1f} over the run.",
        "",
        "| rotations | path | time (s) | min (s) | clone floor (s) | × floor | extra peak RSS (MiB) | extra beyond lm_head / model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (c, m), v in med.items():
        tmin = min(r["time"] for r in runs[(c, m)])
        beyond = max(0.0, v["extra"] - head) / size
        lines.append(f"| {c} | {m} | {v['time']:.2f} | {tmin:.2f} | {v['floor']:.2f} | {v['time'] / v['floor']:.1f} | "
                     f"{v['extra'] / 2**20:.0f} | {beyond:.3f} |")  # fmt: skip
    lines.append("")
    for c in CONFIGS:
        if (c, "reference") in med:
            lines.append(f"- {c}: reference / fast = **{med[(c, 'reference')]['time'] / med[(c, 'fast')]['time']:.2f}×**"
                         + (f", dense / fast = {med[(c, 'dense')]['time'] / med[(c, 'fast')]['time']:.2f}×" if (c, "dense") in med else ""))  # fmt: skip
    lines += [
        "",
        f"R1 unties the embedding-tied lm_head: a permanent new {head / 2**20:.0f} MiB tensor ({head / size:.2f}× the "
        "model) inside every extra-memory figure; the last column subtracts it.",
        "Goals (issue 33): R1+R2+R4 float64 ≤ 1.0 s and ≤ 6× the clone floor; extra beyond the lm_head ≤ 0.05× the model.",
    ]
    body = "\n".join(lines)
    print(f"machine: {machine()}\n\n{body}")
    if not args.no_append:
        append_results("Rotation pass (benchmarks/rotation.py)", body)


if __name__ == "__main__":
    main()
