"""Which compressed-tensors scheme class vLLM 0.34 picks for a checkpoint config's linears, answered by vLLM's own code.

    python benchmarks/vllm_scheme.py CONFIG_OR_EXPORT_DIR [...] [--capability 90 [80 89 100]]
    python benchmarks/vllm_scheme.py --builtin [--capability 80 90 100]

The vLLM wheel (``pip download vllm==0.34.* --no-deps``, ~240 MB, cached in
``${ROLORA_CACHE:-~/.cache/rolora-plugin}/vllm-wheel``; the newest release if no 0.34 exists, with a warning) is
opened as a zip and these files are executed **verbatim** from it at run time (nothing of vLLM is in this repository):
``quantization/compressed_tensors/compressed_tensors.py`` (``CompressedTensorsConfig.from_config``, ``get_scheme``,
``_get_scheme_from_parts``, the ``_is_*`` predicates, ``_check_scheme_supported``), ``compressed_tensors/utils.py``
(``is_activation_quantization_format``), ``compressed_tensors/schemes/*.py`` (the scheme classes: constructors and
``get_min_capability``), ``quantization/base_config.py`` and ``vllm/scalar_type.py``. Every other ``vllm.*`` import
is a stand-in: ``vllm.platforms.current_platform`` reports a simulated CUDA GPU of the chosen capability (default
SM90, Hopper) and raises on any other query, ``vllm.logger`` is the standard logger, and everything else (kernels,
parameters, layers, distributed, config) is an inert placeholder whose truth value raises, so a placeholder that
reached a decision would fail the run instead of answering. compressed-tensors and torch are the real packages.

Verified: the scheme class (or the exact exception) vLLM's selection produces for each ``config_groups`` entry,
including the GPU-capability check ``get_scheme`` makes. Not verified: which layers a group's ``targets`` /
``ignore`` match (each group is evaluated as if it matched), which GEMM kernel the scheme then picks (the
``init_*_kernel`` / ``choose_mp_linear_kernel`` calls in the constructors are placeholders), weight loading,
transforms, and any kernel: nothing is run on a GPU. compressed-tensors is the installed version, not necessarily
the one vLLM pins (both are printed). Exit status: 0 when every config was evaluated (a refusal is a result), 1 when
a ``--builtin`` expectation is not met, 2 when there is no wheel or vLLM's code could not be executed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.abc
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

VLLM_SPEC = "vllm==0.34.*"
REFUSED = "refused: "  # prefix of a select_schemes value that is vLLM's refusal rather than a scheme class
_CT = "vllm/model_executor/layers/quantization/compressed_tensors/"
_REAL_FILES = {  # module -> file in the wheel, executed verbatim
    "vllm.scalar_type": "vllm/scalar_type.py",
    "vllm.model_executor.layers.quantization.base_config": "vllm/model_executor/layers/quantization/base_config.py",
    "vllm.model_executor.layers.quantization.compressed_tensors.utils": _CT + "utils.py",
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors": _CT + "compressed_tensors.py",
    "vllm.model_executor.layers.quantization.compressed_tensors.schemes": _CT + "schemes/__init__.py",
}
_SCHEMES_PKG = "vllm.model_executor.layers.quantization.compressed_tensors.schemes"
_OUTCOMES = (NotImplementedError, ValueError, RuntimeError, DeprecationWarning)  # what vLLM raises to refuse


class StandInUsed(Exception):
    """A placeholder for a vLLM module that this script does not execute was consulted in a decision."""


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub_class(name)


class _Stub(metaclass=_StubMeta):
    """Inert placeholder: constructible, callable, attribute-bearing; its truth value raises."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()

    def __bool__(self):
        raise StandInUsed("a vLLM placeholder (kernel/layer/config stand-in) was used in a decision")


def _stub_class(name: str) -> type:
    return _StubMeta(name, (_Stub,), {})


class _StubModule(type(sys)):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stub_class(name)
        setattr(self, name, value)
        return value


class _Logger(logging.LoggerAdapter):
    """vLLM's logger API (``info_once`` etc.) on a standard logger."""

    def __getattr__(self, name):
        level = {"debug_once": logging.DEBUG, "info_once": logging.INFO, "warning_once": logging.WARNING}.get(name)
        if level is None:
            raise AttributeError(name)
        return lambda msg, *args, scope=None, **kwargs: self.log(level, msg, *args, **kwargs)


