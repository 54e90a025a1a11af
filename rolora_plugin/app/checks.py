"""Input checks of the ``rolora`` command: every bad input becomes one :class:`CLIError` line, before any work.

Each check looks at what the user passed (folders, files, numbers) and raises :class:`CLIError` with a message
that says what is wrong and what to do, naming CLI flags (``--base-model``) or config keys (``seq_len``), never
Python parameters. The checks are cheap: they read headers and small JSON files, never whole weights.

Example::

    src = check_model_dir("smollm2/")          # a folder with config.json and readable weights
    out = check_new_output_dir("rotated/")     # does not exist; its nearest existing parent accepts new folders
    check_int(4, "--w-bits", 2, 16)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.util
import json
import os
import re
import stat
from pathlib import Path

from ..config import short_repr

__all__ = [
    "CLIError",
    "EVAL_EXTRA_PIP",
    "TOKENIZER_FILES",
    "check_int",
    "check_model_dir",
    "check_new_output_dir",
    "check_output_parent",
    "check_record",
    "check_seed",
    "check_token_ids",
    "check_weights",
    "check_weights_file",
    "config_errors",
    "first_line",
    "load_model_config",
    "check_family",
    "check_json_file",
    "check_json_files",
    "check_pickle",
    "is_rotated_dir",
    "load_config_file",
    "load_tokenizer",
    "require_modules",
    "short_repr",
]

EVAL_EXTRA_PIP = "pip install -e '.[eval]' in the rolora-plugin checkout (or: bash scripts/setup.sh)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt")
SEED_LIMIT = 2**32  # numpy's (and so transformers.set_seed's) seed range is [0, 2**32)
MAX_LINE = 600  # characters of one error line: a message never formats a huge value in full
CONFIG_MAX_BYTES = 1 << 20  # a training config is a few hundred bytes; 1 MiB leaves room and bounds the parse
CONFIG_MAX_DEPTH = 64  # nesting levels of a training config (its sections are 2-3 deep)
JSON_PREFLIGHT_MAX_BYTES = 64 << 20  # JSON files re-parsed up front for their nesting; larger ones are left alone


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), at most :data:`MAX_LINE` characters."""
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0]
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 25] + f"... ({len(line)} characters)"


@contextlib.contextmanager
def config_errors(what: str):
    """Turn a config's ValueError/TypeError (bad field values, unknown keys) into a one-line :class:`CLIError`."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise CLIError(f"invalid {what} settings: {first_line(e)}") from None
    except RecursionError:
        raise CLIError(f"invalid {what} settings: a value is nested too deeply; settings are flat values and short lists") from None


# ---------------------------------------------------------------------------------------------- config files


def load_config_file(path: str | os.PathLike, what: str = "config") -> dict:
    """The mapping of a YAML or JSON config file, parsed with bounds a hostile file cannot get past.

    Refused with one :class:`CLIError` line each: a file over :data:`CONFIG_MAX_BYTES`, YAML aliases (``*name``,
    the "billion laughs" bomb expands a few hundred bytes into billions of values), nesting deeper than
    :data:`CONFIG_MAX_DEPTH`, invalid YAML/JSON, anything but a mapping at the top.
    """
    import yaml

    p = Path(path)
    try:
        size = p.stat().st_size
        if size > CONFIG_MAX_BYTES:
            raise CLIError(f"{what} {str(p)!r} is {size / (1 << 20):.1f} MiB; a config is a small YAML/JSON mapping "
                           f"(at most {CONFIG_MAX_BYTES >> 20} MiB): pass the right file")  # fmt: skip
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {what} {str(p)!r}: {first_line(e)}") from None
    try:
        data = yaml.load(text, Loader=_bounded_loader())  # noqa: S506 - a SafeLoader subclass
    except _Refused as e:
        raise CLIError(f"{what} {str(p)!r}: {e}") from None
    except yaml.YAMLError as e:
        raise CLIError(f"{what} {str(p)!r} is not valid YAML/JSON: {first_line(e)}") from None
    except RecursionError:
        raise CLIError(f"{what} {str(p)!r} is nested too deeply to parse; a config is a flat mapping with small sections") from None
    if not isinstance(data, dict):
        raise CLIError(f"{what} {str(p)!r} must hold a mapping of settings (key: value lines), got {type(data).__name__}")
    return data


class _Refused(Exception):
    pass


@functools.lru_cache(maxsize=None)
def _bounded_loader():
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """PyYAML's safe loader without aliases and with a nesting bound (checked while composing, before any
        value is built)."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise _Refused(f"YAML aliases are not accepted (*{short_repr(event.anchor)[1:-1]} at line "
                               f"{event.start_mark.line + 1}): a few aliases can expand a small file into billions "
                               "of values; write the values out in full")  # fmt: skip
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                if self._depth > CONFIG_MAX_DEPTH:
                    mark = self.peek_event().start_mark
                    raise _Refused(f"nested more than {CONFIG_MAX_DEPTH} levels deep (line {mark.line + 1}); a config "
                                   "is a flat mapping with small sections")  # fmt: skip
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return BoundedLoader


