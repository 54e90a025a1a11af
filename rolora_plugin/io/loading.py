"""One loader for user checkpoints: a model is built from the checkpoint's own tensors, or not at all.

``transformers``' ``from_pretrained`` fills every tensor the checkpoint lacks with random initial values and only
logs a report: a ``config.json`` claiming one more layer than the weights, a shard without one tensor, a packed
export whose ``quantization_config`` was removed all load "fine" and give a silently wrong model.
:func:`load_causal_lm` is the one place rolora-plugin loads a user checkpoint (rotate, quantize, export,
``load_rotated``, eval, the consumer check, ``rolora train``). It:

1. decides which weights the folder holds (:func:`rolora_plugin.io.safetensors_reader.weight_files`: one
   ``model.safetensors`` or one index + shards, never both; the streaming path applies the same rule);
2. loads with ``output_loading_info=True`` and ``ignore_mismatched_sizes=True`` (so a shape mismatch is reported,
   not raised as transformers' multi-line ``RuntimeError``);
3. refuses, with one :class:`CheckpointError` line, any missing, unexpected or mismatched tensor and any load error,
   before the model is returned (so before any rotation or quantization runs). Legitimately absent tensors are
   allowed: a tied weight (``lm_head.weight`` with ``tie_word_embeddings``: it shares the embedding's storage) and
   what the model class declares optional; non-persistent buffers are never checkpoint tensors. Expected extra
   tensors are named by the caller (``expected_unexpected``: e.g. :data:`rolora_plugin.io.compressed.EXPORT_SIDE_KEYS`).

transformers' own "LOAD REPORT" (a multi-line warning) is not shown: the error says the same in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError  # re-exported: rolora_plugin.io.loading.CheckpointError
from ..finite import all_finite
from .safetensors_reader import _numel, header_shapes, weight_files

__all__ = ["CheckpointError", "check_layer_count", "check_loading_info", "load_causal_lm"]

logger = logging.getLogger(__name__)
_SHOWN = 3  # tensor names quoted in a message

# Tensors of an export that are not parameters of the dense transformers model: the stored online-transform matrices
# (loaded into compressed-tensors' transform modules) and NVFP4's static input_global_scale (read by the activation
# quantizer). Every tensor of an export is checked against its sha256 before loading (verify_compressed_export).
EXPORT_SIDE_KEYS = (r"\.rolora_r[34]_[a-z_]+\.weight$", r"\.input_global_scale$")


def model_class(path: str | os.PathLike):
    """``AutoModelForCausalLM``, or for configs it does not map (LLaVA-style VLMs) the class in ``config.architectures``."""
    import transformers

    auto = transformers.AutoModelForCausalLM
    if not (Path(path) / "config.json").is_file():
        return auto  # not a local folder: from_pretrained reports it
    config = _config_json(Path(path) / "config.json")
    if config.get("model_type") in transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return auto
    named = [getattr(transformers, a, None) for a in config.get("architectures") or []]
    return next((c for c in named if c is not None), auto)


def read_json_object(path: Path, what: str, error: type[Exception] = CheckpointError) -> dict:
    """A JSON object from ``path``; unreadable, invalid, too deeply nested (RecursionError) or not an object: one
    ``error`` line naming ``what``."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise error(f"cannot read {what} {path} ({str(e)[:200] or type(e).__name__}); the file is incomplete or was edited") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} holds a {type(data).__name__}, not a JSON object; the file is incomplete or was edited")
    return data


def _config_json(path: Path) -> dict:
    return read_json_object(path, "model config")


