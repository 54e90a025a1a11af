"""rotate_checkpoint reads each input tensor once: the value checks, the base fingerprint and the record's norm_rms
come from the read that feeds the rotation; a refusal in that pass (after shards were written to the staging
folder) publishes nothing and keeps what the user had at the output path."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from tests.core.test_streaming import OUT_SHARD, _ckpt, _nothing_written, _reference, _rewrite_tensor, _staging

from rolora_plugin import RotationConfig, RotationError
from rolora_plugin.rotate.fingerprint import weights_fingerprint
from rolora_plugin.io.safetensors_reader import _Checkpoint
from rolora_plugin.io.streaming import rotate_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _count_reads(monkeypatch) -> Counter:
    reads, read = Counter(), _Checkpoint.read

    def counting(self, name, cast=True):
        reads[name] += 1
        return read(self, name, cast)

    monkeypatch.setattr(_Checkpoint, "read", counting)
    return reads


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("r1", [True, False], ids=["r1", "no-r1"])
def test_each_input_tensor_is_read_once(tmp_path, monkeypatch, tie, r1):
    src = _ckpt(tmp_path, "llama", tie=tie)
    config = RotationConfig(r1=r1, r2=True, r4=True)
    reads = _count_reads(monkeypatch)
    record = rotate_checkpoint(src, tmp_path / "out", config, max_shard_bytes=OUT_SHARD, progress=False)
    monkeypatch.undo()
    stored = _Checkpoint(src, None)
    stored.close()
    twice = {"model.embed_tokens.weight": 2} if tie and r1 else {}  # the tied lm_head folded by R1: the unrotated embedding
    assert dict(reads) == {name: twice.get(name, 1) for name in stored.files}
    model, want = _reference(src, config, torch.float32)
    assert record == want  # base_fingerprint and norm_rms included
    assert record.base_fingerprint == weights_fingerprint(model.__class__.from_pretrained(src))  # the unrotated base
    assert (record.norm_rms is not None) == r1


def _written_shards(log: logging.Logger) -> list[str]:
    shards: list[str] = []

    class Handler(logging.Handler):
        def emit(self, rec):
            if rec.getMessage().startswith("wrote shard"):
                shards.append(rec.getMessage())

    log.addHandler(Handler())
    return shards


@pytest.mark.parametrize("bad", ["nan", "overflow-fp16"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new-output", "overwrite"])
def test_a_bad_tensor_late_in_the_pass_publishes_nothing_and_keeps_the_output(tmp_path, bad, overwrite):
    src = _ckpt(tmp_path, "llama", tie=False)
    name = "lm_head.weight"  # read in the last unit: output shards are already staged when it is refused
    value = float("nan") if bad == "nan" else 1e6  # 1e6: finite in float32, beyond float16's range
    _rewrite_tensor(src, name, lambda t: t.index_put((torch.tensor([2]), torch.tensor([7])), torch.tensor(value)))
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    log = logging.getLogger("rolora_plugin.io.streaming")
    handlers, level = list(log.handlers), log.level
    log.setLevel(logging.INFO)
    shards = _written_shards(log)
    dtype = torch.float16 if bad == "overflow-fp16" else None
    message = "NaN or Inf" if bad == "nan" else "beyond float16's range"
    try:
        with pytest.raises(RotationError, match=f"{name} .*{message}"):
            rotate_checkpoint(src, out, max_shard_bytes=OUT_SHARD, overwrite=overwrite, dtype=dtype, progress=False)
    finally:
        log.handlers[:] = handlers
        log.setLevel(level)
    assert len(shards) >= 2  # the refusal came midway, after staged writes
    if overwrite:
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
        assert not _staging(tmp_path)
    else:
        _nothing_written(out)
    assert not list(Path(tmp_path).glob(".out*"))


def test_prefetch_requests_cover_each_tensor_in_chunks_the_kernel_honours(tmp_path, monkeypatch):
    """Linux caps one WILLNEED at the device's read-ahead size: one request per tensor would prefetch its start only."""
    import os

    from rolora_plugin.io import safetensors_reader

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    src = _ckpt(tmp_path, "llama", tie=False, shard="10MB")
    ckpt = _Checkpoint(src, None)
    calls = []
    monkeypatch.setattr(safetensors_reader, "PREFETCH_CHUNK", 4096)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice)))
    name = max(ckpt.files, key=lambda n: ckpt.ranges[n][1] - ckpt.ranges[n][0])
    try:
        ckpt.prefetch([name])
    finally:
        ckpt.close()
    start, stop = ckpt.ranges[name]
    assert stop - start > 4 * 4096  # several chunks
    assert all(advice == os.POSIX_FADV_WILLNEED and 0 < length <= 4096 for _, length, advice in calls)
    covered = sorted((offset, offset + length) for offset, length, _ in calls)
    assert covered[0][0] == start and covered[-1][1] == stop
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # contiguous, no gap
