"""Streaming rotation of a LLaMA-2-7B-shaped bf16 checkpoint, disk to disk: wall time and peak RSS.

    python benchmarks/rotate_checkpoint.py [--size 7b|1b|tiny] [--workdir DIR] [--keep] [--no-append]

1. Generates (once, cached in ``--workdir``, default ``$ROLORA_CACHE/bench`` or ``~/.cache/rolora-plugin/bench``)
   a checkpoint with random weights of the chosen shape, sharded like HF's (2 shards; 13.5 GB for 7b). The
   generator streams too: each safetensors file is written header first, then tensor by tensor, so it never
   holds more than one tensor. Published atomically (an interrupted generation is never reused).
2. Evicts the input's pages from the page cache (``posix_fadvise(DONTNEED)`` on those files only), so the run
   reads from disk, then runs :func:`rolora_plugin.io.streaming.rotate_checkpoint` with R1+R2+R4 in a **fresh
   subprocess** under cProfile, and reports: wall time of the call, the fsync of the output after it, peak RSS
   (the child's ``VmHWM`` and ``getrusage(RUSAGE_CHILDREN).ru_maxrss``), and where the time went.
3. Prints a table and appends a dated section to ``benchmarks/RESULTS.md`` (machine, date, command, load average).

Goal (issue 17): 7b, R1+R2+R4, on the 2-core / 24 GB CPU box: peak RSS ≤ 3 GB, ≤ 10 min.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, machine  # noqa: E402

SIZES = {  # LlamaConfig fields; 7b = LLaMA-2-7B, 1b = TinyLlama-1.1B, tiny = a smoke test of this script
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
}  # fmt: skip
INPUT_SHARDS = 2
PROFILED = {  # (file the function is in, function name) -> phase label (cProfile, cumulative)
    ("streaming.py", "read"): "the one read of every tensor + its checks, fingerprint sample, norm rms (_Intake.read)",
    ("safetensors_reader.py", "read"): "… of which reading (pread)",
    ("streaming.py", "_check_finite"): "… of which finite checks (all_finite, cast)",
    ("fingerprint.py", "take"): "… of which base-fingerprint samples",
    ("safetensors_reader.py", "prefetch"): "prefetch requests (posix_fadvise WILLNEED)",
    ("streaming.py", "_edit_unit"): "rotation maths (the units' edits from rotation.py)",
    ("safetensors/torch.py", "save_file"): "writing shards (safetensors.save_file)",
    ("streaming.py", "_write_metadata"): "config / record / tokenizer files",
}


# ---------------------------------------------------------------------------------------------- generator


def _llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       dtype="bfloat16", architectures=["LlamaForCausalLM"])  # fmt: skip


def _tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the model, from a meta-device instance (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(n, tuple(p.shape)) for n, p in model.state_dict().items()]


def _random_tensor(name: str, shape, seed: int):
    """bf16 N(0, 0.02²) weights; RMSNorm gains 1 + U(0, 0.5) (non-trivial, so folding is exercised)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if "norm" in name:
        return (1.0 + 0.5 * torch.rand(shape, generator=g)).to(torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)


def _write_safetensors_streaming(path: Path, specs: list[tuple[str, tuple[int, ...]]], seed0: int) -> None:
    """A safetensors file (8-byte little-endian header size, JSON header, raw data) written tensor by tensor.

    Shapes and the dtype are known in advance, so the header (offsets) is written first and each tensor is
    generated, written and dropped in turn.
    """
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for i, (name, shape) in enumerate(specs):
            f.write(memoryview(_random_tensor(name, shape, seed0 + i).view(torch.int16).numpy()))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _split(specs, parts: int) -> list[list]:
    """``parts`` contiguous groups of about equal bytes, in model order (like HF's max_shard_size splits)."""
    total, groups, acc = sum(_numel(s) for _, s in specs), [[]], 0
    for name, shape in specs:
        if acc >= total * len(groups) / parts and len(groups) < parts:
            groups.append([])
        groups[-1].append((name, shape))
        acc += _numel(shape)
    return groups