def load_causal_lm(
    path: str | os.PathLike,
    dtype=None,
    *,
    model_cls=None,
    expected_unexpected: tuple[str, ...] = (),
    what: str = "checkpoint",
    **kwargs,
) -> nn.Module:
    """``model_cls.from_pretrained(path, dtype=dtype, **kwargs)`` that refuses an incomplete or inconsistent checkpoint.

    Args:
        path: a local model folder (``config.json`` + safetensors or ``pytorch_model.bin`` weights).
        dtype: as ``from_pretrained(dtype=...)``; None keeps transformers' default.
        model_cls: the class to load with (default :func:`rolora_plugin.io.compressed.model_class`: ``AutoModelForCausalLM``
            or the class named in ``config.architectures`` for configs it does not map).
        expected_unexpected: regexes (``re.search``) of checkpoint tensors that are expected though not model
            parameters (e.g. stored transform matrices loaded separately).
        what: how messages name ``path`` (e.g. ``"base model"``).
        **kwargs: passed to ``from_pretrained`` (``attn_implementation``, ``quantization_config``, ...).

    Raises:
        CheckpointError: the folder holds both single-file and sharded weights, or a tensor is missing, unexpected
            or of another shape than ``config.json`` implies (nothing is returned; transformers' random fill never
            reaches the caller).
    """
    path = Path(path)
    if path.is_dir():
        weight_files(path)  # refuses a folder holding both model.safetensors and an index + shards
    if model_cls is None:
        model_cls = model_class(path)
    if path.is_dir():
        check_dims_against_headers(path, model_cls, what)  # before transformers allocates what config.json claims
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs.pop("output_loading_info", None)
    kwargs["ignore_mismatched_sizes"] = True  # reported by the loading info, refused below in one line
    if path.is_dir():
        kwargs.setdefault("local_files_only", True)
    with _quiet_load_report():
        try:
            model, info = model_cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
        except RuntimeError as e:
            text = str(e)
            if "loading state_dict" in text or "conversion of the weights" in text:
                detail = " ".join(text.split("\n\t")[1:2]).strip() or text.splitlines()[0]
                raise CheckpointError(f"{what} {path} cannot be loaded: {detail[:300]}; the weights do not fit its config.json: "
                                      "re-save or re-download the checkpoint (nothing was written)") from None  # fmt: skip
            raise
        except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a pickle: its payload never ran
            raise CheckpointError(
                f"{what} {path}: its pytorch_model.bin is a pickle holding more than tensors (torch.load refused "
                "it in weights-only mode; nothing in it ran); convert it to safetensors from a source you trust"
            ) from None
    check_loading_info(model, info, path, expected_unexpected=expected_unexpected, what=what)
    if kwargs.get("dtype") == torch.float16:
        _check_float16_cast(model, path, what)
    return model


def _check_float16_cast(model: nn.Module, path: Path, what: str) -> None:
    """A float32/bfloat16 checkpoint loaded in float16: a value beyond ±65504 became ±Inf in the cast. Say so (the
    checkpoint is fine; the dtype is not), rather than let a later check call the weights damaged."""
    for name, p in model.named_parameters():
        if p.dtype == torch.float16 and not all_finite(p.detach()):
            raise CheckpointError(
                f"{what} {path}: {name} holds ±Inf/NaN once loaded in float16: its values exceed float16's range "
                "(±65504; or the file holds Inf/NaN). Use float32 or bfloat16 (CLI: --dtype bfloat16)"
            )


