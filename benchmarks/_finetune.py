"""Helpers of benchmarks/finetune_table.py: one cached fine-tune run (train → merge → FP / W4A4 evaluations).

A run is fixed by a :class:`RunSettings`. Its numbers are small JSON files kept *in the repository*, under
``benchmarks/results/finetune_table/`` (committed: the table is built over several sessions, and a machine's user
cache does not outlive its session); its merged model is large and goes to the user cache,
``$ROLORA_CACHE/bench/finetune_table/models``. ``$FT_TABLE_CACHE`` (tests) puts both under one folder.

* ``<key>.train.json`` — training log: loss per step, curves (held-out task loss FP and fake-quant W4A4,
  BoolQ-passage perplexity FP, every ``eval_every`` steps), wall seconds;
* ``models/<key>/`` — the merged model (``merge_and_export`` for RoLoRA, ``merge_and_unload`` for LoRA), kept
  only until every evaluation of the run is cached;
* ``<key>.<setting>.json`` — one evaluation (``fp``, ``rtn`` = W4A4 RTN, ``gptq`` = ``QuantConfig.preset
  ("w4a4")``; issue 30, on request: ``nvfp4-rtn`` / ``mxfp4-rtn`` = ``QuantConfig.preset(fmt)`` at RTN without
  clip search, ``nvfp4-gptq`` / ``mxfp4-gptq`` = ``QuantConfig.preset(fmt)``; NVFP4's activation global scales
  calibrated on the GPTQ calibration chunks): held-out task loss, BoolQ-passage perplexity, the 7-task average
  (+ per-task scores, stderr).

Each JSON is written atomically (:mod:`rolora_plugin.io.publish`) as soon as its stage ends, so an interrupted
invocation loses at most the stage it was in and a re-run continues from the cache.

Methods: ``lora`` (peft LoRA), ``rolora`` (+ ``RoLoRACallback``: R1+R4 before the optimizer exists, merge in the
rotated basis), ``lora-qat`` / ``rolora-qat`` (the same with W4A4 fake-quant weights ``W + sBA`` and per-token
activations of every decoder linear in the forward from step 0, straight-through gradients; QATConfig defaults),
``rolora-qat-nvfp4`` / ``rolora-qat-mxfp4`` (issue 30: RoLoRA + QAT in the FP4 format, ``QATConfig(preset=fmt)``;
not in the default table, evaluated by default at FP and the format's RTN / GPTQ), and the control ``lora-posthoc``: the ``lora`` run itself (same training, same cached model), rotated R1+R4 with
the run's seed *after* merge, then evaluated — the same function as LoRA in FP, rotated like RoLoRA at W4A4, so
it separates what training in the rotated basis does from what the rotation does. Reference rows, only on
request (``--only base,base-posthoc``): ``base`` is the pretrained model, not fine-tuned, and ``base-posthoc`` the
same rotated R1+R4 with the seed — what the W4A4 recipe itself keeps of a model, the ceiling a fine-tune's
recovery is read against.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rolora_plugin import RotationConfig
from rolora_plugin.app.train import OPTIMIZERS, FinetuneSettings, cosine_warmup
from rolora_plugin.io.publish import atomic_output_dir, atomic_write_text

__all__ = [
    "ALL_SETTINGS",
    "EVAL_SETTINGS",
    "FP4_METHODS",
    "FP4_SETTINGS",
    "default_settings",
    "eval_quant",
    "DEFAULT_METHODS",
    "METHODS",
    "NOT_TRAINED",
    "TARGETS",
    "RunSettings",
    "cache_dir",
    "chance_level",
    "docs_for_stderr",
    "load_cached",
    "run_one",
]

logger = logging.getLogger("finetune_table")
# method -> (trained through RoLoRACallback in the rotated basis, QAT: False, True = int W4A4 (QATConfig defaults)
# or the FP4 preset it trains in); POSTHOC: method -> the run it reuses
METHODS = {"lora": (False, False), "rolora": (True, False), "lora-qat": (False, True), "rolora-qat": (True, True),
           "lora-posthoc": (False, False), "base": (False, False), "base-posthoc": (False, False),
           "rolora-qat-nvfp4": (True, "nvfp4"), "rolora-qat-mxfp4": (True, "mxfp4")}  # fmt: skip
POSTHOC = {"lora-posthoc": "lora", "base-posthoc": "base"}
# the reference rows: the pretrained model itself, not fine-tuned (what the W4A4 recipe keeps of a model that no
# fine-tune has touched; not in the default table)
NOT_TRAINED = ("base", "base-posthoc")
FP4_METHODS = tuple(m for m, (_, qat) in METHODS.items() if isinstance(qat, str))  # issue 30, on request
DEFAULT_METHODS = tuple(m for m in METHODS if m not in NOT_TRAINED + FP4_METHODS)
TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
EVAL_SETTINGS = ("fp", "rtn", "gptq")  # the default evaluations (int W4A4)
FP4_FORMATS = ("nvfp4", "mxfp4")
FP4_SETTINGS = tuple(f"{fmt}-{m}" for fmt in FP4_FORMATS for m in ("rtn", "gptq"))  # on request (--evals, --fp4)
ALL_SETTINGS = EVAL_SETTINGS + FP4_SETTINGS
CALIBRATED = ("gptq", "nvfp4-rtn", "nvfp4-gptq", "mxfp4-gptq")  # evaluations that read the calibration chunks
LR_SCALES = ("none", "norm-rms")
LORA_COORDS = ("rotated", "unfolded")  # how RoLoRA's A is parametrised (the FP-gap experiment, see _UnfoldGain)
CACHE_VERSION = 1


@dataclass(frozen=True)
class RunSettings:
    """Everything that determines one run's numbers (its cache key). ``seed``: LoRA init, data order, rotation."""

    method: str
    targets: str
    seed: int
    steps: int = 200
    lr: float = 5e-4
    batch_size: int = 4
    max_len: int = 96
    rank: int = 16
    alpha: int = 16
    n_heldout: int = 64
    eval_every: int = 25
    ppl_chunks: int = 8
    ppl_seq_len: int = 256
    calib_chunks: int = 8
    calib_seq_len: int = 256
    task_limit: int = 160
    curve_ppl_chunks: int = 4
    curve_heldout_batches: int = 4
    lr_scale: str = "none"
    optimizer: str = "adamw"
    lora_coords: str = "rotated"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {sorted(METHODS)}")
        if self.targets not in TARGETS:
            raise ValueError(f"unknown target set {self.targets!r}; choose from {sorted(TARGETS)}")
        if self.lr_scale not in LR_SCALES or (self.lr_scale != "none" and not METHODS[self.method][0]):
            raise ValueError(f"lr_scale must be one of {LR_SCALES} ('norm-rms' only for the rotating methods), got {self.lr_scale!r}")
        if self.lora_coords not in LORA_COORDS or (self.lora_coords != "rotated" and not METHODS[self.method][0]):
            raise ValueError(f"lora_coords must be one of {LORA_COORDS} ('unfolded' only for the rotating methods), got {self.lora_coords!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {sorted(OPTIMIZERS)}")
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError(f"steps and eval_every must be >= 1, got {self.steps} and {self.eval_every}")

    def train_key(self) -> str:
        """Hash of the fields that determine training (evaluation sizes excluded; ``lr_scale`` only when set, so
        the keys of runs made before it existed stay valid)."""
        if self.method in POSTHOC:  # the very run it rotates afterwards: one training, one model
            return dataclasses.replace(self, method=POSTHOC[self.method]).train_key()
        if self.method == "base":  # no training: only what fixes the evaluation data (and the post-hoc rotation)
            return _digest({"method": "base", "seed": self.seed, "n_heldout": self.n_heldout, "max_len": self.max_len})
        skip = {"ppl_chunks", "ppl_seq_len", "calib_chunks", "calib_seq_len", "task_limit"}
        skip |= {k for k, default in (("lr_scale", "none"), ("optimizer", "adamw"), ("lora_coords", "rotated")) if getattr(self, k) == default}
        fields_ = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if self.lr_scale != "none":  # the library's re-parametrisation (the first experiment used optimizer groups)
            fields_["lr_scale_impl"] = "RoLoRAConfig.lora_lr_scale"
        return _digest(fields_)

    def eval_key(self, setting: str) -> str:
        return _digest({"train": self.train_key(), "setting": setting, "ppl": [self.ppl_chunks, self.ppl_seq_len],
                        "calib": [self.calib_chunks, self.calib_seq_len] if setting in CALIBRATED else None,
                        "tasks": self.task_limit, **({"post_rotation": "R1+R4"} if self.method in POSTHOC else {})})  # fmt: skip

    def finetune_settings(self) -> FinetuneSettings:
        """The training of this run in the shared harness (:func:`rolora_plugin.app.train.finetune`): the LoRA
        init and the data order from ``seed``, AdamW (or ``optimizer``) with cosine decay after the warm-up, loss
        logged every step; RoLoRA rotates R1+R4 with ``seed``, QAT per :data:`METHODS`."""
        rotate, qat = METHODS[self.method]
        lora = {"r": self.rank, "lora_alpha": self.alpha, "target_modules": TARGETS[self.targets], "lora_dropout": 0.0}
        return FinetuneSettings(steps=self.steps, lr=self.lr, batch_size=self.batch_size, seed=self.seed, lora=lora,
                                rotation=RotationConfig(seed=self.seed) if rotate else None, data_seed=self.seed,
                                qat={"enabled": True, "preset": qat} if isinstance(qat, str) else {"enabled": qat},
                                lora_lr_scale=self.lr_scale, optimizer=self.optimizer, logging_steps=1,
                                **cosine_warmup(self.steps))  # fmt: skip

    def label(self) -> str:
        scale = "" if self.lr_scale == "none" else f"/lr×{self.lr_scale}"
        optim = "" if self.optimizer == "adamw" else f"/{self.optimizer}"
        coords = "" if self.lora_coords == "rotated" else f"/A-{self.lora_coords}"
        return f"{self.method}/{self.targets}/seed{self.seed}/lr{self.lr:g}{scale}{optim}{coords}"


