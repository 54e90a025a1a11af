"""The Sylvester Hadamard matrix: the leaf construction both :mod:`rolora_plugin.hadamard` and the accelerator
kernels (:mod:`rolora_plugin.hadamard.kernels`) build on, kept in its own module so neither imports the other."""

from __future__ import annotations

import torch

__all__ = ["sylvester"]


def sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order ``n = 2^k`` (symmetric, ±1 entries, float64)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h
