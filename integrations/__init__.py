"""Thin host glue (no maths): each submodule adapts rolora-plugin to one host and undoes its patches.

* :mod:`rolora_plugin.integrations.hf_trainer`: ``RoLoRACallback`` (a ``transformers.TrainerCallback``) and
  ``add_rolora_callback``; imports transformers (``rolora_plugin.RoLoRACallback`` resolves there lazily). The
  monitor maths it logs is in the core, :mod:`rolora_plugin.lora.monitor`.
  TRL's ``SFTTrainer`` is a ``Trainer``: the same callback (``examples/trl/sft_rolora.py``).
* :mod:`rolora_plugin.integrations.deepspeed`: cross-rank agreement check (ZeRO-2/3, DDP, FSDP2) and the
  collective merged export of sharded models (ZeRO-3 partitions, FSDP2 DTensors); imports only
  ``torch.distributed`` at module level.
* :mod:`rolora_plugin.integrations.axolotl`: ``RoLoRAPlugin`` and its pydantic ``RoLoRAArgs``; imported by Axolotl
  only (found through the ``axolotl.plugins`` entry point by Axolotl >= 0.21, or ``plugins: [rolora.RoLoRAPlugin]``).

The folder is top-level in the repository (``integrations/``) and packaged as ``rolora_plugin.integrations``.
Nothing here is imported by ``import rolora_plugin``.
"""
