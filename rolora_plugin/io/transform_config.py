"""The online rotations of a rotated model as a compressed-tensors 0.20 ``transform_config``.

Written with every export (:mod:`rolora_plugin.io.export`). R4 acts on
``down_proj``'s input (location ``input``), R3 on queries and keys after RoPE (``q_attn`` / ``k_cache``, per head).
R1, R2 and R4's weight side are folded into the weights. compressed-tensors' ``hadamard`` type is the unsigned
normalised Sylvester matrix (powers of two only), used only where our matrix is exactly that. Any other matrix
(Paley / Kronecker Hadamards such as SmolLM2's 1536 = 12·128, signed or fallback orthogonal factors) is a
**stored** matrix: compressed-tensors 0.20 has no type that reads a matrix from a config, but a transform module
is a submodule ``<target>.<group>_<location>`` whose ``weight`` is a parameter; ``apply_transform_config`` creates
it (``random-hadamard``: shared by every target of the group) and its forward is ``x @ weight / sqrt(n)`` — the
same scaling vLLM applies to a loaded transform weight. We store ``weight = sqrt(n) · R`` (``x @ R`` is our online
rotation), once per group under the first target's name (vLLM shares one tensor per group and size the same way),
**in the model's own weight files** and their index — where vLLM's weight loader looks: it reads a side file only
when the checkpoint has no safetensors index (0.1 exports wrote ``transforms.safetensors``; still read). transformers
5.23 ignores ``transform_config`` at load, so those keys are not model parameters there (rolora's loader expects
them; :func:`load_with_compressed_tensors` / :func:`rolora_plugin.io.check.consumer_model` load them into the modules
``apply_transform_config`` creates).

* the full-precision export (``format="fp"``) keeps its older rule: a ``hadamard``-only config or none at all
  (:func:`transform_config_dict`; a warning says when none is written). Its ``q_attn`` / ``k_cache`` locations
  hook the attention function and fail with transformers 5.23's ``eager`` attention: load with ``sdpa``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import RotationError
from ..model.architectures import architecture_by_name, get_architecture
from ..rotate.rotation import RotationRecord
from .loading import EXPORT_SIDE_KEYS, load_causal_lm
from .publish import atomic_write_text

__all__ = [
    "TRANSFORMS_FILE",
    "TRANSFORM_CONFIG_FILE",
    "embed_transform_config",
    "load_with_compressed_tensors",
    "require_compressed_tensors",
    "stored_transform_weights",
    "transform_config_dict",
]

logger = logging.getLogger(__name__)
TRANSFORMS_FILE = "transforms.safetensors"
TRANSFORM_CONFIG_FILE = "transform_config.json"


def require_compressed_tensors() -> None:
    """Raise an ImportError with the install command when compressed-tensors is missing."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ImportError(
            "compressed-tensors is needed for this: pip install 'compressed-tensors>=0.20' (or rolora-plugin[export])"
        ) from None


# ---------------------------------------------------------------------------------------------- transform config


def _is_sylvester(t) -> bool:
    """True if the transform is exactly compressed-tensors' ``hadamard`` (normalised Sylvester, no signs)."""
    return t.dense is None and t.signs is None and t.pow2 == t.n


def block_of(t) -> int | None:
    """b when the transform is ``I ⊗ H_b`` (block-diagonal Sylvester, no signs): compressed-tensors' ``hadamard``
    with ``head_dim=b`` applies exactly that (one b×b matrix on every block of b channels); else None."""
    if t.signs is not None or t.dense is None or t.pow2 == t.n:
        return None
    eye = torch.eye(t.dense.shape[0], dtype=t.dense.dtype)
    return t.pow2 if torch.equal(t.dense, eye) else None


def _scheme(location_targets: list[tuple[str, str]], head_dim: int | None = None, kind: str = "hadamard") -> dict:
    apply = [{"targets": [target], "location": loc, "inverse": False, "ignore": []} for loc, target in location_targets]
    return {"type": kind, "apply": apply, "randomize": False, "requires_grad": False, "head_dim": head_dim}


def _online_groups(record: RotationRecord) -> list[tuple[str, object, list[tuple[str, str]], int | None]]:
    """``[(group name, transform, [(location, target)], head_dim)]`` for the record's online rotations."""
    transforms = record.verify(skip_learned=True)  # online rotations are never learned (LEARNABLE: r1, r2)
    spec = architecture_by_name(record.family)
    out = []
    if "r4" in transforms:
        out.append(("rolora_r4", transforms["r4"], [("input", _regex(spec.down_proj))], None))
    if "r3" in transforms:
        target = _regex(spec.attention)
        out.append(("rolora_r3", transforms["r3"], [("q_attn", target), ("k_cache", target)], record.dims.head_dim))
    return out


def _regex(path: str) -> str:
    return "re:.*" + path.replace(".", r"\.") + "$"


