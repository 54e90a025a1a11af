"""Tiny saved models and a character-level tokenizer for the CLI tests (no downloads)."""

from __future__ import annotations

import string
from pathlib import Path

from tests.helpers import tiny_model

__all__ = ["char_tokenizer", "save_tiny"]


def char_tokenizer():
    """A character-level fast tokenizer (< 101 ids, the tiny models' vocab); no downloads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.ascii_letters + string.digits + " .,;:!?'\"()-\n":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny(path: Path, family: str = "llama", **kw) -> Path:
    model = tiny_model(family, **kw)
    model.config.max_position_embeddings = 2048  # room for lm-eval's character-level contexts (default RoPE: no effect)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