def check_json_file(path: Path, lines: bool = False) -> None:
    """Refuse a JSON (``lines``: JSON-lines) file nested too deeply to parse (Python's parser raises
    RecursionError), naming the file. Other defects are left to the check that reads the file, which words them
    for its purpose; files over :data:`JSON_PREFLIGHT_MAX_BYTES` are not pre-parsed."""
    try:
        if path.stat().st_size > JSON_PREFLIGHT_MAX_BYTES:
            return
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    try:
        for part in text.splitlines() if lines else [text]:
            if part.strip():
                with contextlib.suppress(ValueError):
                    json.loads(part)
    except RecursionError:
        raise CLIError(f"{path} is nested too deeply to parse (more levels than any config, record or data row "
                       "has): it is damaged or was made to crash readers; replace it with a good copy") from None


def check_adapter_config(folder: str | os.PathLike | None, base_given: bool = False) -> None:
    """A peft ``adapter_config.json`` in ``folder`` (if any) holds an object whose fields this tool and peft use
    have their JSON types: ``base_model_name_or_path`` a path or null, ``target_modules`` a regex or a list of
    module names (``base_given``: the base model was passed, its field is not used). Invalid JSON is reported by
    the adapter checks, with their advice."""
    if not folder:
        return
    path = Path(folder) / "adapter_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return
    if data is None or not isinstance(data, dict):
        return
    base = data.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str) and not base_given:
        raise CLIError(f"{path}: base_model_name_or_path must be a folder path or null, got {short_repr(base)}; "
                       "fix adapter_config.json (rolora export also takes --base-model DIR)")  # fmt: skip
    targets = data.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        raise CLIError(f"{path}: target_modules must be a regex or a list of module-name strings, got "
                       f"{short_repr(targets)}; re-save the adapter (peft save_pretrained)")  # fmt: skip


def check_json_files(path: str | os.PathLike | None) -> None:
    """:func:`check_json_file` on ``path`` (a .json/.jsonl file) or on every ``*.json`` directly in ``path`` (a
    model, adapter or export folder: config, records, weight index, tokenizer files)."""
    if not path:
        return
    p = Path(path)
    try:
        if p.is_dir():
            for f in sorted(p.glob("*.json")):
                if f.is_file():
                    check_json_file(f)
        elif p.suffix in (".json", ".jsonl") and p.is_file():
            check_json_file(p, lines=p.suffix == ".jsonl")
    except OSError:
        return  # unreadable folders are reported by the checks that need them


# ---------------------------------------------------------------------------------------------- numbers


def check_int(value, flag: str, lo: int, hi: int | None = None, hint: str = "") -> int:
    """``value`` must be an int in ``[lo, hi]`` (``hi`` None: no upper bound); ``flag`` names it in the message."""
    bad = isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi)
    if bad:
        span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise CLIError(f"{flag} must be an integer {span}{hint}, got {value!r}")
    return value


