"""Loss and perplexity of a causal LM: the one implementation the monitor, the CLI, the demo and benchmarks share.

All functions run under ``torch.no_grad()`` in eval mode (the previous mode is restored), on the model's device,
and reduce logits in at least float32 (float64 is kept). Labels follow Hugging Face's convention: position ``t``
predicts token ``t + 1``; label ``-100`` is ignored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["eval_mode", "as_batch", "nll_sum", "mean_loss", "perplexity", "batches_perplexity"]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` inside the block; the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def nll_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask=None) -> tuple[float, int]:
    """Summed next-token NLL over the predicted positions of one batch and how many there were.

    ``input_ids`` (batch, seq); ``labels`` default to ``input_ids`` (every next token counts); ``-100`` is ignored.
    """
    labels = input_ids if labels is None else labels
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 up, float64 kept
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return nll.item(), int((targets != -100).sum())


def as_batch(batch, device) -> dict:
    """A batch (dict of tensors, or an ``input_ids`` tensor) as a dict of its tensors moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    return {k: v.to(device) for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}


def _totals(model: torch.nn.Module, batches: Iterable, progress: bool, desc: str, rows: int | None = None) -> tuple[float, int]:
    """Summed NLL and predicted-token count; the bar counts sequences (``rows`` in all, when known), not batches."""
    device = _device(model)
    total, count = 0.0, 0
    with eval_mode(model), tqdm(total=rows, desc=desc, unit="seq", disable=not progress) as bar:
        for batch in batches:
            b = as_batch(batch, device)
            nll, n = nll_sum(model, b["input_ids"], b.get("labels"), b.get("attention_mask"))
            total, count = total + nll, count + n
            bar.update(b["input_ids"].shape[0])
    if count == 0:
        raise ValueError("no predicted tokens to evaluate: every label is -100 or every sequence has length 1")
    return total, count


def mean_loss(model: torch.nn.Module, batches: Iterable, *, progress: bool = False) -> float:
    """Token-weighted mean next-token NLL over ``batches`` (dicts with ``input_ids``, optional ``labels`` /
    ``attention_mask``, or ``input_ids`` tensors)."""
    total, count = _totals(model, batches, progress, "loss")
    return total / count


def batches_perplexity(model: torch.nn.Module, batches: Iterable, *, progress: bool = False) -> float:
    """``exp(mean_loss)``: perplexity of the labelled tokens of ``batches`` (e.g. response tokens only)."""
    return math.exp(mean_loss(model, batches, progress=progress))


def perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """``exp(mean NLL)`` of a causal LM over every next-token prediction in ``chunks``.

    ``chunks``: LongTensor ``(n_chunks, seq_len)`` of full rows (no padding); each row contributes
    ``seq_len - 1`` predictions. Equals ``exp(model(chunks, labels=chunks).loss)`` up to float rounding.
    """
    if not isinstance(chunks, torch.Tensor) or chunks.ndim != 2 or chunks.shape[1] < 2 or chunks.dtype != torch.long:
        got = f"{chunks.dtype} {tuple(chunks.shape)}" if isinstance(chunks, torch.Tensor) else type(chunks).__name__
        raise ValueError(f"chunks must be a LongTensor (n_chunks, seq_len >= 2), got {got}")
    if chunks.shape[0] == 0:
        raise ValueError("chunks is empty: nothing to evaluate")
    total, count = _totals(model, chunks.split(batch_size), progress, "perplexity", rows=chunks.shape[0])
    return math.exp(total / count)