class _Capability(tuple):
    def to_int(self) -> int:
        return self[0] * 10 + self[1]


def _as_int(capability) -> int:
    return capability if isinstance(capability, int) else capability[0] * 10 + capability[1]


class SimulatedPlatform:
    """``current_platform`` of a CUDA GPU with compute capability ``capability`` (e.g. 90 = SM90, Hopper)."""

    def __init__(self, capability: int = 90):
        self.capability = capability

    def get_device_capability(self, device_id: int = 0) -> _Capability:
        return _Capability(divmod(self.capability, 10))

    def has_device_capability(self, capability, device_id: int = 0) -> bool:
        return self.capability >= _as_int(capability)

    def is_device_capability(self, capability, device_id: int = 0) -> bool:
        return self.capability == _as_int(capability)

    def is_cuda(self) -> bool:
        return True

    is_rocm = is_xpu = is_cpu = lambda self: False

    def __getattr__(self, name):
        raise StandInUsed(f"vLLM's selection asked the simulated platform for {name!r}, which it does not model")


def cache_dir() -> Path:
    return Path(os.environ.get("ROLORA_CACHE", Path.home() / ".cache" / "rolora-plugin")) / "vllm-wheel"


def _version_key(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.+]", path.name.split("-")[1]))


def get_wheel(directory: Path | None = None, download: bool = True) -> Path:
    """The cached vLLM 0.34.x wheel (downloaded with pip on first use; the newest release if 0.34 is not on the
    index). Raises FileNotFoundError when there is none and it cannot be downloaded."""
    directory = Path(directory or cache_dir())
    for pattern in ("vllm-0.34.*.whl", "vllm-*.whl"):
        found = sorted(directory.glob(pattern), key=_version_key)
        if found:
            return found[-1]
        if not download:
            continue
        directory.mkdir(parents=True, exist_ok=True)
        spec = VLLM_SPEC if pattern == "vllm-0.34.*.whl" else "vllm"
        if spec == "vllm":
            logger.warning("could not download %s: taking the newest vLLM release instead", VLLM_SPEC)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary=:all:", "-d", str(directory)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        logger.info("pip download %s: exit %d in %.1f s", spec, proc.returncode, time.perf_counter() - t0)
        if proc.returncode != 0:
            logger.warning("pip download %s failed: %s", spec, proc.stderr.strip()[-500:])
            continue
        found = sorted(directory.glob(pattern), key=_version_key)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no vLLM wheel in {directory} and none could be downloaded with pip")


