"""Write the tiny local assets ``rolora.yml`` trains on: a random Llama with its own tokenizer, and a JSONL dataset.

Offline and fast (seconds on CPU): nothing is downloaded. Run it in the directory you will train from::

    python examples/axolotl/make_tiny_assets.py            # -> ./tiny-llama/, ./tiny-data.jsonl
    axolotl train examples/axolotl/rolora.yml --launcher python

The model has tied embeddings and non-trivial RMSNorm weights, so untying and norm folding are exercised. The
tokenizer is a byte-level BPE trained on the dataset itself. Swap ``base_model`` in the YAML for a real local
model directory (e.g. SmolLM2-135M saved with ``save_pretrained``) and ``datasets`` for real data to go beyond a
smoke test.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SUBJECTS = ("the cat", "a dog", "the model", "my friend", "the river", "a small bird", "the teacher", "our team")
VERBS = ("sees", "likes", "follows", "finds", "rotates", "carries", "counts", "paints")
OBJECTS = ("the ball", "a red box", "the moon", "two apples", "the matrix", "an old map", "the song", "a green tree")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}" for _ in range(rng.randint(2, 4))]
        out.append(". ".join(p.capitalize() for p in parts) + ".")
    return out


def write_dataset(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def make_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_model(vocab_size: int, tokenizer, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="write ./tiny-llama and ./tiny-data.jsonl for examples/axolotl/rolora.yml")
    p.add_argument("out", nargs="?", default=".", help="directory to write into (default: current directory)")
    p.add_argument("--samples", type=int, default=64)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = sentences(a.samples)
    write_dataset(out / "tiny-data.jsonl", texts)
    tokenizer = make_tokenizer(texts)
    make_model(len(tokenizer), tokenizer).save_pretrained(out / "tiny-llama")
    tokenizer.save_pretrained(out / "tiny-llama")


if __name__ == "__main__":
    main()
