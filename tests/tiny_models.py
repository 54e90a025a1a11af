"""Tiny random decoder models of every built-in family, built in the tests (no downloads)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def tiny_config(family: str, *, hidden=64, intermediate=96, heads=4, kv_heads=1, layers=2, vocab=101, tie=True):
    import transformers as tf

    common = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cls = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
        "phi3": tf.Phi3Config,
    }[family]
    if family == "qwen3":
        common["head_dim"] = hidden // heads
    cfg = cls(**common)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(family: str = "llama", *, dtype=torch.float32, seed=0, perturb_norms=True, **kw):
    """A tiny causal LM with random weights, non-trivial norm weights and (where the family has them) biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw)).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and perturb_norms:
                p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def random_ids(vocab=101, batch=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)
