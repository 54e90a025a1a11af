"""Block-diagonal Hadamard rotations (``RotationConfig(block_size=b)``): R1 = diag(±1)·(I ⊗ H_b), R4 = I ⊗ H_b."""

import math

import pytest
import torch
from tests.helpers import logits, random_ids, rel_err, tiny_model

from rolora_plugin import RotationConfig, RotationError, get_rotation_record, rotate_model_
from rolora_plugin.hadamard.transform import build_block_transform, hadamard_transform_ref


def _sylvester(b):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n, b", [(64, 16), (96, 32), (32, 32)])
@pytest.mark.parametrize("signs", [False, True])
def test_block_transform_is_the_float64_block_diagonal_hadamard(n, b, signs):
    t = build_block_transform(n, b, random_signs=signs, seed=3)
    ref = torch.kron(torch.eye(n // b, dtype=torch.float64), _sylvester(b)) / math.sqrt(b)
    if signs:
        ref = torch.diag(t.signs) @ ref
    torch.testing.assert_close(t.matrix(torch.float64), ref, rtol=0, atol=1e-15)
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(t.apply(x), x @ ref, rtol=0, atol=1e-12)


def test_block_rotation_is_exact_and_recorded(tmp_path):
    model = tiny_model("llama")
    ids = random_ids()
    ref = logits(model, ids)
    rotate_model_(model, RotationConfig(r2=True, block_size=16), progress=False)
    assert rel_err(logits(model, ids), ref) <= 1e-5
    record = get_rotation_record(model)
    assert record.config.block_size == 16 and record.rotations["r1"]["description"] == "diag(±1)·identity4⊗sylvester16"
    assert record.verify()["r4"].pow2 == 16


def test_bad_block_sizes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        RotationConfig(block_size=24)
    with pytest.raises(ValueError, match="learned rotations are dense"):
        RotationConfig(block_size=16, learn=("r1",))
    with pytest.raises(RotationError, match="does not divide"):
        rotate_model_(tiny_model("llama"), RotationConfig(block_size=256), progress=False)