def check_seed(value, flag: str) -> int:
    """A seed in ``[0, 2**32)``: the range numpy (used by ``transformers.set_seed``) accepts."""
    return check_int(value, flag, 0, SEED_LIMIT - 1)


# ---------------------------------------------------------------------------------------------- extras


def require_modules(modules: dict[str, str], what: str) -> None:
    """Every module of ``{module: install hint}`` must be importable (found with ``find_spec``, not imported).

    ``sys.modules[name] = None`` (an import blocked on purpose) counts as missing, as Python's import does.
    """
    missing = {name: hint for name, hint in modules.items() if _find_spec(name) is None}
    if missing:
        hints = "; ".join(dict.fromkeys(missing.values()))
        raise CLIError(f"{what} needs the python package(s) {', '.join(sorted(missing))}, not installed; fix: {hints}")


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package missing, or a module without __spec__
        return None


# ---------------------------------------------------------------------------------------------- folders


def _looks_like_hub_id(path: str) -> bool:
    """``ORG/NAME`` with Hub-legal characters, relative, no ``./``: what users paste from a model page."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]", path)) and not path.startswith(".")


def check_model_dir(path: str, flag: str = "model dir", weights: bool = True) -> Path:
    """An existing, readable directory holding a ``config.json`` (and readable weights); else :class:`CLIError`."""
    p = Path(path)
    if not p.exists():
        problem = next(filter(None, map(_link_problem, (p, *Path(os.path.abspath(p)).parents))), None)
        if not problem and _looks_like_hub_id(path):
            raise CLIError(f"{flag} {path!r} is not a local folder: rolora reads local folders only and never downloads "
                           f"(it looks like a Hugging Face Hub id); download it first, e.g. `hf download {path} --local-dir "
                           "DIR`, and pass DIR (README: 'Your own model')")  # fmt: skip
        raise CLIError(f"{flag} {path!r} does not exist" + (f": {problem}" if problem else ""))
    if not p.is_dir():
        raise CLIError(f"{path!r} is not a directory; pass the folder written by save_pretrained")
    if not os.access(p, os.R_OK | os.X_OK):
        raise CLIError(f"{flag} {path!r} is not readable (check its permissions)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise CLIError(f"{path!r} has no config.json; pass a folder written by save_pretrained")
    if not os.access(cfg, os.R_OK):
        raise CLIError(f"{cfg} is not readable (check its permissions)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CLIError(f"cannot read the model config in {path!r}: {first_line(e)}") from None
    except RecursionError:
        raise CLIError(f"{cfg} is nested too deeply to parse: damaged or made to crash readers; replace config.json "
                       "with a good copy") from None  # fmt: skip
    _check_config_shape(cfg, data)
    check_json_files(p)  # records, weight index, tokenizer files: none nested beyond what a parser survives
    if weights:
        check_weights(p)
    return p


def _check_config_shape(cfg: Path, data) -> None:
    """The fields this tool reads before transformers does have the JSON types transformers expects."""
    fix = "restore the config.json that came with the weights"
    if not isinstance(data, dict):
        raise CLIError(f"{cfg} holds a JSON {type(data).__name__}, not an object of model settings; {fix}")
    if not isinstance(data.get("model_type", ""), str):
        raise CLIError(f"{cfg}: model_type must be a string such as \"llama\", got {short_repr(data['model_type'])}; {fix}")
    archs = data.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CLIError(f"{cfg}: architectures must be a list of class names such as [\"LlamaForCausalLM\"], got "
                       f"{short_repr(archs)}; {fix}")  # fmt: skip


def check_weights(folder: Path) -> None:
    """``folder`` holds weights transformers can read: safetensors headers intact, every indexed shard present,
    pickle checkpoints (``pytorch_model.bin``) made of plain tensors only (checked without running them)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return _check_index(folder, index)
    if (folder / "model.safetensors").is_file():
        return check_weights_file(folder / "model.safetensors")
    if not (folder / "pytorch_model.bin").is_file():
        raise CLIError(f"{str(folder)!r} has a config.json but no weights (model.safetensors or pytorch_model.bin); "
                       "pass the complete folder written by save_pretrained")  # fmt: skip
    check_weights_file(folder / "pytorch_model.bin")


