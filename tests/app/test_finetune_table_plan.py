"""What ``benchmarks/finetune_table.py`` plans to run for a command line (no training here)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _finetune as ft  # noqa: E402
import finetune_table  # noqa: E402


def _plan(*argv):
    return finetune_table.planned(finetune_table.parse_args(list(argv)))


def test_quick_is_the_four_methods_on_one_seed_at_the_small_size():
    runs = _plan("--quick")
    assert [s.method for s in runs] == ["lora", "rolora", "lora-qat", "rolora-qat"]
    assert {(s.targets, s.seed, s.steps, s.task_limit) for s in runs} == {("qv", 0, 20, 10)}


def test_quick_still_takes_any_method_and_the_full_table_keeps_the_control():
    assert [s.method for s in _plan("--quick", "--only", "lora-posthoc")] == ["lora-posthoc"]
    full = _plan()
    assert {s.method for s in full} == set(ft.DEFAULT_METHODS) and "lora-posthoc" in ft.DEFAULT_METHODS
    assert {(s.targets, s.seed) for s in full} == {(t, k) for t in ("qv", "all-linear") for k in (0, 1, 2)}
    assert {s.steps for s in full} == {200} and {s.task_limit for s in full} == {ft.docs_for_stderr(0.015, 7)}