def _digest(data: dict) -> str:
    text = json.dumps({"v": CACHE_VERSION, **data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


RESULTS_DIR = Path(__file__).resolve().parent / "results" / "finetune_table"


def cache_dir() -> Path:
    """Where the merged models go: ``$FT_TABLE_CACHE`` if set (tests), else ``$ROLORA_CACHE/bench/finetune_table``
    (``~/.cache/rolora-plugin/...`` without the variable)."""
    from rolora_plugin.app.assets import cache_root

    override = os.environ.get("FT_TABLE_CACHE")
    return Path(override) if override else cache_root() / "bench" / "finetune_table"


def runs_dir() -> Path:
    """Where the per-run JSON goes: ``$FT_TABLE_CACHE/runs`` if set, else :data:`RESULTS_DIR` (in the repository)."""
    override = os.environ.get("FT_TABLE_CACHE")
    return Path(override) / "runs" if override else RESULTS_DIR


def _train_path(s: RunSettings) -> Path:
    return runs_dir() / f"{s.train_key()}.train.json"


def _eval_path(s: RunSettings, setting: str) -> Path:
    return runs_dir() / f"{s.eval_key(setting)}.{setting}.json"


def _model_dir(s: RunSettings) -> Path:
    return cache_dir() / "models" / s.train_key()


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data: dict) -> None:
    """Write one stage's numbers, stamped with the machine that measured them (the table is built over sessions on
    different machines; unrotated W4A4 numbers differ between CPUs, see RESULTS.md)."""
    from _common import machine

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine(), **data}
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n")


