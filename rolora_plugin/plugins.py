"""The plugin manager: built-in hooks plus every ``rolora`` entry point installed in the environment."""

from __future__ import annotations

import logging
import threading

import pluggy

from . import hookspecs

__all__ = ["get_plugin_manager", "reset_plugin_manager", "ENTRY_POINT_GROUP"]

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "rolora"
DEFAULT_PLUGINS = ("rolora_plugin.architectures",)

_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None


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
    from .architectures import clear_architecture_cache
    from .hadamard import _construct

    clear_architecture_cache()
    _construct.cache_clear()
