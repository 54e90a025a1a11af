"""The module paths before the layer folders import for one release: the same module object as the new path (so a
monkeypatch through either reaches the code), with a DeprecationWarning that names the new path."""

from __future__ import annotations

import subprocess
import sys

from rolora_plugin._moved import LAZY, MOVED


def _run(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_every_old_path_is_the_new_module_and_warns():
    code = f"""
import importlib, sys, warnings
warnings.simplefilter("always")
for old, new in {MOVED!r}.items():
    with warnings.catch_warnings(record=True) as caught:
        module = importlib.import_module(old)
    assert module is importlib.import_module(new), old
    assert module.__name__ == new and module.__spec__.name == new, (old, module.__spec__.name)
    msgs = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(old in m and new in m for m in msgs), (old, msgs)
print("ok", len({MOVED!r}))
"""
    assert _run(code).split() == ["ok", str(len(MOVED))]


def test_from_imports_through_an_old_path():
    out = _run(
        "import warnings; warnings.simplefilter('ignore')\n"
        "from rolora_plugin.export import load_rotated\n"
        "from rolora_plugin import rotation\n"
        "import rolora_plugin.io.export as e, rolora_plugin.rotate.rotation as r\n"
        "print(load_rotated is e.load_rotated, rotation is r)"
    )
    assert out.split() == ["True", "True"]


def test_lazy_alias_imports_no_host_until_a_name_is_used():
    for old, new in LAZY.items():
        out = _run(
            "import sys, warnings; warnings.simplefilter('ignore')\n"
            f"import {old} as m\n"
            "before = 'transformers' in sys.modules\n"
            f"cb = m.RoLoRACallback\n"
            f"import {new} as n\n"
            "print(before, cb is n.RoLoRACallback)"
        )
        assert out.split() == ["False", "True"]


def test_new_paths_import_without_a_warning():
    out = _run(
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "import rolora_plugin, rolora_plugin.io.export, rolora_plugin.rotate.rotation, rolora_plugin.hadamard, rolora_plugin.lora\n"
        "print('ok')"
    )
    assert out.split() == ["ok"]