def default_settings(method: str) -> tuple[str, ...]:
    """The evaluations a run of ``method`` is made for: :data:`EVAL_SETTINGS`, or for an FP4 QAT method FP and its
    own format at RTN and GPTQ."""
    qat = METHODS[method][1]
    return ("fp", f"{qat}-rtn", f"{qat}-gptq") if isinstance(qat, str) else EVAL_SETTINGS


def eval_quant(setting: str):
    """The :class:`~rolora_plugin.quant.QuantConfig` of an evaluation setting (None for ``fp``)."""
    from rolora_plugin.quant import QuantConfig

    if setting == "fp":
        return None
    if setting == "rtn":
        return QuantConfig(w_bits=4, a_bits=4)
    if setting == "gptq":
        return QuantConfig.preset("w4a4")
    fmt, method = setting.split("-")
    return QuantConfig.preset(fmt) if method == "gptq" else QuantConfig.preset(fmt, method="rtn", w_clip_search=False)


def load_cached(s: RunSettings, settings=ALL_SETTINGS) -> dict:
    """``{"train": dict | None, "fp"/"rtn"/"gptq"/...: dict | None}`` from the cache, nothing computed."""
    return {"train": _read(_train_path(s)), **{k: _read(_eval_path(s, k)) for k in settings}}


