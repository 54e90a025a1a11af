"""Wall time of our W4A4 preset quantization on SmolLM2-135M, beside the peer's (llm-compressor 0.14) on the same tokens.

    python benchmarks/quant_speed.py                              # ours and the peer, 3 repeats, interleaved
    python benchmarks/quant_speed.py --no-peer                    # ours only
    python benchmarks/quant_speed.py --baseline /path/to/older/checkout   # an older checkout of ours beside this one

Ours: ``rotate_model_(model, RotationConfig.preset("w4a4"), calibration=…)`` (R1+R2+R4, R1 and R2 **learned** under
W4A4 fake quantization; ``--rotation hadamard``: ``RotationConfig(seed=0)``, R1+R4 Hadamard, the set-up of this
script's earlier rows) then ``quantize_model_(…, QuantConfig.preset("w4a4"))`` (GPTQ with weight clip search, then
the per-linear activation clip search). The peer: its best W4A4 recipe of ``benchmarks/peer_llmcompressor.py``,
``SpinQuantModifier(R1, R2, R4, random-hadamard)`` + ``GPTQModifier`` (int4 per-channel weights, int4 dynamic
per-token activations; llm-compressor 0.14 has no rotation learning), run by ``oneshot`` in the peer's own
virtual environment (``$ROLORA_CACHE/llmcompressor-venv``, built on first use by ``peer_llmcompressor.peer_venv``).

Same recipe size on both sides: the same model folder, the same ``--calib-chunks`` × 256 calibration token ids (one
file written by ``peer_llmcompressor.token_file``, draw 0: BoolQ passages from the end of the stream) fed one
sequence per batch, the same torch thread count (``ROLORA_BENCH_THREADS``, default 2), and the same evaluation
(``rolora_plugin.metrics.perplexity`` on 4 × 256 BoolQ passages and SciQ supports). Wall time is the rotation +
quantization only (not the model load, not the evaluation), each in a fresh subprocess; the sides alternate
(ours, peer, ours, …) so machine noise hits both alike. Reported: medians, our phases (rotation learning; GPTQ
weights; activation clip search), perplexities, and a digest of our quantized model (equal digests: the same
model, bit for bit).
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
SEQ = 256
N_EVAL = 4


def threads() -> int:
    return int(os.environ.get("ROLORA_BENCH_THREADS", "2"))


def measure(token_path: str, rotation: str) -> dict:
    """One measurement of ours in this process (the child side)."""
    import torch

    torch.set_num_threads(threads())
    import rolora_plugin
    from rolora_plugin import RotationConfig, rotate_model_
    from rolora_plugin.app.assets import load_smollm2
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
    tokens = torch.load(token_path)
    calibration = list(tokens["calib"]["0"].split(1))
    model, _ = load_smollm2(torch.float32)
    config = RotationConfig.preset("w4a4") if rotation == "learned" else RotationConfig(seed=0)
    t0 = time.perf_counter()
    rotate_model_(model, config, calibration=calibration if config.learn else None, progress=False)
    t1 = time.perf_counter()
    quantize_model_(model, QuantConfig.preset("w4a4"), calibration=calibration, progress=False)
    t2 = time.perf_counter()
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode() + p.detach().contiguous().numpy().tobytes())
    h.update(json.dumps(get_quantization_record(model), sort_keys=True, default=str).encode())
    ppl = {s: perplexity(model, c, progress=False) for s, c in tokens["eval"].items()}
    return {"total_s": t2 - t0, "rotation_s": t1 - t0, "clip_search_s": phases["clip_search"],
            "gptq_s": t2 - t1 - phases["clip_search"], "ppl": ppl, "digest": h.hexdigest()[:12],
            "code": str(Path(rolora_plugin.__file__).parent.parent)}  # fmt: skip


def _child(code_root: Path | None, token_path: Path, rotation: str) -> dict:
    env = dict(os.environ)
    if code_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code_root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run([sys.executable, str(HERE), "--child", str(token_path), "--rotation", rotation], env=env,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def _peer(token_path: Path) -> dict:
    """One timed run of the peer's best W4A4 recipe in its venv (never cached: this is a timing)."""
    from peer_llmcompressor import run_peer

    res = run_peer("best", token_path, 0, threads())
    return {"total_s": res["wall_s"], "ppl": res["ppl"], "versions": res.get("versions", {})}