def transform_config_dict(record: RotationRecord, *, stored: bool = False) -> dict | None:
    """The online rotations of ``record`` as a compressed-tensors ``TransformConfig`` dict, or None if there are none.

    ``stored=False`` (the full-precision export): ``hadamard`` groups only; None (and one INFO line saying so) when one rotation
    is not the plain Sylvester matrix, since a partial description would give a wrong model. ``stored=True`` (the
    compressed-tensors export): such rotations become ``random-hadamard`` groups whose weights are stored (module
    doc). Validated with compressed-tensors' pydantic models when the library is installed.
    """
    groups, unsupported = {}, []
    for name, t, locations, head_dim in _online_groups(record):
        block = block_of(t)
        exact = _is_sylvester(t) or block is not None
        head_dim = block if block is not None else head_dim
        groups[name] = _scheme(locations, head_dim, "hadamard" if exact or not stored else "random-hadamard")
        unsupported += [] if exact or stored else [f"{name.removeprefix('rolora_')} ({t.description})"]
    if unsupported:
        logger.info(
            "no compressed-tensors transform_config written: %s has no compressed-tensors equivalent (its 'hadamard' "
            "type names only power-of-two Sylvester matrices). Nothing is lost: rolora_rotation.json + load_rotated "
            "rebuild the model exactly; a quantized export for a compressed-tensors consumer (`rolora quantize`, or "
            "quantize_model_ + merge_and_export(format='compressed-tensors')) stores such matrices.", ", ".join(unsupported)
        )  # fmt: skip
        return None
    if not groups:
        return None
    config = {"config_groups": groups}
    _validate_transform_config(config)
    return config


def _validate_transform_config(config: dict) -> None:
    try:
        from compressed_tensors.transform import TransformConfig
    except ImportError:
        logger.info("compressed-tensors not installed: transform_config written without validation")
        return
    TransformConfig.model_validate(config)


def stored_transform_weights(record: RotationRecord, model: nn.Module) -> dict[str, torch.Tensor]:
    """``{<first target>.<group>_<location>.weight: sqrt(n) · R}`` (float32) for every non-Sylvester online rotation."""
    from compressed_tensors.utils import match_named_modules

    out = {}
    for name, t, locations, _ in _online_groups(record):
        if _is_sylvester(t) or block_of(t) is not None:
            continue
        location, target = locations[0]
        first = next(iter(match_named_modules(model, [target])), None)
        if first is None:
            raise RotationError(f"no module of {type(model).__name__} matches the transform target {target!r}")
        out[f"{first[0]}.{name}_{location}.weight"] = (t.matrix(torch.float64) * math.sqrt(t.n)).to(torch.float32).contiguous()
    return out


def embed_transform_config(config_path: Path, ct: dict) -> None:
    """Put ``ct`` into ``config.json → quantization_config.transform_config`` (what ``ModelCompressor.update_config`` writes)."""
    import compressed_tensors

    data = json.loads(config_path.read_text())
    data["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": compressed_tensors.__version__,
        "sparsity_config": {},
        "transform_config": ct,
    }
    atomic_write_text(config_path, json.dumps(data, indent=2, sort_keys=True) + "\n")



def load_with_compressed_tensors(path: str | os.PathLike, dtype: torch.dtype | None = None, *, dequantize: bool = False) -> nn.Module:
    """Load an export the way a compressed-tensors consumer would: transformers + ``apply_transform_config``.

    No rolora code touches the forward: the online rotations come from the export's ``transform_config`` only
    (``config.json``, or ``transform_config.json`` of a full-precision export) and the stored transform weights in
    the model's weight files, applied by compressed-tensors with ``sdpa`` attention (its q/k hooks do not support
    ``eager``). A packed checkpoint goes through compressed-tensors' own quantized forward (its activation grid,
    module doc); ``dequantize=True`` loads it dense instead (``CompressedTensorsConfig(dequantize=True)``: exact weights,
    no activation quantization; transformers 5.23 needs this for asymmetric weights, whose packed zero points its
    compressed path does not size). Used to check what consumers get; raises if the export has no transform config.
    """
    from transformers import AutoModelForCausalLM

    require_compressed_tensors()
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    path = Path(path)
    ct = json.loads((path / "config.json").read_text()).get("quantization_config", {}).get("transform_config")
    if not ct and (path / TRANSFORM_CONFIG_FILE).is_file():
        ct = json.loads((path / TRANSFORM_CONFIG_FILE).read_text())
    if not ct:
        raise RotationError(f"{path} has no compressed-tensors transform_config (see rolora_plugin.io.compressed's module doc)")
    kwargs = {"attn_implementation": "sdpa", **({"dtype": dtype} if dtype is not None else {})}
    if dequantize:
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = load_causal_lm(path, model_cls=AutoModelForCausalLM, expected_unexpected=EXPORT_SIDE_KEYS, **kwargs)
    get_architecture(model)  # clear error for a family we do not know
    apply_transform_config(model, TransformConfig.model_validate(ct))
    _load_transform_weights(model, path)
    return model.eval()


def _load_transform_weights(model: nn.Module, path: Path) -> None:
    """Load the stored transform matrices into the modules ``apply_transform_config`` created: from the model's
    weight files (exports since 0.2) or ``transforms.safetensors`` (older exports)."""
    from safetensors import safe_open

    wanted = {k for k in model.state_dict() if _is_transform_key(k)}
    stored = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys() if _is_transform_key(k)})  # noqa: SIM118
    unexpected = sorted(set(stored) - wanted)
    if unexpected:
        raise RotationError(f"{path} holds transform weights for modules the transform_config did not create: {unexpected}")
    model.load_state_dict(stored, strict=False)


def _is_transform_key(key: str) -> bool:
    return any(f".rolora_{r}_" in key for r in ("r3", "r4")) and key.endswith(".weight")
