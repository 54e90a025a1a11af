"""The package layout holds: no import cycles, no oversized files, host frameworks and the app wing only where they
belong, and both install modes ship the top-level ``integrations/`` folder as ``rolora_plugin.integrations``."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("transformers", "peft", "accelerate", "deepspeed", "axolotl", "lm_eval", "datasets", "matplotlib")
MAX_LINES = 600


def _source_files() -> dict[str, Path]:
    """``{dotted module name: path}`` for rolora_plugin/, the top-level integrations/ (mapped into it) and rolora/."""
    out = {}
    for top in ("rolora_plugin", "integrations", "rolora"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[0] == "integrations":
                parts.insert(0, "rolora_plugin")
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str], *, top_level_only: bool = False) -> set[str]:
    """Project modules (or external top-level names) that ``module`` imports, resolving relative imports."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = _source_files()
    known = set(files)
    graph = {}
    for mod, path in files.items():
        deps = {d for d in _imports(mod, path, known) if d in known}
        # importing a parent package is not a cycle edge (Python initialises it first anyway)
        graph[mod] = {d for d in deps if d != mod and not mod.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_the_package():
    assert _cycles(_graph()) == []


def test_no_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in _source_files().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _is_core(module: str) -> bool:
    return module.startswith("rolora_plugin") and not module.startswith(("rolora_plugin.app", "rolora_plugin.integrations"))


def test_core_modules_import_no_host_framework_at_module_level():
    files = _source_files()
    offenders = {}
    for mod, path in files.items():
        if _is_core(mod):
            hosts = {i.split(".")[0] for i in _imports(mod, path, set(files), top_level_only=True)} & set(HOSTS)
            if hosts:
                offenders[mod] = sorted(hosts)
    assert offenders == {}


def test_library_never_imports_the_app_wing():
    graph = _graph()
    offenders = {m: sorted(d for d in deps if d.startswith("rolora_plugin.app")) for m, deps in graph.items()}
    offenders = {m: d for m, d in offenders.items() if d and not m.startswith("rolora_plugin.app")}
    assert offenders == {}


def test_editable_install_maps_integrations_folder():
    import rolora_plugin.integrations as integ

    assert Path(integ.__file__).resolve() == ROOT / "integrations" / "__init__.py"


def test_wheel_ships_every_module_and_imports_from_it(tmp_path):
    """Build the wheel (no isolation, no deps), unpack it, import the mapped packages from the unpacked copy."""
    pytest.importorskip("setuptools")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
        shipped = {n for n in z.namelist() if n.endswith(".py")}
    expected = {f"{mod.replace('.', '/')}{'/__init__' if p.name == '__init__.py' else ''}.py" for mod, p in _source_files().items()}
    assert expected - shipped == set()
    code = (
        "import rolora_plugin, rolora_plugin.integrations.deepspeed, rolora_plugin.integrations.axolotl, rolora;"
        "print(rolora_plugin.__file__); print(rolora_plugin.integrations.deepspeed.__file__)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=unpacked, env={"PYTHONPATH": str(unpacked), "PATH": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    assert all(line.startswith(str(unpacked)) for line in run.stdout.split()), run.stdout
