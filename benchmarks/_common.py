"""Shared helpers for the benchmark scripts: machine description, timing medians, RESULTS.md appends."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def append_results(title: str, body: str) -> None:
    """Append a dated section (machine, command, body) to benchmarks/RESULTS.md."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = f"\n### {title} — {stamp}\n\n- machine: {machine()}\n- command: `{command()}`\n\n{body.rstrip()}\n"
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(section)
