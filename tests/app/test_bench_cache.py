"""The benchmarks' per-run JSON cache (``benchmarks/_common.cached_json``): results are computed once per key, kept
where a later session finds them, and a concurrent writer never loses or corrupts a result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _common  # noqa: E402


def test_computed_once_then_read_back(tmp_path):
    calls = []

    def run():
        calls.append(1)
        return {"ppl": 12.5}

    key = {"recipe": "w4a4", "draw": 1}
    first = _common.cached_json(tmp_path, key, run)
    again = _common.cached_json(tmp_path, dict(reversed(list(key.items()))), run)  # key order does not matter
    assert calls == [1]
    assert first["ppl"] == again["ppl"] == 12.5 and again["key"] == key and again["machine"]
    (path,) = tmp_path.glob("*.json")
    assert json.loads(path.read_text())["ppl"] == 12.5
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".json"]  # no temporary left behind


def test_cached_only_runs_nothing(tmp_path):
    assert _common.cached_json(tmp_path, {"a": 1}, lambda: pytest.fail("must not run"), cached_only=True) is None
    assert not list(tmp_path.iterdir())


def test_a_result_written_first_by_another_process_wins(tmp_path):
    key = {"a": 2}

    def run_while_another_writes():
        # the other process finishes the same run while this one computes
        _common.cached_json(tmp_path, key, lambda: {"ppl": 1.0})
        return {"ppl": 2.0}

    assert _common.cached_json(tmp_path, key, run_while_another_writes)["ppl"] == 1.0
    assert _common.cached_json(tmp_path, key, lambda: pytest.fail("cached"))["ppl"] == 1.0


def test_results_dir_is_in_the_repository_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv("ROLORA_BENCH_RESULTS", raising=False)
    repo_results = Path(_common.__file__).resolve().parent / "results"
    assert _common.results_dir("learned_rotation") == repo_results / "learned_rotation"
    monkeypatch.setenv("ROLORA_BENCH_RESULTS", str(tmp_path))
    assert _common.results_dir("peer_llmcompressor") == tmp_path / "peer_llmcompressor"