def token_path(calib_chunks: int) -> Path:
    """The token file both sides read (``peer_llmcompressor.token_file``: eval chunks per source, calibration draw 0)."""
    from peer_llmcompressor import SOURCES, token_file

    from rolora_plugin.app.assets import load_smollm2

    _, tok = load_smollm2()
    proto = dict(n_eval=N_EVAL, seq=SEQ, n_calib=calib_chunks, sources=list(SOURCES), calib_source="boolq")
    return token_file(tok, proto, [0])


def _med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _ppl(rs: list[dict]) -> str:
    return " / ".join(f"{statistics.median(r['ppl'][s] for r in rs):.2f}" for s in ("boolq", "sciq"))


def table(sides: list, runs: dict, rotation: str, calib_chunks: int) -> str:
    rot = "learned R1+R2 (+R4)" if rotation == "learned" else "Hadamard R1+R4"
    lines = ["| side | recipe | total s (median) | runs s | rotation s | GPTQ weights s | act. clip search s | ppl BoolQ / SciQ | model digest |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, root in sides:
        rs = runs[name]
        each = ", ".join(f"{r['total_s']:.0f}" for r in rs)
        if name == "peer":
            lines.append(f"| peer: llm-compressor {rs[0]['versions'].get('llmcompressor', '0.14')} | SpinQuant R1+R2+R4 "
                         f"(random Hadamard) + GPTQModifier | **{_med(rs, 'total_s'):.1f}** | {each} | – | – | – | {_ppl(rs)} | – |")  # fmt: skip
            continue
        lines.append(f"| ours: {name} ({root}) | {rot} + preset w4a4 | **{_med(rs, 'total_s'):.1f}** | {each} | "
                     f"{_med(rs, 'rotation_s'):.1f} | {_med(rs, 'gptq_s'):.1f} | {_med(rs, 'clip_search_s'):.1f} | "
                     f"{_ppl(rs)} | {', '.join(sorted({r['digest'] for r in rs}))} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, default=None, help="an older checkout of ours to time side by side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calib-chunks", type=int, default=4, help="calibration sequences of 256 tokens, both sides (default 4)")
    p.add_argument("--rotation", choices=("learned", "hadamard"), default="learned",
                   help="ours: learned R1+R2 (RotationConfig.preset('w4a4'), default) or Hadamard R1+R4")  # fmt: skip
    p.add_argument("--no-peer", action="store_true", help="do not run llm-compressor beside ours")
    p.add_argument("--child", metavar="TOKENS", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-append", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.rotation)))
        return
    if args.baseline is not None and not (args.baseline / "rolora_plugin" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {args.baseline} holds no rolora_plugin package; give the root of a checkout")
    tokens = token_path(args.calib_chunks)
    sides = ([("baseline", args.baseline)] if args.baseline else []) + [("current", HERE.parent.parent)]
    sides += [] if args.no_peer else [("peer", None)]
    runs: dict = {name: [] for name, _ in sides}
    load = [os.getloadavg()]
    for r in range(args.repeats):
        for name, root in sides:
            runs[name].append(_peer(tokens) if name == "peer" else _child(root, tokens, args.rotation))
            print(f"repeat {r + 1}/{args.repeats} {name}: {runs[name][-1]['total_s']:.1f} s", file=sys.stderr)
    load.append(os.getloadavg())
    body = table(sides, runs, args.rotation, args.calib_chunks)
    med = {name: _med(runs[name], "total_s") for name, _ in sides}
    if args.baseline:
        body += f"\n\nspeed-up (median baseline / median current): {med['baseline'] / med['current']:.2f}×"
    if not args.no_peer:
        body += (f"\n\nours / peer (medians): {med['current'] / med['peer']:.2f}× the peer's time (ours includes learning "
                 "R1 and R2; the peer's rotation is a fixed random Hadamard)") if args.rotation == "learned" else \
                f"\n\nours / peer (medians): {med['current'] / med['peer']:.2f}× the peer's time"  # fmt: skip
    body += (f"\n\nSame recipe size on both sides: {args.calib_chunks}×{SEQ} calibration tokens (the same ids, one sequence "
             f"per batch), eval {N_EVAL}×{SEQ} tokens per text; {args.repeats} repeat(s), interleaved; {threads()} torch "
             f"threads each side; wall time = rotation + quantization (not load, not eval). Load average (1/5/15 min) "
             f"before {'/'.join(f'{x:.2f}' for x in load[0])}, after {'/'.join(f'{x:.2f}' for x in load[1])}. "
             f"machine: {machine()}")  # fmt: skip
    print(body)
    if not args.no_append:
        append_results("W4A4 preset quantization time, ours beside llm-compressor (benchmarks/quant_speed.py)", body)


if __name__ == "__main__":
    main()