RETRAIN_RTOL = 1e-4  # float noise between runs of one model; a different trajectory differs by far more


class RetrainMismatch(RuntimeError):
    """A cached run re-trained (for a missing evaluation) came out as another model: see :func:`check_retrain`."""


def _fp_outcome(train: dict) -> list[float]:
    """What identifies a trained model in its train stage: the per-step losses and the FP curve values (not the
    timings, and not the fake-quant W4A4 curve, which differs between CPUs for one and the same model)."""
    curve = [r[k] for r in train["curves"] for k in ("heldout_fp", "ppl_fp")]
    return [float(v) for _, v in train["losses"]] + curve


def check_retrain(cached: dict, new: dict, label: str, files) -> None:
    """Refuse a re-run of a cached train stage (re-run to recover its merged model for a missing evaluation) that
    is not the run the cache describes: its evaluations would measure another model than the cached ones, and the
    table would mix the two silently. W4A4 QAT runs, for one, do not reproduce across CPU types. ``files``: a
    callable listing the run's cached stages, for the message (called only on a mismatch)."""
    a, b = _fp_outcome(cached), _fp_outcome(new)
    if len(a) == len(b):
        worst = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=0.0)
        if worst <= RETRAIN_RTOL:
            return
        what = f"largest relative difference {worst:.2g} in its losses and FP curve"
    else:
        what = f"{len(b)} loss/curve values where the cache has {len(a)}"
    from _common import machine

    raise RetrainMismatch(
        f"{label}: re-training it to recover its merged model did not reproduce the cached run ({what}; cached on "
        f"{cached.get('machine', 'an unrecorded machine')}, now on {machine()}), so its new evaluations would not "
        "describe the cached run. Run the missing evaluations on a machine like the cached one, or delete the run's "
        "cached stages to rebuild the whole run here: " + " ".join(str(f) for f in files()))


# ---------------------------------------------------------------------------------------------- statistics


def docs_for_stderr(target: float, n_tasks: int) -> int:
    """Documents per task so the standard error of an ``n_tasks``-task average is ≤ ``target`` (fraction) for any
    accuracies: ``SE(avg) = sqrt(Σ p_i(1-p_i)/n) / T ≤ 0.5 / sqrt(T n)`` ⇒ ``n ≥ 1 / (4 T target²)``."""
    return math.ceil(1.0 / (4 * n_tasks * target**2))


def chance_level(limit: int) -> float:
    """Mean over the 7 tasks of the mean of ``1 / n_choices`` over each task's first ``limit`` documents (the
    documents lm-eval scores): the accuracy of uniform guessing, from the data."""
    from datasets import load_from_disk

    from rolora_plugin.app.evaluate import PAPER_TASKS, task_data_dirs

    counters = {"boolq": lambda d: 2, "piqa": lambda d: 2, "winogrande": lambda d: 2,
                "hellaswag": lambda d: len(d["endings"]), "arc_easy": lambda d: len(d["choices"]["text"]),
                "arc_challenge": lambda d: len(d["choices"]["text"]), "openbookqa": lambda d: len(d["choices"]["text"])}  # fmt: skip
    per_task = []
    for task, folder in task_data_dirs(PAPER_TASKS).items():
        ds = load_from_disk(str(folder))
        docs = ds.select(range(min(limit, len(ds))))
        per_task.append(sum(1.0 / counters[task](d) for d in docs) / len(docs))
    return sum(per_task) / len(per_task)


# ---------------------------------------------------------------------------------------------- data


