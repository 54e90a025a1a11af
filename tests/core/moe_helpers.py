"""Tiny random Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) built in the tests, no downloads.

Widths are chosen so every rotation has its own size: hidden 64, head_dim 16, dense MLP 96, expert 32 (Qwen) or
48 (Mixtral/OLMoE, whose experts use ``intermediate_size``), shared expert 80 (Qwen2-MoE). Qwen2-MoE's layer 1 is a
dense MLP (``mlp_only_layers``) so a mixed model is covered too.
"""

from __future__ import annotations

import copy
import functools

import torch

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_moe_config(family: str, *, experts=4, top_k=2, layers=2, vocab=101, impl="batched_mm"):
    import transformers as tf

    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=layers,
                  vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, num_experts_per_tok=top_k)  # fmt: skip
    if family == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=48, num_local_experts=experts, **common)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=80,
                                num_experts=experts, decoder_sparse_step=1, mlp_only_layers=[1], **common)  # fmt: skip
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=experts, head_dim=16, **common)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(intermediate_size=48, num_experts=experts, **common)
    else:
        raise ValueError(f"unknown MoE family {family!r}; choose from {MOE_FAMILIES}")
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = impl
    return cfg


def tiny_moe(family: str = "mixtral", *, dtype=torch.float32, seed=0, impl="batched_mm", **kw):
    """A tiny MoE causal LM with random weights, router, experts and non-trivial norm weights (a fresh copy of a
    cached build, so parametrized tests do not pay for construction each time).

    ``impl`` is the experts implementation (``batched_mm`` works in every dtype, ``grouped_mm`` not in float64).
    """
    return copy.deepcopy(_build(family, dtype, seed, impl, tuple(sorted(kw.items()))))


@functools.lru_cache(maxsize=32)
def _build(family, dtype, seed, impl, kw):
    from transformers import AutoModelForCausalLM

    kw = dict(kw)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, impl=impl, **kw)).to(dtype).eval()
    model.set_experts_implementation(impl)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            elif "experts" in name or name.endswith("gate.weight"):  # std 0.02 init: make routing decisive
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model
