"""Thin host glue (no maths): each submodule adapts rolora-plugin to one host and undoes every patch it makes.

* :mod:`rolora_plugin.integrations.deepspeed`: cross-rank agreement check (ZeRO-2/3, DDP); imports only
  ``torch.distributed``.
* :mod:`rolora_plugin.integrations.axolotl`: ``RoLoRAPlugin`` and its pydantic ``RoLoRAArgs``; imported by Axolotl
  only (load it as ``plugins: [rolora.RoLoRAPlugin]``).

Nothing here is imported by ``import rolora_plugin``.
"""