class Data:
    """Tokenizer, train rows, held-out batches, perplexity chunks (eval and curve), calibration chunks."""

    def __init__(self, s: RunSettings):
        from rolora_plugin.app.assets import (
            calibration_chunks,
            instruction_pairs,
            load_smollm2,
            pad_collate,
            text_chunks,
            tokenize_pairs,
        )

        _, self.tok = load_smollm2(torch.float32)
        pairs = instruction_pairs("sciq", seed=0)  # one fixed split for every seed: seeds vary init and order
        held = tokenize_pairs(self.tok, pairs[: s.n_heldout], s.max_len)
        self.train = tokenize_pairs(self.tok, pairs[s.n_heldout :], s.max_len)
        self.heldout = [pad_collate(held[i : i + 4], self.tok.pad_token_id) for i in range(0, len(held), 4)]
        self.chunks = text_chunks(self.tok, s.ppl_chunks, s.ppl_seq_len)
        self.curve_chunks = self.chunks[: s.curve_ppl_chunks]
        self.curve_heldout = self.heldout[: s.curve_heldout_batches]
        self.calibration = calibration_chunks(self.tok, s.calib_chunks, s.calib_seq_len)


# ---------------------------------------------------------------------------------------------- training


def _curve_callback(data: Data, every: int, sink: list, fp4: str | None = None):
    """Every ``every`` steps (and before step 1): held-out loss FP and fake-quant W4A4, BoolQ ppl FP; with ``fp4``
    (an FP4 QAT run) also the held-out loss fake-quantized in that format (``heldout_<fmt>``)."""
    from transformers import TrainerCallback

    from rolora_plugin.metrics import mean_loss, perplexity
    from rolora_plugin.quant import fake_quantized
    from rolora_plugin.lora.config import fake_quant_config, fake_quant_preset

    def measure(model, step: int) -> None:
        t0 = time.perf_counter()
        with fake_quantized(model, None):  # under QAT: full precision for this measurement
            row = {"step": step, "heldout_fp": mean_loss(model, data.curve_heldout),
                   "ppl_fp": perplexity(model, data.curve_chunks, progress=False)}  # fmt: skip
        with fake_quantized(model, fake_quant_config()):
            row["heldout_w4a4"] = mean_loss(model, data.curve_heldout)
        if fp4:
            with fake_quantized(model, fake_quant_preset(fp4)):
                row[f"heldout_{fp4}"] = mean_loss(model, data.curve_heldout)
        row["seconds"] = time.perf_counter() - t0
        sink.append(row)

    class Curves(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            measure(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                measure(model, state.global_step)

    return Curves()


class _RightFactor(torch.nn.Module):
    """``weight = Â @ M`` for a fixed M (torch parametrisation); ``right_inverse`` gives the initial ``Â``."""

    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.register_buffer("m", m)
        self.register_buffer("m_inv", torch.linalg.inv(m.double()).to(m.dtype))

    def forward(self, x):
        return x @ self.m

    def right_inverse(self, x):
        return x @ self.m_inv


def _unfold_gain_callback(s: RunSettings):
    """The FP-gap experiment ``lora_coords="unfolded"``: after RoLoRACallback rotated the model (A' = A diag(g) R),
    train Â with ``A' = Â Rᵀ diag(g) R`` on every LoRA layer that reads a folded norm. The unrotated equivalent is
    ``A = Â Rᵀ``, an orthogonal re-parametrisation of LoRA's own A: SGD then follows plain LoRA exactly, while the
    LoRA branch still reads the rotated activations; under Adam only R's coordinates differ from LoRA. Removed
    (weights left parametrised) when training ends, before the merge."""
    from torch.nn.utils import parametrize
    from transformers import TrainerCallback

    from rolora_plugin._peft import is_lora_layer, unwrap_peft
    from rolora_plugin.app.assets import load_smollm2
    from rolora_plugin.model.architectures import ModelDims, get_architecture, get_submodule
    from rolora_plugin.rotate.rotation import build_rotations

    class UnfoldGain(TrainerCallback):
        def __init__(self):
            self.done = []

        def on_init_end(self, args, state, control, model=None, **kwargs):
            inner = unwrap_peft(model)
            spec = get_architecture(inner)
            r = build_rotations(RotationConfig(seed=s.seed), ModelDims.from_config(inner.config))["r1"].matrix(torch.float64)
            original, _ = load_smollm2(torch.float32)  # the gains before folding
            for layer, orig in zip(spec.decoder_layers(inner), spec.decoder_layers(original)):
                for norm_path, readers in ((spec.input_norm, spec.attention_inputs()), (spec.post_attention_norm, spec.mlp_inputs())):
                    g = get_submodule(orig, norm_path).weight.detach().double()
                    m = (r.T * g) @ r  # Rᵀ diag(g) R
                    for path in readers:
                        mod = get_submodule(layer, path)
                        if is_lora_layer(mod):
                            for lin in mod.lora_A.values():
                                parametrize.register_parametrization(lin, "weight", _RightFactor(m.to(lin.weight.dtype)))
                                self.done.append(lin)
            if not self.done:
                raise RuntimeError("lora_coords='unfolded': no LoRA layer reads a folded norm")

        def on_train_end(self, args, state, control, **kwargs):
            for lin in self.done:
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
            self.done.clear()

    return UnfoldGain()


def _train(s: RunSettings, data: Data):
    """The fine-tune in the shared harness (:meth:`RunSettings.finetune_settings`), the FP-gap re-parametrisation and
    the curve measurements as extra callbacks; returns (trainer, curves). ``optimizer="sgd"`` is the FP-gap control:
    under SGD the rotation drops out of the trajectory, only the folded gain acts (tests/core/test_lora_geometry.py)."""
    from rolora_plugin.app.assets import load_smollm2
    from rolora_plugin.app.train import finetune

    model, tok = load_smollm2(torch.float32)
    curves: list = []
    fp4 = METHODS[s.method][1] if isinstance(METHODS[s.method][1], str) else None
    extra = [_unfold_gain_callback(s)] if s.lora_coords == "unfolded" else []
    extra.append(_curve_callback(data, s.eval_every, curves, fp4))
    return finetune(model, tok, data.train, s.finetune_settings(), callbacks=extra), curves


def _merge(s: RunSettings, trainer, tok) -> None:
    """Publish the merged model at ``models/<key>`` (RoLoRA: verified merge in the rotated basis)."""
    from rolora_plugin.io.export import merge_and_export

    target = _model_dir(s)
    if METHODS[s.method][0]:
        _clear(target)
        merge_and_export(trainer.model, target, tokenizer=tok, inplace=True)
        return
    _publish(trainer.model.merge_and_unload(), tok, target)


def _clear(target: Path) -> None:
    """Make room for a run's model: the folder is a cache entry of this script (a stale one after a crash)."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)


def _publish(model, tok, target: Path) -> None:
    """Save an (unrotated) model and its tokenizer at ``target``, atomically."""
    _clear(target)
    with atomic_output_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def _base_stage(s: RunSettings) -> dict:
    """The "training" of the reference rows: the pretrained model, published where a merged model would go."""
    from rolora_plugin.app.assets import load_smollm2

    t0, c0 = time.perf_counter(), time.process_time()
    model, tok = load_smollm2(torch.float32)
    _publish(model, tok, _model_dir(s))
    return {"settings": dataclasses.asdict(s), "losses": [], "curves": [], "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}


def _train_stage(s: RunSettings, data: Data) -> dict:
    if s.method == "base":
        return _base_stage(s)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer, curves = _train(s, data)
    losses = [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
    if not all(math.isfinite(v) for _, v in losses):
        raise RuntimeError(f"{s.label()}: training loss is not finite; lower the learning rate")
    _merge(s, trainer, data.tok)
    return {"settings": dataclasses.asdict(s), "losses": losses, "curves": curves, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}


# ---------------------------------------------------------------------------------------------- evaluation


def _load_merged(s: RunSettings):
    from transformers import AutoModelForCausalLM

    from rolora_plugin.io.export import load_rotated

    path = _model_dir(s)
    if METHODS[s.method][0]:
        return load_rotated(path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if s.method in POSTHOC:
        from rolora_plugin import rotate_model_

        rotate_model_(model, RotationConfig(seed=s.seed))  # what RoLoRACallback applies before training, now after
    return model


def _eval_stage(s: RunSettings, data: Data, setting: str) -> dict:
    from rolora_plugin.app.evaluate import evaluate_tasks
    from rolora_plugin.metrics import mean_loss, perplexity
    from rolora_plugin.quant import quantize_model_

    t0, c0 = time.perf_counter(), time.process_time()
    model = _load_merged(s)
    quant = eval_quant(setting)
    if quant is not None:
        calibration = list(data.calibration.split(1)) if setting in CALIBRATED else None
        quantize_model_(model, quant, calibration=calibration, progress=False)
    row = {"heldout_loss": mean_loss(model, data.heldout), "ppl": perplexity(model, data.chunks, progress=False)}
    if s.task_limit:
        tasks = evaluate_tasks(model, data.tok, limit=s.task_limit)
        row.update(avg=tasks["average"], scores=tasks["scores"], stderr=tasks["stderr"])
        row["avg_stderr"] = math.sqrt(sum(v * v for v in tasks["stderr"].values())) / len(tasks["stderr"])
    row["seconds"], row["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return row


def run_one(s: RunSettings, data_cache: dict, settings=EVAL_SETTINGS, keep_model: bool = False) -> dict:
    """Train (if not cached), then each missing evaluation; returns :func:`load_cached`'s dict, complete. The merged
    model is deleted once every evaluation at these settings is cached, unless ``keep_model`` (e.g. when the run
    is evaluated at a cheaper size first and the 7-task average is to follow)."""
    have = load_cached(s, settings)
    missing = [k for k in settings if have[k] is None]
    if have["train"] is not None and not missing:
        return have
    data = _data(s, data_cache)
    if have["train"] is None or (missing and not (_model_dir(s) / "config.json").is_file()):
        logger.info("%s: training %d steps", s.label(), s.steps)
        trained = _train_stage(dataclasses.replace(s, method=POSTHOC.get(s.method, s.method)), data)
        if have["train"] is not None:
            try:
                check_retrain(have["train"], trained, s.label(), lambda: _stage_files(s))
            except RetrainMismatch:
                shutil.rmtree(_model_dir(s), ignore_errors=True)  # never evaluate the unreproduced model later
                raise
            logger.info("%s: re-training reproduced the cached run", s.label())
        have["train"] = trained
        _write(_train_path(s), have["train"])
    for setting in missing:
        logger.info("%s: evaluating %s", s.label(), setting)
        have[setting] = _eval_stage(s, data, setting)
        _write(_eval_path(s, setting), have[setting])
    wanted = [(s, k) for k in settings] + [(r, k) for r in _sharing(s) for k in default_settings(r.method)]
    if not keep_model and all(_read(_eval_path(r, k)) is not None for r, k in wanted):
        shutil.rmtree(_model_dir(s), ignore_errors=True)  # every number of this model is cached
    return have


def _stage_files(s: RunSettings) -> list[Path]:
    """The cached stages of ``s``'s trained model: its train stage and the evaluations of each run sharing it, at
    any task limit up to 1000 documents (the evaluation files do not name their train key; this error-path scan
    hashes the candidates instead)."""
    limits = {*range(1001), s.task_limit}
    runs = [dataclasses.replace(r, task_limit=n) for r in _sharing(s) for n in limits]
    paths = {_eval_path(r, k) for r in runs for k in ALL_SETTINGS}
    return [_train_path(s), *sorted(p for p in paths if p.exists())]


def _sharing(s: RunSettings) -> list[RunSettings]:
    """The runs evaluated from ``s``'s merged model: itself, and LoRA's post-hoc-rotated control (or its base)."""
    base = POSTHOC.get(s.method, s.method)
    return [dataclasses.replace(s, method=m) for m in (base, *(p for p, b in POSTHOC.items() if b == base))]


def _data(s: RunSettings, data_cache: dict) -> Data:
    key = (s.n_heldout, s.max_len, s.ppl_chunks, s.ppl_seq_len, s.calib_chunks, s.calib_seq_len, s.curve_ppl_chunks,
           s.curve_heldout_batches)
    if key not in data_cache:
        data_cache[key] = Data(s)
    return data_cache[key]


def threads() -> int:
    """torch threads: ``$FT_THREADS`` or 2 (this machine's cores)."""
    return int(os.environ.get("FT_THREADS", "2"))
