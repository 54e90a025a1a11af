"""Short import path for Axolotl: ``plugins: [rolora.RoLoRAPlugin]``.

Axolotl's plugin loader needs ``module.Class`` (it splits the name at the last dot), so a bare ``rolora`` in
``plugins:`` cannot load in any released Axolotl; ``rolora.RoLoRAPlugin`` resolves here. Axolotl >= 0.21 also
finds the plugin through the ``axolotl.plugins`` entry point ``rolora = "rolora.plugin:RoLoRAPlugin"``.
The implementation lives in :mod:`rolora_plugin.integrations.axolotl`; importing ``rolora`` does not import
Axolotl until ``RoLoRAPlugin`` is accessed.
"""

__all__ = ["RoLoRAPlugin"]


def __getattr__(name: str):
    if name == "RoLoRAPlugin":
        from .plugin import RoLoRAPlugin

        return RoLoRAPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