def _check_index(folder: Path, index: str) -> None:
    try:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise CLIError(f"{folder / index} is not a valid weight index ({first_line(e)}); re-save the model") from None
    except RecursionError:
        raise CLIError(f"{folder / index} is nested too deeply to be a weight index; re-save the model") from None
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise CLIError(f"{str(folder)!r} lacks the weight shard {shard} named in {index}; copy the complete folder")
        check_weights_file(path)


def check_weights_file(path: Path) -> None:
    """A ``.safetensors`` file's header parses and the file covers every tensor (``safe_open`` maps the file, it
    does not read the data); a pickle file (``.bin``, ``.pt``, ...) holds plain tensors only (:func:`check_pickle`)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        if not os.access(path, os.R_OK):
            raise CLIError(f"{path} is not readable (check its permissions)")
        return check_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError (truncated, corrupt), OSError (unreadable)
        raise CLIError(f"{path} is unreadable ({first_line(e)}): truncated or corrupt; re-save or copy the model again") from None


def check_pickle(path: Path) -> None:
    """A pickle checkpoint must be what PyTorch's weights-only unpickler accepts (tensors, dicts, lists, numbers).

    The file is unpickled by that restricted unpickler with tensors mapped to the ``meta`` device (and the file
    memory-mapped), so this reads the pickle's small object stream, not the weights, and never runs code: a
    payload (``os.system``, any other global) is refused by name in one line, before any model is built.
    """
    import pickle

    import torch

    try:
        try:
            torch.load(path, map_location="meta", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            torch.load(path, map_location="meta", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|global: ?([\w.]+)", str(e))
        what = f"it calls {next(g for g in found.groups() if g)!r}" if found else first_line(e)
        raise CLIError(f"{path} is a pickle checkpoint that holds more than tensors ({what}; loading it would run that "
                       "code) and rolora does not unpickle it; use a safetensors checkpoint, or convert this one with "
                       "save_pretrained(..., safe_serialization=True) only where you trust its source") from None  # fmt: skip
    except (RuntimeError, ValueError, EOFError, OSError, AttributeError, TypeError, KeyError) as e:
        raise CLIError(f"{path} is not a readable PyTorch checkpoint ({first_line(e)}): truncated, corrupt or not "
                       "weights; re-save or copy the model again (safetensors preferred)") from None  # fmt: skip


def _link_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resolved (a symbolic link loop, a dangling link, ...), or None if it resolves or is
    simply absent."""
    if not os.path.lexists(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{str(path)!r} is a symbolic link loop (resolving it never ends); remove or fix the link"
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
            return (f"{str(path)!r} is a dangling symbolic link (to {os.readlink(path)!r}, which does not exist); "
                    "create its target, fix the link")  # fmt: skip
        return f"{str(path)!r} cannot be resolved ({e.strerror or e})"
    return None


def check_output_parent(path: str | os.PathLike, flag: str = "output dir") -> Path:
    """The nearest existing ancestor of ``path`` is a folder that accepts new entries (nothing is created here).

    No component of ``path`` (nor ``path`` itself) may be a symbolic link loop or a dangling link: the publisher
    could not create the output there, and finding out only after the work would waste it.
    """
    from ..io.publish import check_writable_parent

    p = Path(os.path.abspath(path))
    for candidate in (p, *p.parents):
        problem = _link_problem(candidate)
        if problem:
            raise CLIError(f"cannot create {flag} {str(path)!r}: {problem}, or choose another path")
    with contextlib.suppress(OSError):
        mode = os.stat(p).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise CLIError(f"{flag} {str(path)!r} is a device, pipe or socket, not a file or folder; choose another path")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CLIError(f"cannot create {flag} {str(path)!r}: {str(ancestor)!r} is a file, not a folder; choose another path")
    try:
        check_writable_parent(ancestor / f".{p.name}.probe")  # probes with a mkdir inside ``ancestor``
    except OSError as e:
        raise CLIError(f"cannot create {flag} {str(path)!r}: {first_line(e).split(': ', 1)[-1]}") from None
    return Path(path)


def check_new_output_dir(path: str, flag: str = "output dir") -> Path:
    """A path that does not exist yet and could be created; else :class:`CLIError`."""
    if os.path.lexists(path):
        raise CLIError(f"{flag} {path!r} already exists; choose a new path or remove it first")
    return check_output_parent(path, flag)


# ---------------------------------------------------------------------------------------------- model config


def load_model_config(model_dir: Path):
    """The transformers config of ``model_dir``; unknown model types and non-causal-LM checkpoints are refused."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise CLIError(f"cannot read the model config in {str(model_dir)!r}: {first_line(e)}") from None
    except RecursionError:
        raise CLIError(f"{model_dir / 'config.json'} is nested too deeply to parse; replace it with a good copy") from None
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
        arch = ", ".join(getattr(config, "architectures", None) or []) or "its class"
        raise CLIError(f"unsupported model family {config.model_type!r} ({arch}); rolora can rotate: {known}. To add it, "
                       "return an rolora_plugin.ArchitectureSpec from a `rolora_register_architectures` hook in a plugin "
                       "registered under the `rolora` entry-point group (README: 'Extending (pluggy)')")  # fmt: skip


def is_rotated_dir(model_dir: Path, config) -> bool:
    from ..config import RECORD_KEY

    return (model_dir / "rolora_rotation.json").is_file() or bool(getattr(config, RECORD_KEY, None))


def check_record(folder: Path) -> None:
    """A ``rolora_rotation.json`` in ``folder`` must parse as a record (unknown keys, bad JSON: RotationError)."""
    from ..errors import RotationError
    from ..io.export import read_rotation_record

    try:
        read_rotation_record(folder)
    except (ValueError, TypeError, KeyError) as e:
        raise RotationError(f"{folder}/rolora_rotation.json is not a valid rotation record: {first_line(e)}") from None
    except RecursionError:
        raise RotationError(f"{folder}/rolora_rotation.json is nested too deeply to be a rotation record; replace it "
                            "with the one written by the run") from None  # fmt: skip


# ---------------------------------------------------------------------------------------------- tokenizer and ids


def load_tokenizer(model_dir: Path, required: bool = False):
    """The tokenizer saved in ``model_dir``; None when it has no tokenizer files (and ``required`` is False).

    A folder that has tokenizer files which cannot be loaded is an error, never silently "no tokenizer": an output
    written without it would not be the model the user passed.
    """
    present = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    if not present:
        if required:
            raise CLIError(f"{str(model_dir)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}); save it next to the model")
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # tokenizers raises json, Rust and OS errors for damaged files
        raise CLIError(f"the tokenizer in {str(model_dir)!r} ({', '.join(present)}) cannot be loaded ({first_line(e)}); "
                       "repair or re-save it, or delete those files to go on without a tokenizer") from None  # fmt: skip


def check_token_ids(ids, vocab_size: int, what: str, source: str) -> None:
    """``ids``: a non-empty integer tensor (batch, seq) whose values index the model's ``vocab_size`` embeddings."""
    import torch

    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2 or 0 in ids.shape:
        found = f"{str(ids.dtype).removeprefix('torch.')} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise CLIError(f"{what} must be a non-empty integer (batch, seq) tensor of token ids (int64), got {found}")
    top, low = int(ids.max()), int(ids.min())
    if low < 0 or top >= vocab_size:
        raise CLIError(f"the tokenizer of {source} produces token id {top if top >= vocab_size else low} for the {what}, "
                       f"outside the model's {vocab_size} embeddings: tokenizer and model do not match")  # fmt: skip
