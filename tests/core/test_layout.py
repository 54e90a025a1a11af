"""The package layout holds what ARCHITECTURE.md states: layers import only downward (lazy imports included), no
import cycles, no oversized files, host frameworks and the app wing only where they belong, one module that knows
peft's internals, the module map equal to the file tree, and both install modes ship the top-level
``integrations/`` folder as ``rolora_plugin.integrations``."""

from __future__ import annotations

import ast
import re
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


# ---------------------------------------------------------------------------------------------- layers

# ARCHITECTURE.md, "Layers": a module may import its own layer and the layers below it, never one above (lazy
# imports included). The package face (rolora_plugin/__init__.py, the public API) and the Axolotl shim rolora/
# stand on top of everything.
LAYERS = (
    ("foundation", ("rolora_plugin._moved", "rolora_plugin._peft", "rolora_plugin.config", "rolora_plugin.distributed", "rolora_plugin.errors",
                    "rolora_plugin.finite", "rolora_plugin.hookspecs", "rolora_plugin.metrics", "rolora_plugin.plugins")),
    ("hadamard", ("rolora_plugin.hadamard",)),
    ("model", ("rolora_plugin.model",)),
    ("quant", ("rolora_plugin.quant",)),
    ("rotate", ("rolora_plugin.rotate",)),
    ("lora", ("rolora_plugin.lora",)),
    ("io", ("rolora_plugin.io",)),
    ("integrations", ("rolora_plugin.integrations",)),
    ("app", ("rolora_plugin.app",)),
    ("face", ("rolora_plugin", "rolora")),
)  # fmt: skip


def _layer(module: str) -> int:
    """Index in LAYERS of the longest prefix naming ``module`` (a folder's modules share its layer)."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and to ARCHITECTURE.md")
    return best[0]


def _upward(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    out = {}
    for mod, deps in graph.items():
        up = sorted(f"{d} ({LAYERS[_layer(d)][0]})" for d in deps if _layer(d) > _layer(mod))
        if up:
            out[f"{mod} ({LAYERS[_layer(mod)][0]})"] = up
    return out


def test_layer_check_finds_an_upward_import():
    graph = {"rolora_plugin.quant.rtn": {"rolora_plugin.rotate.rotation", "rolora_plugin.errors"}, "rolora_plugin.io.export": {"rolora_plugin.quant.rtn"}}
    assert _upward(graph) == {"rolora_plugin.quant.rtn (quant)": ["rolora_plugin.rotate.rotation (rotate)"]}


def test_every_module_is_in_a_layer():
    for mod in _source_files():
        _layer(mod)


def test_layers_import_only_downward():
    """Including library → integrations and lazy (function-level) imports: nothing in a layer reaches up."""
    assert _upward(_graph()) == {}


# ---------------------------------------------------------------------------------------------- peft internals

# attributes peft's LoRA layers and PeftModel carry; only rolora_plugin/_peft.py may touch them
PEFT_ATTRS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "scaling", "base_layer",
              "peft_config", "active_adapter", "active_adapters", "parameter_name", "merged_adapters"}  # fmt: skip
PEFT_DICTS = {"lora_alpha", "lora_dropout"}  # config fields elsewhere too: peft's only when indexed by adapter
PEFT_STRINGS = re.compile(r"\.base_layer|lora_embedding|peft_config|lora_magnitude")


def _peft_internals(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PEFT_ATTRS:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr in PEFT_DICTS:
            found.append(f"{node.lineno}: .{node.value.attr}[...]")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and PEFT_STRINGS.search(node.value) and len(node.value) < 60:
            found.append(f"{node.lineno}: {node.value!r}")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def test_peft_check_finds_internals():
    code = "def f(m, cfg):\n    m.lora_A['x'].weight.div_(2)\n    m.lora_alpha['x'] *= 4\n    a = cfg.lora_alpha\n    return getattr(m, 'lora_embedding_B', {})\n"
    assert _peft_internals(code) == ["2: .lora_A", "3: .lora_alpha[...]", "5: 'lora_embedding_B'"]


def test_only_the_peft_module_knows_peft_internals():
    offenders = {}
    for mod, path in _source_files().items():
        if path.name != "_peft.py" and (found := _peft_internals(path.read_text())):
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


# ---------------------------------------------------------------------------------------------- the module map


def _module_map() -> tuple[set[str], set[str]]:
    """(files, folders) that ARCHITECTURE.md's "Module map" block names. A line starts with one or more names ending
    in ``.py`` or ``/``; two more spaces of indentation than a folder's line put a name inside that folder."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = re.search(r"## Module map\s*```text\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no ```text block under '## Module map'"
    files, folders, stack = set(), set(), []  # stack: (indent, folder path)
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        for token in line.split():
            if token.endswith(".py"):
                files.add(parent + token)
            elif token.endswith("/") and re.fullmatch(r"[\w.<>/-]+/", token):
                folders.add(parent + token)
                stack.append((indent, parent + token))
            else:
                break
    return files, folders


def test_module_map_equals_the_file_tree():
    """Every module of rolora_plugin/, integrations/ and rolora/ is in the map (package faces ``__init__.py`` may be
    left out), every file and folder the map names exists."""
    files, folders = _module_map()
    tree = {str(p.relative_to(ROOT)) for p in _source_files().values()}
    missing = sorted(f for f in tree - files if not f.endswith("__init__.py"))
    assert missing == [], f"in the tree but not in ARCHITECTURE.md's module map: {missing}"
    assert sorted(f for f in files if not (ROOT / f).is_file()) == [], "named in the module map but not in the tree"
    assert sorted(d for d in folders if "<" not in d and not (ROOT / d).is_dir()) == [], "folders in the module map that do not exist"