def generate(folder: Path, size: str) -> Path:
    """The cached random checkpoint of ``size`` in ``folder`` (generated atomically the first time)."""
    from rolora_plugin.io.publish import atomic_output_dir, atomic_write_text

    if (folder / "config.json").is_file():
        return folder
    config = _llama_config(size)
    specs = _tensor_specs(config)
    t0 = time.perf_counter()
    with atomic_output_dir(folder) as tmp:
        config.save_pretrained(str(tmp))
        groups, weight_map, seed = _split(specs, INPUT_SHARDS), {}, 0
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            print(f"generating {fname}: {len(group)} tensors, {2 * sum(_numel(s) for _, s in group) / 1e9:.2f} GB", flush=True)
            _write_safetensors_streaming(tmp / fname, group, seed)
            weight_map.update({n: fname for n, _ in group})
            seed += len(group)
        index = {"metadata": {"total_size": 2 * sum(_numel(s) for _, s in specs)}, "weight_map": weight_map}
        atomic_write_text(tmp / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    print(f"generated {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def evict_from_page_cache(folder: Path) -> None:
    """Drop the clean cached pages of ``folder``'s files (only those: other users' cache is left alone)."""
    for p in folder.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- the measured run


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(src: str, out: str, max_shard_bytes: int) -> None:
    """Runs in the fresh subprocess: the timed rotation, then a JSON line on stdout."""
    import cProfile
    import logging
    import pstats

    import torch
    import transformers  # imported before the clock starts (as an application would have it)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from rolora_plugin import RotationConfig
    from rolora_plugin.io.streaming import rotate_checkpoint

    getattr(transformers, "LlamaForCausalLM")  # resolve the lazy module too

    timeline = []

    class _Timeline(logging.Handler):
        def emit(self, record):
            timeline.append((time.perf_counter(), _status_kib("VmRSS"), _status_kib("VmHWM"), record.getMessage()))

    logging.getLogger("rolora_plugin").addHandler(_Timeline())
    logging.getLogger("rolora_plugin").setLevel(logging.INFO)
    rss_before = _status_kib("VmHWM")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    rotate_checkpoint(src, out, RotationConfig(r2=True), max_shard_bytes=max_shard_bytes, progress=True)
    prof.disable()
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t1 = time.perf_counter()
    for p in Path(out).iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fsync = time.perf_counter() - t1
    stats = pstats.Stats(prof).stats
    phases = {label: sum(v[3] for (path, _, fn), v in stats.items() if fn == name and path.endswith(os.sep + file))
              for (file, name), label in PROFILED.items()}  # fmt: skip
    result = dict(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, fsync_s=fsync, vmhwm_kib=_status_kib("VmHWM"), hwm_after_import_kib=rss_before,
                  threads=torch.get_num_threads(), phases=phases,
                  timeline=[(t - t0, rss, hwm, msg) for t, rss, hwm, msg in timeline])  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


def run_child(src: Path, out: Path, max_shard_bytes: int) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", str(src), str(out), "--max-shard-bytes", str(max_shard_bytes)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["process_s"] = time.perf_counter() - t0
    result["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return result


# ---------------------------------------------------------------------------------------------- report


def _report(size: str, src: Path, res: dict, load: tuple, max_shard_bytes: int) -> str:
    gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
    peak_gb = max(res["vmhwm_kib"], res["ru_maxrss_kib"]) * 1024 / 1e9
    lines = [
        f"{size}-shaped LLaMA checkpoint, bf16 random weights, {gb:.1f} GB in {INPUT_SHARDS} shards; R1+R2+R4 (float64 "
        f"maths), output shards ≤ {max_shard_bytes / 2**30:.2f} GiB; input evicted from the page cache first; fresh "
        f"subprocess, `torch.get_num_threads()={res['threads']}`.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| rotate_checkpoint wall time | {res['wall_s']:.0f} s ({res['wall_s'] / 60:.1f} min) |",
        f"| CPU time of the subprocess (user + sys, both threads) | {res['cpu_s']:.0f} s |",
        f"| + fsync of the output | {res['fsync_s']:.0f} s |",
        f"| whole subprocess (imports included) | {res['process_s']:.0f} s |",
        f"| peak RSS (VmHWM / ru_maxrss) | {res['vmhwm_kib'] / 2**20:.2f} / {res['ru_maxrss_kib'] / 2**20:.2f} GiB |",
        f"| RSS after imports | {res['hwm_after_import_kib'] / 2**20:.2f} GiB |",
        "",
        "| phase (cProfile, cumulative) | time (s) |",
        "|---|---|",
    ]
    lines += [f"| {label} | {t:.1f} |" for label, t in res["phases"].items()]
    lines += ["", f"Code: {_code_version()}.", "", f"Load average (1/5/15 min) at start {_fmt(load[0])}, at end {_fmt(load[1])}: other engineers share the 2 cores.",
              f"Goal (issues 17, 33; for 7b, at load < 2; this run: {size}): peak RSS ≤ 3 GB ({'met' if peak_gb <= 3 else 'NOT met'}: {peak_gb:.2f} GB), "
              f"≤ 10 min ({'met' if res['wall_s'] <= 600 else 'NOT met'}: {res['wall_s'] / 60:.1f} min)."]  # fmt: skip
    return "\n".join(lines)


def _code_version() -> str:
    """The commit measured, and rotation.py's last change (the maths the streaming pass imports)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return "?"

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no", "rolora_plugin").splitlines() if line[3:]]
    dirty = f" (+ uncommitted changes to {', '.join(changed)})" if changed else ""
    last = git("log", "-1", "--format=%h %ci", "--", "rolora_plugin/rotate/rotation.py").strip()
    return f"commit {git('rev-parse', '--short', 'HEAD').strip()}{dirty}; rotation.py last changed in {last}"


def _fmt(load) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def _cache_root() -> Path:
    return Path(os.environ.get("ROLORA_CACHE", Path.home() / ".cache" / "rolora-plugin")) / "bench"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="7b")
    p.add_argument("--workdir", type=Path, default=None, help="where the input is cached (default $ROLORA_CACHE/bench)")
    p.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="output shard bound (default 1 GiB)")
    p.add_argument("--keep", action="store_true", help="keep the rotated output (default: deleted after the run)")
    p.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    p.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child, args.max_shard_bytes)
    work = args.workdir or _cache_root()
    src = generate(work / f"llama-{args.size}-shaped-bf16", args.size)
    out = work / f"llama-{args.size}-shaped-bf16-rotated"
    shutil.rmtree(out, ignore_errors=True)
    evict_from_page_cache(src)
    load_start = os.getloadavg()
    try:
        res = run_child(src, out, args.max_shard_bytes)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    body = _report(args.size, src, res, (load_start, os.getloadavg()), args.max_shard_bytes)
    body += "\n\nRSS timeline (s since the call, VmRSS GiB, VmHWM GiB, log line):\n\n" + "\n".join(
        f"    {t:7.1f}  {rss / 2**20:5.2f}  {hwm / 2**20:5.2f}  {msg[:90]}" for t, rss, hwm, msg in res["timeline"]
    )
    print(f"machine: {machine()}\n\n{body}")
    if not args.no_append:
        append_results(f"Streaming checkpoint rotation, {args.size} (benchmarks/rotate_checkpoint.py)", body)


if __name__ == "__main__":
    main()
