"""rolora_plugin.rotate.fingerprint: the incremental Fingerprinter gives the value weights_fingerprint / fingerprint_tensors give.

The reference below is the fingerprint as it was computed before the Fingerprinter existed (sha256 over the sorted
names, shapes and 64 sampled values rounded to bfloat16), so a change of the stored value — which would make every
recorded base_fingerprint mismatch — fails here.
"""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
from tests.helpers import tiny_model

from rolora_plugin.rotate.fingerprint import SAMPLES_PER_TENSOR, Fingerprinter, fingerprint_tensors, weights_fingerprint


def _reference(named_tensors) -> str:
    h = hashlib.sha256()
    for name, p in sorted(named_tensors, key=lambda item: item[0]):
        flat = p.detach().reshape(-1)
        n = flat.numel()
        k = min(n, SAMPLES_PER_TENSOR)
        idx = [i * (n - 1) // max(k - 1, 1) for i in range(k)]
        values = flat[torch.tensor(idx, dtype=torch.int64)].to(torch.float32).to(torch.bfloat16)
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(values.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fingerprinter_in_any_order_equals_weights_fingerprint(dtype):
    model = tiny_model("llama", dtype=dtype, tie=True)
    params = list(model.named_parameters())
    expected = weights_fingerprint(model)
    assert expected == fingerprint_tensors(params) == _reference(params)
    for seed in range(3):
        order = params[:]
        random.Random(seed).shuffle(order)
        fingerprinter = Fingerprinter()
        for name, p in order:
            fingerprinter.take(name, p)
        assert len(fingerprinter) == len(params) and all(name in fingerprinter for name, _ in params)
        assert fingerprinter.hexdigest() == expected


def test_samples_are_copies_so_tensors_may_be_edited_after_take():
    """Streaming rotation samples each weight as it is read and then edits it in place."""
    model = tiny_model("qwen2", tie=False)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    expected = fingerprint_tensors(params.items())
    fingerprinter = Fingerprinter()
    for name, t in params.items():
        fingerprinter.take(name, t)
        t.mul_(-3.0).add_(1.0)  # the in-place edit right after the sample
    assert fingerprinter.hexdigest() == expected
    assert fingerprint_tensors(params.items()) != expected  # the edit does change what a later sample would see


def test_fingerprint_sees_names_shapes_and_values():
    a = torch.arange(200, dtype=torch.float32).reshape(10, 20)
    base = fingerprint_tensors([("w", a)])
    assert fingerprint_tensors([("v", a)]) != base
    assert fingerprint_tensors([("w", a.reshape(20, 10))]) != base
    b = a.clone()
    b[-1, -1] = -1.0  # the last element is always sampled
    assert fingerprint_tensors([("w", b)]) != base
    fingerprinter = Fingerprinter()
    fingerprinter.take("w", b)
    assert fingerprinter.hexdigest() == fingerprint_tensors([("w", b)]) == _reference([("w", b)])
