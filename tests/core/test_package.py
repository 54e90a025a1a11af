import subprocess
import sys

import rolora_plugin


def test_import_is_light():
    """`import rolora_plugin` must not import host frameworks (they are imported when first needed)."""
    code = "import sys, rolora_plugin; print(sorted(m for m in ('transformers','peft','accelerate','deepspeed','axolotl','lm_eval') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_public_api_resolves():
    for name in rolora_plugin.__all__:
        assert getattr(rolora_plugin, name) is not None, name
    from transformers import TrainerCallback

    assert issubclass(rolora_plugin.RoLoRACallback, TrainerCallback)
