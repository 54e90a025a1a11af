"""Entry-point target of ``[project.entry-points."axolotl.plugins"] rolora = "rolora.plugin:RoLoRAPlugin"``."""

from rolora_plugin.integrations.axolotl.plugin import RoLoRAPlugin

__all__ = ["RoLoRAPlugin"]