def check_loading_info(model: nn.Module, info: dict, path, *, expected_unexpected=(), what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` if transformers' loading ``info`` shows a tensor missing, unexpected or
    mismatched (see :func:`load_causal_lm` for what is allowed)."""
    raw_missing = set(info.get("missing_keys") or ())
    missing = sorted(k for k in raw_missing if not _tied(model, k, raw_missing))
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not any(re.search(p, k) for p in expected_unexpected))
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    errors = [str(e).splitlines()[0] for e in info.get("error_msgs") or ()]
    if mismatched:
        name, found, wanted = mismatched[0][:3]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"{what} {path} does not match its config.json: tensor {name} has shape {tuple(found)} in the weights but "
            f"the config implies {tuple(wanted)}{more}; config.json was edited or belongs to another model. Restore "
            "the config that came with the weights (nothing was written)"
        )
    if missing and unexpected:
        raise CheckpointError(
            f"{what} {path} lacks {len(missing)} tensor(s) its config.json needs ({_few(missing)}) and holds "
            f"{len(unexpected)} it does not use ({_few(unexpected)}); transformers would fill the missing ones with "
            "random values. The weights are of another layout than config.json describes (a packed export whose "
            "quantization_config was removed?): restore the config that came with the weights (nothing was written)"
        )
    if missing:
        raise CheckpointError(
            f"{what} {path} lacks {len(missing)} tensor(s) its config.json needs ({_few(missing)}); transformers would "
            "fill them with random values. The checkpoint is incomplete (a shard or tensor lost) or config.json was "
            "edited (e.g. num_hidden_layers): copy the complete folder again (nothing was written)"
        )
    if unexpected:
        raise CheckpointError(
            f"{what} {path} holds {len(unexpected)} tensor(s) its model does not use ({_few(unexpected)}); the weights "
            "belong to another configuration or format (a packed export whose quantization_config was removed from "
            "config.json?). Restore the original config.json or re-save the model (nothing was written)"
        )
    if errors:
        raise CheckpointError(f"{what} {path} cannot be loaded: {errors[0]}; re-save or re-download it (nothing was written)")


def check_layer_count(path: str | os.PathLike, config, what: str = "checkpoint", shapes: dict | None = None) -> None:
    """config.json's ``num_hidden_layers`` against the layer indices the weights hold (``...layers.<i>....``, from the
    safetensors headers; ``shapes`` if already read): a config claiming more layers than any stored tensor names is
    refused at once — call it before building any skeleton from the config (a meta model of 10**6 layers alone takes
    minutes). More stored layers than the config names is left to the loading info (unexpected tensors)."""
    if shapes is None:
        shapes = header_shapes(Path(path))
    n = getattr(config.get_text_config(), "num_hidden_layers", None)
    stored = {int(m.group(1)) for name in shapes for m in [_LAYER.search(name)] if m}
    if isinstance(n, int) and not isinstance(n, bool) and stored and n > max(stored) + 1:
        raise CheckpointError(
            f"{what} {path} lacks layers {max(stored) + 1}..{n - 1}: config.json says num_hidden_layers={n} but the weights "
            f"hold layers 0..{max(stored)} only; "
            "the checkpoint is incomplete or config.json was edited: copy the complete folder again (nothing was written)"
        )


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SIZE_SLACK = 64  # a packed 4-bit export holds 8 codes per int32 element: a dense model may be ~8x its stored numel


def check_dims_against_headers(path: Path, model_cls, what: str = "checkpoint") -> None:
    """config.json's dims against the weights' shapes from the safetensors headers, before anything is allocated.

    The model is built on the meta device (no memory); a tensor stored under the same name with another shape, or
    a model far larger than every stored value could fill (``hidden_size`` edited to 10**6), is refused. Names that
    differ (packed exports, per-expert MoE files, legacy prefixes) are left to the loading info of the real load.
    """
    from transformers import AutoConfig

    shapes = header_shapes(path)
    if not shapes:
        return  # no safetensors (pytorch_model.bin): transformers' loading info is the check
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # a config transformers cannot read: from_pretrained reports it in its own words
        logger.debug("no config for %s (%s): relying on the loading info", path, e)
        return
    check_layer_count(path, config, what, shapes)  # before a meta skeleton of num_hidden_layers=10**6 is built
    try:
        with torch.device("meta"):
            skeleton = model_cls.from_config(config) if hasattr(model_cls, "_model_mapping") else model_cls._from_config(config)
    except Exception as e:  # a config the class cannot build: from_pretrained reports it in its own words
        logger.debug("no meta skeleton for %s (%s): relying on the loading info", path, e)
        return
    expected = skeleton.state_dict()
    for name, t in expected.items():
        if name in shapes and tuple(t.shape) != shapes[name]:
            raise CheckpointError(
                f"{what} {path} does not match its config.json: tensor {name} has shape {shapes[name]} in the weights but "
                f"the config implies {tuple(t.shape)}; config.json was edited or belongs to another model. Restore the "
                "config that came with the weights (nothing was written)"
            )
    wanted = sum(t.numel() for t in {id(t): t for t in expected.values()}.values())
    stored = sum(_numel(s) for s in shapes.values())
    if wanted > _SIZE_SLACK * stored + (1 << 20):
        raise CheckpointError(
            f"{what} {path}: config.json describes a model of {wanted:,} values but the weights hold {stored:,}; its dims "
            "(hidden_size, intermediate_size, num_hidden_layers, vocab_size) do not fit the weights. Restore the config "
            "that came with the weights (nothing was loaded)"
        )


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _tied(model: nn.Module, key: str, missing: set) -> bool:
    """True if ``key`` is a tied alias: its tensor shares storage with a state-dict entry that was loaded."""
    state = model.state_dict(keep_vars=True)
    t = state.get(key)
    if t is None or not t.numel():
        return False
    return any(other not in missing and v.numel() and v.data_ptr() == t.data_ptr() for other, v in state.items())


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            logger.debug("transformers' load report (checked by rolora_plugin.io.loading): %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _quiet_load_report():
    """transformers' multi-line "LOAD REPORT" warning is replaced by our one-line error (or nothing, when allowed)."""
    target = logging.getLogger("transformers.modeling_utils")
    flt = _DropLoadReport()
    target.addFilter(flt)
    try:
        yield
    finally:
        target.removeFilter(flt)
