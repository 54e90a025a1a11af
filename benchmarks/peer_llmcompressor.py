"""W4A4 side by side: rolora-plugin vs llm-compressor 0.14 (the maintained peer) on the same model, tokens, calibration.

One command, on a fresh machine too (the peer's virtual environment is built on first use, ~5 min)::

    python benchmarks/peer_llmcompressor.py                  # 2 calibration draws, BoolQ + SciQ, appends to RESULTS.md
    python benchmarks/peer_llmcompressor.py --draws 0 --no-append   # one draw, print only
    python benchmarks/peer_llmcompressor.py --cached-only           # the table from what has been run so far
    python benchmarks/peer_llmcompressor.py --ours fp --peer fp --formats int,nvfp4,mxfp4   # servable formats only

What runs (SmolLM2-135M-Instruct from ``rolora_plugin.app.assets.smollm2_dir``, the same HF folder for both):

* **ours** (this venv): FP; W4A4 RTN unrotated; R1+R2+R4 + RTN; R1+R2+R4 + ``QuantConfig.preset("w4a4")`` (the best
  recipe we know); the same + R3 and a 4-bit KV cache.
* **peer** (its own venv: llm-compressor 0.14.0.1 pins compressed-tensors 0.19 and transformers ≤ 5.17): FP;
  ``QuantizationModifier`` (RTN) unrotated and after ``SpinQuantModifier(R1, R2, R4, random-hadamard)``; and its best
  W4A4 recipe, ``SpinQuantModifier`` + ``GPTQModifier`` (its defaults: act-order, one pass per layer). Scheme:
  int4 symmetric weights per output channel, int4 symmetric dynamic per-token activations, every Linear but
  ``lm_head``.

**Servable formats** (issue 30; ``--formats int,nvfp4,mxfp4``, ``--formats none`` skips them), per format:

* **ours**: Hadamard R1+R2+R4 (``RotationConfig(seed=0, r2=True)``) + ``QuantConfig.preset("w4a4-int" | "nvfp4" |
  "mxfp4")`` (GPTQ); and learned R1+R2 under that format's quantizer, ``RotationConfig.preset("w4a4",
  learn_quant=<preset>)`` (R4 Hadamard; learned on the quantizer's calibration chunks; ``--no-learned`` skips it).
* **peer**: ``GPTQModifier(scheme="NVFP4" | "MXFP4", targets="Linear", ignore=["lm_head"])`` (compressed-tensors'
  preset schemes; int: the W4A4 rows' scheme above, int4 weights per channel, because the preset "W4A4" quantizes
  weights in groups of 128 and llm-compressor refuses SmolLM2's 576-column linears with it; the SpinQuant int row is
  the "best" row's run, the same cache entry) after either ``SpinQuantModifier(rotations=["R1", "R2", "R4"],
  transform_type="random-hadamard")`` or ``QuIPModifier(rotations=["v"], transform_type="random-hadamard",
  transform_block_size=<the format's group: 16 NVFP4, 32 MXFP4; None = each linear's full input width for int>)``.
  Both transforms run on draw 0; the better one (lower mean of the per-text ratios to FP) is the peer's best for that
  format and alone runs the other draws (when draw 0 is not among ``--draws``, both run on every draw).

Both sides read the **same token ids** from one file written here (``torch.save``): evaluation chunks of BoolQ
passages and of SciQ ``support`` paragraphs (``text_chunks``), and calibration chunks of BoolQ passages taken from
the end of the stream (draw ``k`` ends ``k · n_calib · seq`` tokens before the end, so draws are disjoint and never
overlap the evaluation text). Perplexity is ``rolora_plugin.metrics.perplexity`` on both sides (the repo is put on
the peer's ``sys.path``). Wall time is the quantization (rotation + calibration + weights), not the evaluation, with
the same ``torch`` thread count on both sides.

Every run's result is cached as JSON under ``benchmarks/results/peer_llmcompressor/`` keyed by its settings (side,
recipe and its config, draw, token protocol; committed, so a later session on another machine continues from it),
so an interrupted or repeated invocation only runs what is missing.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

PEER_SPEC = ["llmcompressor==0.14.0.1", "torch==2.13.0"]
PEER_EXTRA = ["pluggy"]  # what `import rolora_plugin.metrics` needs beyond the peer's own dependencies
SOURCES = ("boolq", "sciq")
OURS = ("fp", "rtn", "rot-rtn", "best", "best-kv4")  # "best-kv4" comes out of the "best" run
PEER = ("fp", "rtn", "rot-rtn", "best")
LABELS = {
    "fp": "FP32",
    "rtn": "W4A4 RTN, unrotated",
    "rot-rtn": "W4A4 RTN, rotated R1+R2+R4",
    "best": "W4A4 best (ours: R1-R4 + preset w4a4; peer: SpinQuant R1+R2+R4 + GPTQ)",
    "best-kv4": "W4A4KV4 (ours: the same + KV4)",
}
# servable formats (issue 30): our QuantConfig preset, the compressed-tensors preset scheme the peer quantizes with
# (int: None = the scheme of the W4A4 rows above, int4 sym weights per channel + int4 sym dynamic per-token activations,
# which is the preset "W4A4" with per-channel weights: the preset's weight groups of 128 do not divide SmolLM2's 576
# columns and llm-compressor refuses it), QuIP's block size (None: each linear's full input width), the goal
# (perplexity ratio to FP, per text)
FORMATS = {
    "int": dict(preset="w4a4-int", scheme=None, block=None, goal=2.0, label="int W4A4 (sym dynamic per-token acts)"),
    "nvfp4": dict(preset="nvfp4", scheme="NVFP4", block=16, goal=1.25, label="NVFP4"),
    "mxfp4": dict(preset="mxfp4", scheme="MXFP4", block=32, goal=1.4, label="MXFP4"),
}
OURS_FMT = ("had", "learn")
PEER_FMT = ("spin", "quip")
FMT_LABELS = {
    "had": "ours: Hadamard R1+R2+R4 + GPTQ preset",
    "learn": "ours: learned R1+R2 (+R4) + GPTQ preset",
    "spin": "peer: SpinQuant R1+R2+R4 + GPTQ scheme",
    "quip": "peer: QuIP v + GPTQ scheme",
}
logger = logging.getLogger("peer_llmcompressor")


def format_recipe(recipe: str) -> tuple[str, str] | None:
    """``("nvfp4", "had")`` for a servable-format row such as ``"nvfp4-had"``; None for the W4A4 rows above."""
    fmt, _, how = recipe.partition("-")
    return (fmt, how) if fmt in FORMATS and how in OURS_FMT + PEER_FMT else None


# ---------------------------------------------------------------------------------------------- cache and venv


def cache_dir() -> Path:
    from rolora_plugin.app.assets import cache_root

    d = cache_root() / "peer-bench"  # token files and the peer's work folder; the results go to the repository
    d.mkdir(parents=True, exist_ok=True)
    return d


def _digest(obj) -> str:
    from _common import digest

    return digest(obj)


def peer_venv() -> Path:
    """The peer's venv (``$ROLORA_CACHE/llmcompressor-venv``), built once under a file lock; complete only with its marker."""
    from rolora_plugin.app.assets import cache_root

    venv = cache_root() / "llmcompressor-venv"
    marker, spec = venv / ".rolora-complete", " ".join(PEER_SPEC + PEER_EXTRA)
    with open(cache_root() / "llmcompressor-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.is_file() and marker.read_text().strip() == spec):
            logger.warning("building the peer venv %s (%s); ~5 min, once", venv, spec)
            subprocess.run(["rm", "-rf", str(venv)], check=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "--quiet", "install"]
            subprocess.run(pip + [PEER_SPEC[-1]], check=True)  # the local CPU torch wheel first
            subprocess.run(pip + PEER_SPEC + PEER_EXTRA, check=True)
            marker.write_text(spec)
    return venv


def cached_run(key: dict, fn, cached_only: bool = False) -> dict | None:
    """``fn()`` once per ``key`` (JSON under ``benchmarks/results/peer_llmcompressor/``, committed); the cached result
    otherwise (None if missing and ``cached_only``)."""
    from _common import cached_json, results_dir

    return cached_json(results_dir("peer_llmcompressor"), key, fn, cached_only)


# ---------------------------------------------------------------------------------------------- tokens


def protocol(args) -> dict:
    return dict(n_eval=args.n_eval, seq=args.seq_len, n_calib=args.n_calib, sources=list(SOURCES), calib_source="boolq")


def calibration_draw(stream, n: int, seq: int, draw: int):
    """(n, seq) chunks ending ``draw · n · seq`` tokens before the end of ``stream`` (draws are disjoint)."""
    end = stream.numel() - draw * n * seq
    return stream[end - n * seq : end].reshape(n, seq).clone()


def token_file(tok, proto: dict, draws) -> Path:
    """One ``torch.save`` file with the eval chunks per source and the calibration chunks per draw."""
    import torch

    from rolora_plugin.app.assets import text_chunks, token_stream

    path = cache_dir() / f"tokens-{_digest([proto, sorted(draws)])}.pt"
    if not path.is_file():
        stream = token_stream(tok, proto["calib_source"])
        data = {
            "eval": {s: text_chunks(tok, proto["n_eval"], proto["seq"], source=s) for s in proto["sources"]},
            "calib": {str(d): calibration_draw(stream, proto["n_calib"], proto["seq"], d) for d in draws},
        }
        torch.save(data, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return path


# ---------------------------------------------------------------------------------------------- ours


def our_configs(recipe: str):
    """(RotationConfig or None, QuantConfig or None) of one of our rows.

    "best" and "best-kv4" are one run: R1+R2+R3+R4 and the W4A4 preset, evaluated, then the same model with a
    4-bit KV cache (``QuantConfig.preset("w4a4kv4")``'s KV quantizers). R3 rotates queries and keys after RoPE on
    both sides of ``q·k``: exact in full precision and a no-op while the KV cache is not quantized.
    """
    from rolora_plugin import RotationConfig
    from rolora_plugin.quant import QuantConfig

    r124 = RotationConfig(seed=0, r2=True)
    best_rot = RotationConfig(seed=0, r2=True, r3=True)
    if format_recipe(recipe):  # servable format rows, e.g. "nvfp4-had", "int-learn"
        fmt, how = format_recipe(recipe)
        preset = FORMATS[fmt]["preset"]
        rot = {"had": r124, "learn": RotationConfig.preset("w4a4", learn_quant=preset)}[how]
        return rot, QuantConfig.preset(preset)
    return {
        "fp": (None, None),
        "rtn": (None, QuantConfig(w_bits=4, a_bits=4)),
        "rot-rtn": (r124, QuantConfig(w_bits=4, a_bits=4)),
        "best": (best_rot, QuantConfig.preset("w4a4")),
        "best-kv4": (best_rot, QuantConfig.preset("w4a4kv4")),
    }[recipe]


def _with_kv(model, kv_config):
    """The same quantized model with the KV quantizers of ``kv_config`` installed (weights untouched)."""
    import dataclasses

    from rolora_plugin.quant import QUANT_RECORD_KEY, get_quantization_record, install_activation_quantizers

    record = get_quantization_record(model)
    record.config = dataclasses.replace(record.config, kv_bits=kv_config.kv_bits, kv_sym=kv_config.kv_sym)
    install_activation_quantizers(model, record)
    setattr(model.config, QUANT_RECORD_KEY, record.to_dict())
    return model


def run_ours(recipe: str, tokens: dict, draw: int) -> dict:
    """ppl per source and wall time of one of our rows; "best" also returns its KV4 variant under "kv4"."""
    from rolora_plugin import rotate_model_
    from rolora_plugin.app.assets import load_smollm2
    from rolora_plugin.metrics import perplexity
    from rolora_plugin.quant import quantize_model_

    rot, quant = our_configs(recipe)
    model, _ = load_smollm2()
    t0 = time.perf_counter()
    calib = list(tokens["calib"][str(draw)].split(4))
    if rot is not None:
        rotate_model_(model, rot, calibration=calib if rot.learn else None, progress=False)
    if quant is not None:
        quantize_model_(model, quant, calibration=calib, progress=False)
    wall = time.perf_counter() - t0
    out = {"ppl": {s: perplexity(model, c, progress=False) for s, c in tokens["eval"].items()}, "wall_s": wall}
    if recipe == "best":
        _with_kv(model, our_configs("best-kv4")[1])
        out["kv4"] = {"ppl": {s: perplexity(model, c, progress=False) for s, c in tokens["eval"].items()}, "wall_s": wall}
    return out


def _changed(config) -> dict | None:
    """The fields of a config that differ from its defaults: a new field with a default never invalidates the cache."""
    if config is None:
        return None
    default = type(config)().to_dict()
    return {k: v for k, v in config.to_dict().items() if default.get(k, object()) != v}


def our_key(recipe: str, proto: dict, draw: int, threads: int) -> dict:
    rot, quant = our_configs(recipe)
    return dict(side="ours", recipe=recipe, rotation=_changed(rot), quant=_changed(quant),
                draw=draw if quant is not None else None, proto=proto, threads=threads)  # fmt: skip


# ---------------------------------------------------------------------------------------------- peer (runs in its venv)


def peer_recipe(recipe: str):
    """The llm-compressor modifiers of a peer row (None for FP). Imported only inside the peer's venv."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="token", dynamic=True),
    )
    spin = SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard")
    rtn = QuantizationModifier(config_groups={"g0": scheme}, ignore=["lm_head"])
    gptq = GPTQModifier(config_groups={"g0": scheme}, ignore=["lm_head"])
    if format_recipe(recipe):  # servable format rows: "<format>-spin" / "<format>-quip"
        from llmcompressor.modifiers.transform import QuIPModifier

        fmt, how = format_recipe(recipe)
        f = FORMATS[fmt]
        transform = spin if how == "spin" else QuIPModifier(rotations=["v"], transform_type="random-hadamard",
                                                            transform_block_size=f["block"], ignore=["lm_head"])  # fmt: skip
        if f["scheme"] is None:  # int: the W4A4 rows' scheme (the preset "W4A4" has weight groups of 128: refused on 576 columns)
            return [transform, gptq]
        return [transform, GPTQModifier(scheme=f["scheme"], targets="Linear", ignore=["lm_head"])]
    return {"fp": None, "rtn": [rtn], "rot-rtn": [spin, rtn], "best": [spin, gptq]}[recipe]


def peer_worker(spec_path: str, out_path: str) -> None:
    """Inside the peer venv: load the HF folder, ``oneshot`` the recipe on the given tokens, write ppl + wall time."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from rolora_plugin.metrics import perplexity

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    tokens = torch.load(spec["tokens"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa").eval()
    recipe = peer_recipe(spec["recipe"])
    t0 = time.perf_counter()
    if recipe is not None:
        from llmcompressor import oneshot

        calib = tokens["calib"][str(spec["draw"])]
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib]
        oneshot(model=model, recipe=recipe, dataset=DataLoader(rows, batch_size=1), num_calibration_samples=len(rows),
                max_seq_length=calib.shape[1])  # fmt: skip
    wall = time.perf_counter() - t0
    ppl = {s: perplexity(model, c, progress=False) for s, c in tokens["eval"].items()}
    import compressed_tensors
    import llmcompressor
    import transformers

    versions = {m.__name__: m.__version__ for m in (llmcompressor, compressed_tensors, transformers, torch)}
    Path(out_path).write_text(json.dumps({"ppl": ppl, "wall_s": wall, "versions": versions}))


def run_peer(recipe: str, token_path: Path, draw: int, threads: int) -> dict:
    from rolora_plugin.app.assets import smollm2_dir

    venv = peer_venv()
    work = cache_dir() / "work"
    work.mkdir(exist_ok=True)
    spec = dict(recipe=recipe, tokens=str(token_path), draw=draw, threads=threads, model_dir=str(smollm2_dir()))
    spec_path, out_path = work / f"{_digest(spec)}.spec.json", work / f"{_digest(spec)}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    log = work / f"{_digest(spec)}.log"
    with open(log, "w") as fh:
        proc = subprocess.run([str(venv / "bin" / "python"), __file__, "--worker", str(spec_path), str(out_path)],
                              env=env, stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"peer run {recipe} (draw {draw}) failed with exit {proc.returncode}; see {log}")
    return json.loads(out_path.read_text())


def peer_key(recipe: str, proto: dict, draw: int, threads: int) -> dict:
    if format_recipe(recipe):  # servable format rows (a new key shape; the rows above keep theirs)
        fmt, how = format_recipe(recipe)
        f = FORMATS[fmt]
        if f["scheme"] is None and how == "spin":  # the same modifiers as the "best" row: the same run, its cache entry
            return peer_key("best", proto, draw, threads)
        transform = (dict(modifier="SpinQuantModifier", rotations=["R1", "R2", "R4"], type="random-hadamard") if how == "spin"
                     else dict(modifier="QuIPModifier", rotations=["v"], type="random-hadamard", block=f["block"]))  # fmt: skip
        scheme = f"preset {f['scheme']}, targets Linear, lm_head FP" if f["scheme"] else peer_key("best", proto, draw, threads)["scheme"]
        return dict(side="peer", recipe=recipe, spec=PEER_SPEC, scheme=scheme,
                    transform=transform, method="GPTQModifier defaults", draw=draw, proto=proto, threads=threads)  # fmt: skip
    return dict(side="peer", recipe=recipe, spec=PEER_SPEC, scheme="w4a4 int sym, channel / token dynamic, lm_head FP",
                draw=draw if recipe != "fp" else None, proto=proto, threads=threads)  # fmt: skip


# ---------------------------------------------------------------------------------------------- table


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def table(results: dict, draws) -> str:
    """Markdown: one row per (recipe); per side and source ppl ratio to that side's FP (mean [min–max] over draws)."""
    head = "| recipe | " + " | ".join(f"{side} {s} ×FP" for side in ("ours", "peer") for s in SOURCES) + " | ours wall s | peer wall s |"
    lines = [head, "|---" * (3 + 2 * len(SOURCES)) + "|"]
    for recipe in OURS:
        cells = []
        for side in ("ours", "peer"):
            fp = results.get((side, "fp", None))
            runs = [results.get((side, recipe, d)) for d in ([None] if recipe == "fp" else draws)]
            runs = [r for r in runs if r is not None]
            for s in SOURCES:
                if not runs or fp is None:
                    cells.append("-")
                elif recipe == "fp":
                    cells.append(f"{fp['ppl'][s]:.2f} ppl")
                else:
                    cells.append(_stats([r["ppl"][s] / fp["ppl"][s] for r in runs]))
        walls = []
        for side in ("ours", "peer"):
            runs = [results.get((side, recipe, d)) for d in ([None] if recipe == "fp" else draws)]
            walls.append(_stats([r["wall_s"] for r in runs if r]) if any(runs) else "-")
        lines.append(f"| {LABELS[recipe]} | " + " | ".join(cells + walls) + " |")
    return "\n".join(lines)


def _ratios(results: dict, side: str, recipe: str, draws) -> list[dict]:
    """Per draw run of ``recipe``: ``{source: ppl / FP ppl}`` (runs or FP missing: left out)."""
    fp = results.get((side, "fp", None))
    runs = [results.get((side, recipe, d)) for d in draws]
    return [] if fp is None else [{s: r["ppl"][s] / fp["ppl"][s] for s in SOURCES} for r in runs if r is not None]


def peer_choice(results: dict, fmt: str) -> str | None:
    """The peer's better transform for ``fmt`` on draw 0 (lower mean of the per-text ratios); None until both ran."""
    scores = {}
    for how in PEER_FMT:
        r = _ratios(results, "peer", f"{fmt}-{how}", [0])
        if not r:
            return None
        scores[how] = statistics.mean(r[0].values())
    return min(scores, key=scores.get)


def format_table(results: dict, draws, formats) -> str:
    """Markdown: per servable format our two recipes and the peer's two; ppl / that side's FP per text, mean
    [min–max] over the draws run; the goal and whether it is met (every text ≤ goal and below the peer's best)."""
    head = "| format | recipe | draws | BoolQ ×FP | SciQ ×FP | wall s | goal ×FP | goal met |"
    lines = [head, "|---" * 8 + "|"]
    for side in ("ours", "peer"):
        fp = results.get((side, "fp", None))
        if fp:
            lines.append(f"| FP32 | {side} | – | {fp['ppl']['boolq']:.2f} ppl | {fp['ppl']['sciq']:.2f} ppl | – | – | – |")
    for fmt in formats:
        f = FORMATS[fmt]
        best = peer_choice(results, fmt)
        peer_best = {s: statistics.mean(x[s] for x in _ratios(results, "peer", f"{fmt}-{best}", draws)) for s in SOURCES} if best else None
        for side, hows in (("ours", OURS_FMT), ("peer", PEER_FMT)):
            for how in hows:
                recipe = f"{fmt}-{how}"
                ratios = _ratios(results, side, recipe, draws)
                walls = [results[(side, recipe, d)]["wall_s"] for d in draws if (side, recipe, d) in results]
                run = [str(d) for d in draws if (side, recipe, d) in results]
                cells = [_stats([x[s] for x in ratios]) if ratios else "-" for s in SOURCES]
                label = FMT_LABELS[how] + (" (**peer's best**, picked on draw 0)" if side == "peer" and how == best else "")
                if side == "ours" and ratios:
                    means = {s: statistics.mean(x[s] for x in ratios) for s in SOURCES}
                    under = all(means[s] <= f["goal"] for s in SOURCES)
                    ahead = None if peer_best is None else all(means[s] < peer_best[s] for s in SOURCES)
                    met = ("met" if under and ahead else "**not met**") + (
                        f" (≤ goal: {'yes' if under else 'no'}; ahead of peer's best: "
                        f"{'?' if ahead is None else 'yes' if ahead else 'no'}; draws {len(ratios)}/{len(draws)})")
                else:
                    met = "–"
                goal = f"≤ {f['goal']}" if side == "ours" else "–"
                wall = (f"{statistics.mean(walls):.0f}" + (f" [{min(walls):.0f}–{max(walls):.0f}]" if len(walls) > 1 else "")) if walls else "-"
                lines.append(f"| {f['label']} | {label} | {','.join(run) or '-'} | " + " | ".join(cells) + f" | {wall} | {goal} | {met} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, nargs="+", default=[0, 1], help="calibration draws (disjoint BoolQ slices)")
    p.add_argument("--n-eval", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (1 on a loaded 2-core box)")
    p.add_argument("--sides", nargs="+", default=["ours", "peer"], choices=["ours", "peer"])
    p.add_argument("--ours", nargs="+", default=list(OURS), choices=OURS)
    p.add_argument("--peer", nargs="+", default=list(PEER), choices=PEER)
    p.add_argument("--formats", default="int,nvfp4,mxfp4",
                   help="servable formats side by side, comma separated from int,nvfp4,mxfp4 ('none': skip them)")  # fmt: skip
    p.add_argument("--no-learned", action="store_true", help="skip our learned-rotation rows of the servable formats")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--cached-only", action="store_true", help="table from the cached runs only; run nothing")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.formats = [] if args.formats.strip().lower() in ("", "none") else [f.strip() for f in args.formats.split(",")]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad:
        p.error(f"--formats: unknown {bad}; choose from {list(FORMATS)} or 'none'")
    return args


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.worker:
        return peer_worker(*args.worker)
    import torch

    from rolora_plugin.app.assets import load_smollm2

    torch.set_num_threads(args.threads)
    proto = protocol(args)
    _, tok = load_smollm2()
    path = token_file(tok, proto, args.draws)
    tokens = torch.load(path)
    results, t0 = {}, time.time()
    jobs = [("ours", r) for r in args.ours if "ours" in args.sides] + [("peer", r) for r in args.peer if "peer" in args.sides]
    for side, recipe in jobs:
        for draw in [None] if recipe == "fp" else args.draws:
            d = 0 if draw is None else draw
            only = args.cached_only
            if (side, recipe) == ("ours", "best-kv4"):
                res = cached_run(our_key("best", proto, d, args.threads), lambda: run_ours("best", tokens, d), only)
                res = res and res["kv4"]
            elif side == "ours":
                res = cached_run(our_key(recipe, proto, d, args.threads), lambda: run_ours(recipe, tokens, d), only)
            else:
                res = cached_run(peer_key(recipe, proto, d, args.threads), lambda: run_peer(recipe, path, d, args.threads), only)
            if res is None:
                print(f"{side:4s} {recipe:8s} draw {draw}: not cached yet (skipped)", flush=True)
                continue
            results[(side, recipe, draw)] = res
            print(f"{side:4s} {recipe:8s} draw {draw}: ppl {res['ppl']} wall {res['wall_s']:.0f}s", flush=True)
    run_formats(args, proto, tokens, path, results)
    body = describe(args, results, time.time() - t0)
    print(body)
    if not args.no_append:
        from _common import append_results

        append_results("W4A4 side by side: ours vs llm-compressor 0.14 (benchmarks/peer_llmcompressor.py)", body)


def run_formats(args, proto: dict, tokens: dict, path: Path, results: dict) -> None:
    """The servable-format rows, draw by draw (draw 0 first: it picks the peer's transform for the later draws)."""
    if not args.formats:
        return
    only = args.cached_only

    def one(side, recipe, d):
        try:  # a failed run is reported and left uncached; the others go on
            if side == "ours":
                res = cached_run(our_key(recipe, proto, d, args.threads), lambda: run_ours(recipe, tokens, d), only)
            else:
                res = cached_run(peer_key(recipe, proto, d, args.threads), lambda: run_peer(recipe, path, d, args.threads), only)
        except Exception as exc:  # noqa: BLE001
            logger.exception("%s %s draw %s failed", side, recipe, d)
            print(f"{side:4s} {recipe:12s} draw {d}: FAILED ({type(exc).__name__}: {exc})", flush=True)
            return
        if res is None:
            print(f"{side:4s} {recipe:12s} draw {d}: not cached yet (skipped)", flush=True)
            return
        results[(side, recipe, d)] = res
        print(f"{side:4s} {recipe:12s} draw {d}: ppl {res['ppl']} wall {res['wall_s']:.0f}s", flush=True)

    for side in ("ours", "peer"):  # the ratios need each side's FP
        if side in args.sides and (side, "fp", None) not in results:
            res = cached_run((our_key if side == "ours" else peer_key)("fp", proto, 0, args.threads),
                             lambda: run_ours("fp", tokens, 0) if side == "ours" else run_peer("fp", path, 0, args.threads), only)  # fmt: skip
            if res is not None:
                results[(side, "fp", None)] = res
    for d in args.draws:  # per draw: Hadamard and peer rows of every format first, then the (slower) learned ones
        for fmt in args.formats:
            if "ours" in args.sides:
                one("ours", f"{fmt}-had", d)
            if "peer" in args.sides:
                choice = peer_choice(results, fmt) if 0 in args.draws else None
                for how in PEER_FMT if (d == 0 or choice is None) else [choice]:
                    one("peer", f"{fmt}-{how}", d)
        for fmt in args.formats if "ours" in args.sides and not args.no_learned else []:
            one("ours", f"{fmt}-learn", d)


def describe(args, results: dict, total: float) -> str:
    versions = next((r.get("versions") for (side, _, _), r in results.items() if side == "peer" and r.get("versions")), None)
    load = os.getloadavg()[0]
    return (
        f"SmolLM2-135M-Instruct (dequantized Q4_1 GGUF), the same token ids on both sides: eval {args.n_eval}×{args.seq_len} "
        f"tokens of BoolQ passages and of SciQ support paragraphs; calibration {args.n_calib}×{args.seq_len} BoolQ tokens, "
        f"draws {args.draws} (disjoint slices from the end of the stream). Cells: perplexity / that side's FP, mean "
        f"[min–max] over the draws. Wall: rotation + calibration + quantization, torch threads {args.threads} both sides. "
        f"Peer: {versions or PEER_SPEC}. Load average at the end {load:.1f} (2 shared cores). This invocation {total:.0f} s "
        f"(cached runs cost nothing).\n\n" + table(results, args.draws)
        + ("\n\nServable formats (issue 30): cells ppl / that side's FP per text, mean [min–max] over the draws run; "
           "goal met = both texts' means ≤ goal and below the peer's best for that format.\n\n"
           + format_table(results, args.draws, args.formats) if args.formats else "")
    )


if __name__ == "__main__":
    main()
