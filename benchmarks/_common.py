"""Shared helpers for the benchmark scripts: machine description, timing medians, RESULTS.md appends, per-run
JSON results kept in the repository."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def results_dir(name: str) -> Path:
    """Where benchmark ``name`` keeps its per-run JSON: ``benchmarks/results/<name>/`` in the repository (committed,
    so a later session on another machine continues from it and re-prints every number), or
    ``$ROLORA_BENCH_RESULTS/<name>`` when that is set (tests, scratch runs)."""
    root = os.environ.get("ROLORA_BENCH_RESULTS")
    return (Path(root) if root else Path(__file__).resolve().parent / "results") / name


def digest(obj) -> str:
    """16 hex digits of the sha256 of ``obj`` as sorted JSON: the file name of a run keyed by its settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cached_json(directory: Path, key: dict, fn, cached_only: bool = False) -> dict | None:
    """``fn()`` once per ``key``: its dict (plus the key, the date and the machine) is written atomically to
    ``directory/<sha256(key)[:16]>.json`` and read back from there on every later call. Returns None when the run
    is missing and ``cached_only``. A result another process wrote first wins (the write is create-exclusive)."""
    from rolora_plugin.io.publish import OutputExistsError, atomic_write_text

    path = Path(directory) / f"{digest(key)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if cached_only:
        return None
    result = {**fn(), "key": key, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_text(path, json.dumps(result, indent=1, sort_keys=True) + "\n", overwrite=False)
    except OutputExistsError:
        return json.loads(path.read_text())
    return result


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
