"""Shared test helpers: tiny random models of every built-in family (built in the tests, no downloads), peft LoRA
with a non-zero B, logits and relative errors. Import as ``from tests.helpers import ...``."""

from __future__ import annotations

import contextlib

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")

# One tolerance table per dtype: relative error allowed for an orthogonal transform vs its float64 reference.
TRANSFORM_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}


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
        "gemma": tf.GemmaConfig,
    }[family]
    if family in ("qwen3", "gemma"):
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


def logits(model, ids) -> torch.Tensor:
    """``model(input_ids=ids).logits`` without gradients."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def lora(model, targets="all-linear", *, r=4, alpha=8, nonzero=True, **kw):
    """``peft.get_peft_model`` with a LoRA config; ``nonzero`` draws B ≠ 0 (``init_lora_weights=False``) so the
    LoRA branch really contributes."""
    from peft import LoraConfig, get_peft_model

    if nonzero:
        kw.setdefault("init_lora_weights", False)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw))


# float64 models with float64 norms: the rotation is exact to rounding (stock HF RMSNorm computes in float32)
F64_NORM_RTOL = 1e-12


@contextlib.contextmanager
def float64_norms(model):
    """Make every RMSNorm of the model compute in its input dtype (float64) instead of float32."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gemma_forward(self, x):  # Gemma's (1 + w) RMSNorm, eps attribute named `eps`
        return (1.0 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    classes = {type(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    saved = {c: c.forward for c in classes}
    for c in classes:
        c.forward = gemma_forward if c.__name__.startswith("Gemma") else forward
    try:
        yield
    finally:
        for c, f in saved.items():
            c.forward = f


def tiny_llava(text_family: str = "llama", *, dtype=torch.float32, seed=0, **kw):
    """A tiny LLaVA (CLIP vision tower, 2-layer projector, a tiny text family as language tower) with random weights;
    returns ``(model, input_ids, pixel_values)`` where the ids hold one image's worth of image tokens."""
    import transformers as tf

    text = tiny_model(text_family, seed=seed, **kw).config
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8, projection_dim=32)  # fmt: skip
    image_token = text.vocab_size - 1
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token, projector_hidden_act="gelu",
                         vision_feature_layer=-1, vision_feature_select_strategy="default")  # fmt: skip
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and "norm" in name:
                p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    n_image = (32 // 8) ** 2  # "default" strategy drops CLS: one token per patch
    ids = random_ids(vocab=image_token, batch=2, seq=24, seed=seed)
    ids[:, 3 : 3 + n_image] = image_token
    pixels = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64).to(dtype)
    return model, ids, pixels
