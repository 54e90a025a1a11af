"""The plugin manager: built-in hooks plus every ``rolora`` entry point installed in the environment."""

from __future__ import annotations

import logging
import threading

import pluggy

from . import hookspecs

__all__ = ["get_plugin_manager", "reset_plugin_manager", "add_reset_callback", "ENTRY_POINT_GROUP"]

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "rolora"
DEFAULT_PLUGINS = ("rolora_plugin.model.architectures",)

_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None
_reset_callbacks: list = []


def add_reset_callback(fn) -> None:
    """Register ``fn()`` to run on :func:`reset_plugin_manager`: modules that cache what hooks returned (the
    architecture table, constructed Hadamard matrices) register their cache's ``cache_clear`` here, so the
    plugin manager never reaches into other modules' private state."""
    if fn not in _reset_callbacks:
        _reset_callbacks.append(fn)


def _build() -> pluggy.PluginManager:
    import importlib

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    n = pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    if n:
        logger.info("loaded %d rolora plugin(s) from entry points: %s", n, [name for name, _ in pm.list_name_plugin()])
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    global _pm
    with _lock:
        if _pm is None:
            _pm = _build()
        return _pm


def reset_plugin_manager() -> None:
    """Forget the plugin manager so the next call re-reads entry points (tests, newly installed plugins)."""
    global _pm
    with _lock:
        _pm = None
    for fn in list(_reset_callbacks):
        fn()
