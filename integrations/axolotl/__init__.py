"""Axolotl integration: :class:`RoLoRAArgs` (``args.py``, pydantic only) and :class:`RoLoRAPlugin` (``plugin.py``).

``plugin.py`` imports axolotl, so it is loaded lazily: ``import rolora_plugin.integrations.axolotl`` works without
Axolotl installed, and ``RoLoRAPlugin`` is imported on first access (by Axolotl, via ``rolora.RoLoRAPlugin``).
"""

__all__ = ["RoLoRAArgs", "RoLoRAPlugin"]


def __getattr__(name: str):
    if name == "RoLoRAPlugin":
        from .plugin import RoLoRAPlugin

        return RoLoRAPlugin
    if name == "RoLoRAArgs":
        from .args import RoLoRAArgs

        return RoLoRAArgs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