def wheel_info(wheel: Path) -> dict:
    """vLLM's version and the compressed-tensors version it pins, from the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    version = re.search(r"^Version: (\S+)", meta, re.M).group(1)
    pin = re.search(r"^Requires-Dist: compressed-tensors\s*([^;\s]*)", meta, re.M)
    return {"version": version, "compressed_tensors_pin": pin.group(1) if pin else "", "size": wheel.stat().st_size}


class _WheelImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, wheel: Path, platform: SimulatedPlatform):
        self.zip = zipfile.ZipFile(wheel)
        self.platform = platform
        names = set(self.zip.namelist())
        self.files = dict(_REAL_FILES)
        for name in names:  # every scheme module of the schemes package is real
            if name.startswith(_CT + "schemes/") and name.endswith(".py") and not name.endswith("__init__.py"):
                self.files[_SCHEMES_PKG + "." + Path(name).stem] = name
        missing = [f for f in self.files.values() if f not in names]
        if missing:
            raise FileNotFoundError(f"{wheel.name} lacks {missing}: vLLM's layout changed")

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "vllm" and not fullname.startswith("vllm."):
            return None
        is_pkg = fullname not in self.files or self.files[fullname].endswith("__init__.py")
        return importlib.util.spec_from_loader(fullname, self, origin=self.files.get(fullname), is_package=is_pkg)

    def create_module(self, spec):
        return None if spec.name in self.files else _StubModule(spec.name)

    def exec_module(self, module):
        name = module.__name__
        if name == "vllm.platforms":
            module.current_platform = self.platform
        elif name == "vllm.logger":
            module.init_logger = lambda n: _Logger(logging.getLogger(n), {})
        if name in self.files:
            path = self.files[name]
            module.__file__ = f"{self.zip.filename}!/{path}"
            exec(compile(self.zip.read(path).decode(), module.__file__, "exec"), module.__dict__)


_LOADED: dict[str, tuple] = {}


def load_vllm_selection(wheel: Path | None = None):
    """``(CompressedTensorsConfig, CompressedTensorsScheme, SimulatedPlatform)`` executed from the wheel. The
    ``vllm`` modules are removed from ``sys.modules`` afterwards so nothing else in the process sees a fake vLLM."""
    wheel = Path(wheel or get_wheel())
    if str(wheel) in _LOADED:
        return _LOADED[str(wheel)]
    platform = SimulatedPlatform()
    importer = _WheelImporter(wheel, platform)
    saved = {k: v for k, v in sys.modules.items() if k == "vllm" or k.startswith("vllm.")}
    for k in saved:
        del sys.modules[k]
    sys.meta_path.insert(0, importer)
    try:
        ct = importlib.import_module(_CT[:-1].replace("/", ".") + ".compressed_tensors")
        schemes = importlib.import_module(_SCHEMES_PKG)
    finally:
        sys.meta_path.remove(importer)
        for k in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    _LOADED[str(wheel)] = (ct.CompressedTensorsConfig, schemes.CompressedTensorsScheme, platform)
    return _LOADED[str(wheel)]


def select_schemes(quantization_config: dict, capability: int = 90, wheel: Path | None = None) -> dict[str, str]:
    """``{config group: scheme class name}`` vLLM 0.34 selects for ``quantization_config`` (config.json's
    ``quantization_config``) on a GPU of compute ``capability`` (80, 89, 90, 100, ...); a group vLLM refuses maps to
    ``"refused: <exception type>: <vLLM's message>"``. Raises when vLLM's code itself could not be executed."""
    config_cls, scheme_base, platform = load_vllm_selection(wheel)
    platform.capability = int(capability)
    groups = quantization_config.get("config_groups") or {}
    try:
        config = config_cls.from_config(copy.deepcopy(quantization_config))
    except _OUTCOMES as e:
        return {name: _refusal(e) for name in groups}
    out = {}
    for name, group in groups.items():
        target = (group.get("targets") or [None])[0]
        if target not in config.target_scheme_map:
            out[name] = "skipped by vLLM (attention-only group: quantized with the KV cache)"
            continue
        scheme_dict = config.target_scheme_map[target]
        config.get_scheme_dict = lambda layer, layer_name=None, d=scheme_dict: d  # every group matches (see doc)
        try:
            scheme = config.get_scheme(layer=None, layer_name=name)
        except _OUTCOMES as e:
            out[name] = _refusal(e)
            continue
        if scheme is None:
            out[name] = "unquantized (no weight quantization)"
        elif not isinstance(scheme, scheme_base) or not type(scheme).__module__.startswith(_SCHEMES_PKG):
            raise StandInUsed(f"group {name}: selection returned {scheme!r}, not one of vLLM's scheme classes")
        else:
            out[name] = type(scheme).__name__
    return out


def _refusal(e: BaseException) -> str:
    return f"{REFUSED}{type(e).__name__}: " + " ".join(str(e).split())


