"""Process set-up of the ``rolora`` command: offline environment, logging, known noise, signals.

* :func:`set_offline_environment` runs first in :func:`rolora_plugin.app.cli.main`, before anything imports
  ``huggingface_hub``/``transformers`` (they read ``HF_HUB_OFFLINE`` once, at import): the CLI works on local
  folders only, so a missing file is an error, never a network request. A value the user set is kept.
* :func:`filter_known_noise` silences messages that are known and harmless for this tool, each matched by its
  logger or module *and* its text (nothing else is hidden): peft's ``is_gradient_checkpointing`` FutureWarning,
  DeepSpeed's "Setting accelerator to CPU" line (printed on stdout).
* :func:`session` wraps a subcommand: SIGTERM is handled like SIGINT (:class:`Terminated` unwinds the stack, so
  every staging folder is removed by its ``finally``), and log records go through ``tqdm.write`` so they never
  land on a progress-bar line (``tqdm.contrib.logging.logging_redirect_tqdm``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import warnings
from collections.abc import Iterator

__all__ = [
    "OFFLINE_ENV",
    "MessageFilter",
    "Terminated",
    "filter_known_noise",
    "filtered_logs",
    "session",
    "set_offline_environment",
    "setup_logging",
]

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
NOISY_LOGGERS = ("transformers", "datasets", "lm_eval", "urllib3", "filelock", "matplotlib", "httpx")
# (logger name, message regex matched from the start) of log records known to be harmless here
_KNOWN_LOG_NOISE = (("DeepSpeed", r"Setting accelerator to CPU"),)
# (message regex, category, module regex) of warnings known to be harmless here
_KNOWN_WARNINGS = ((r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (like KeyboardInterrupt for SIGINT)."""


def set_offline_environment() -> None:
    """``HF_HUB_OFFLINE=1`` etc. unless the user set them; must run before any Hugging Face import."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def setup_logging(verbose: bool, quiet: bool, hf: bool = True) -> None:
    """Root logging at DEBUG (``-v``), WARNING (``-q``) or INFO; third-party loggers at WARNING at most.

    ``hf``: route transformers' own log records through the root handler (so they are redirected around
    progress bars too) and, with ``quiet``, turn its progress bars off. Imports transformers: call it after
    :func:`set_offline_environment`.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if hf:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        if quiet:
            hf_logging.disable_progress_bar()


class MessageFilter(logging.Filter):
    """Drops the records whose message matches ``pattern`` (``re.match``: from the start); keeps all others."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


@contextlib.contextmanager
def filtered_logs(rules: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """While the block runs, drop records of logger ``name`` whose message matches ``pattern``, per rule."""
    installed = [(logging.getLogger(name), MessageFilter(pattern)) for name, pattern in rules]
    for log, f in installed:
        log.addFilter(f)
    try:
        yield
    finally:
        for log, f in installed:
            log.removeFilter(f)


def filter_known_noise() -> None:
    """Install the narrow filters of the module doc for the rest of the process (idempotent)."""
    for message, category, module in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, pattern in _KNOWN_LOG_NOISE:
        log = logging.getLogger(name)
        if not any(isinstance(f, MessageFilter) and f.pattern.pattern == pattern for f in log.filters):
            log.addFilter(MessageFilter(pattern))


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def session() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated`; console log records are written with ``tqdm.write``."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    console = any(_is_console(h) for h in logging.getLogger().handlers)
    with _sigterm_as_exception(), logging_redirect_tqdm() if console else contextlib.nullcontext():
        yield


def _is_console(handler: logging.Handler) -> bool:
    """A handler writing to the terminal streams (what ``logging_redirect_tqdm`` replaces); others are left alone."""
    import sys

    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)
