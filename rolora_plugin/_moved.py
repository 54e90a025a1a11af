"""One-release aliases for the module paths the regroup into layer folders changed.

``import rolora_plugin.rotation`` (and ``from rolora_plugin.export import load_rotated``, and
``from rolora_plugin import rotation``) still work: a finder at the front of ``sys.meta_path`` answers the old name
with the new module itself — the same object, so a monkeypatch through the old path reaches the code — and warns
once with the new path. ``rolora_plugin.hadamard`` and ``rolora_plugin.lora`` are packages now that re-export
what the modules exported, so they need no alias. Remove this file in the release after next.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {
    "rolora_plugin.sylvester": "rolora_plugin.hadamard.sylvester",
    "rolora_plugin.edits": "rolora_plugin.hadamard.edits",
    "rolora_plugin.kernels": "rolora_plugin.hadamard.kernels",
    "rolora_plugin.kernels.triton_hadamard": "rolora_plugin.hadamard.kernels.triton_hadamard",
    "rolora_plugin.architectures": "rolora_plugin.model.architectures",
    "rolora_plugin.online": "rolora_plugin.model.online",
    "rolora_plugin.rotation": "rolora_plugin.rotate.rotation",
    "rolora_plugin.moe": "rolora_plugin.rotate.moe",
    "rolora_plugin.learned": "rolora_plugin.rotate.learned",
    "rolora_plugin.fingerprint": "rolora_plugin.rotate.fingerprint",
    "rolora_plugin.training_config": "rolora_plugin.lora.config",
    "rolora_plugin.monitor": "rolora_plugin.lora.monitor",
    "rolora_plugin.kurtosis": "rolora_plugin.lora.kurtosis",
    "rolora_plugin.loading": "rolora_plugin.io.loading",
    "rolora_plugin.safetensors_reader": "rolora_plugin.io.safetensors_reader",
    "rolora_plugin.publish": "rolora_plugin.io.publish",
    "rolora_plugin.records": "rolora_plugin.io.records",
    "rolora_plugin.export": "rolora_plugin.io.export",
    "rolora_plugin.compressed": "rolora_plugin.io.compressed",
    "rolora_plugin.transform_config": "rolora_plugin.io.transform_config",
    "rolora_plugin.streaming": "rolora_plugin.io.streaming",
    "rolora_plugin.check": "rolora_plugin.io.check",
}
# old modules whose names resolve on first access, so importing them imports no host framework
LAZY = {"rolora_plugin.callbacks": "rolora_plugin.integrations.hf_trainer"}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED and fullname not in LAZY:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED.get(spec.name) or LAZY[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path is kept for one release, import the new one", DeprecationWarning, stacklevel=2)
        if spec.name in LAZY:
            return _lazy(spec.name, new)
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        """The module is the new one, already executed; the import system has just set its ``__spec__`` to the
        alias's, so give it back its own."""
        if module.__spec__.name in self._specs:
            module.__spec__ = self._specs.pop(module.__spec__.name)


def _lazy(old: str, new: str) -> types.ModuleType:
    """A module ``old`` whose attributes are ``new``'s, imported on first access."""
    module = types.ModuleType(old, f"Deprecated alias of :mod:`{new}` (names resolve on first access).")

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(new), name)

    module.__getattr__ = __getattr__
    return module


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before the path finder: a submodule of an aliased package is ours too