def builtin_configs() -> list[tuple[str, dict, str]]:
    """``(label, quantization_config, expected)`` from compressed-tensors' own preset schemes; ``expected`` is a
    scheme class name (``"<class>>=80"``: refused below SM80) or ``"refused"``."""
    import torch
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import preset_name_to_scheme

    def config(preset: str, fmt: str | None = None, **act) -> dict:
        scheme = preset_name_to_scheme(preset, ["Linear"])
        if act:
            scheme.input_activations = scheme.input_activations.model_copy(update=act)
        fmt = fmt or infer_module_format(torch.nn.Linear, scheme).value
        group = json.loads(scheme.model_dump_json(exclude_none=True))
        return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group}}

    pq = "pack-quantized"  # the other rows use the format compressed-tensors infers for the scheme
    cases = [
        ("W4A4 int (preset: sym dynamic per-token acts)", config("W4A4", pq), "CompressedTensorsWNA4Int"),
        ("W4A4 int, acts per-group 128", config("W4A4", pq, strategy="group", group_size=128),
         "CompressedTensorsWNA4Int"),
        ("W4A4 int (preset)", config("W4A4"), "refused"),
        ("W4A4 int, asymmetric acts", config("W4A4", pq, symmetric=False), "refused"),
        ("W4A4 int, static per-tensor acts", config("W4A4", pq, strategy="tensor", dynamic=False), "refused"),
        ("NVFP4 (preset)", config("NVFP4"), "CompressedTensorsW4A4Fp4"),
        ("NVFP4A16 (preset)", config("NVFP4A16"), "CompressedTensorsW4A4Fp4"),
        ("MXFP4 (preset)", config("MXFP4"), "CompressedTensorsW4A4Mxfp4>=80"),
        ("W4A8 int (preset)", config("W4A8", pq), "CompressedTensorsWNA8Int"),
        ("W4A8 int (preset)", config("W4A8"), "CompressedTensorsW4A8Int"),
    ]
    return [(f"{label}, {qc['format']}", qc, expected) for label, qc, expected in cases]


def _matches(result: str, expected: str, capability: int) -> bool:
    cls, _, low = expected.partition(">=")
    if cls == "refused" or (low and capability < int(low)):
        return result.startswith(REFUSED)
    return result == cls


def read_quantization_config(path: Path) -> dict:
    """``quantization_config`` of a config.json, an export folder holding one, or a bare quantization config."""
    path = Path(path)
    data = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    qc = data.get("quantization_config", data)
    if "config_groups" not in qc:
        raise ValueError(f"{path}: no quantization_config with config_groups")
    return qc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", type=Path, help="config.json files, export folders or quantization configs")
    p.add_argument("--builtin", action="store_true", help="also check compressed-tensors' preset schemes")
    p.add_argument("--capability", type=int, nargs="+", default=[90], help="simulated GPU capability (default 90)")
    p.add_argument("--wheel", type=Path, help="a vLLM wheel to use instead of the cached download")
    p.add_argument("--full-errors", action="store_true", help="print vLLM's refusal messages in full (else 160 chars)")
    args = p.parse_args(argv)
    if not args.configs and not args.builtin:
        p.error("give CONFIG_OR_EXPORT_DIR or --builtin")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        wheel = args.wheel or get_wheel()
        info = wheel_info(wheel)
        load_vllm_selection(wheel)
    except Exception as e:  # no wheel, or vLLM's code could not be loaded
        print(f"error: could not load vLLM's scheme selection: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    import compressed_tensors

    ct_version = compressed_tensors.__version__
    print(f"vLLM {info['version']} ({wheel.name}, {info['size'] / 1e6:.1f} MB); compressed-tensors {ct_version} "
          f"installed (vLLM pins {info['compressed_tensors_pin'] or 'nothing'})")
    try:
        cases = [(str(c), read_quantization_config(c), None) for c in args.configs]
    except (OSError, ValueError) as e:
        p.error(str(e))
    if args.builtin:
        cases += builtin_configs()
    caps = args.capability
    rows, errors, failed = [], [], False
    for label, qc, expected in cases:
        try:
            results = {cap: select_schemes(qc, cap, wheel) for cap in caps}
        except Exception as e:
            print(f"error: vLLM's selection code could not be executed on {label}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            return 2
        for group in qc["config_groups"]:
            cells = []
            for r in (results[cap][group] for cap in caps):
                if r.startswith(REFUSED):  # the table cell names the exception; the note below gives vLLM's message
                    note = r[len(REFUSED):] if args.full_errors or len(r) < 200 else r[len(REFUSED):][:160] + " …"
                    errors += [note] if note not in errors else []
                    r = f"refused ({r[len(REFUSED):].split(':')[0]}) [{errors.index(note) + 1}]"
                cells.append(r)
            as_expected = expected is None or all(_matches(results[c][group], expected, c) for c in caps)
            ok = "" if expected is None else "yes" if as_expected else "NO"
            failed |= ok == "NO"
            rows.append([label, group, *cells] + ([expected, ok] if args.builtin else []))
    head = ["config", "group", *(f"SM{c}" for c in caps)] + (["expected", "as expected"] if args.builtin else [])
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    for i, e in enumerate(errors, 1):
        print(f"[{i}] {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
