"""``rotate_checkpoint``: rotate a (sharded) safetensors checkpoint disk to disk, never holding the whole model.

The in-memory path (:func:`rolora_plugin.rotate_model_`) needs the model in RAM, plus its float64 scratch space.
This one reads ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json`` + shards) and
rotates one *unit* at a time — the embedding, one decoder layer, the final norm with ``lm_head`` — using the very
edit functions of :mod:`rolora_plugin.rotate.rotation` (``_rotate_embedding``, ``_rotate_layer``, ``_rotate_linear``,
``_norm_gain``, ``_reset_norm``, chunked ``_edit``) on the modules of a *meta-device skeleton* of the model whose
weights are loaded unit by unit (``load_state_dict(assign=True)``) and sent back to ``meta`` once written. The
output is therefore **bit-identical** to ``rotate_model_`` on the model loaded in the same dtype followed by
``save_pretrained`` (``tests/core/test_streaming.py`` checks every tensor with ``torch.equal``, and the record).

Memory: one unit (a 7B decoder layer is 0.4 GB in bf16) + the shard being assembled (``max_shard_bytes``) + the
two float64 workspaces of :mod:`rolora_plugin.hadamard.edits` (8 MiB each, one pair for the whole pass): about 2.1 GB peak for LLaMA-2-7B with 1 GiB shards
(``benchmarks/rotate_checkpoint.py``). Input tensors are read with ``pread(2)``
(``safe_open(..., backend="pread")``, safetensors ≥ 0.8) into anonymous memory that is freed after each unit,
so no memory-mapped page of the input is ever resident beyond the tensor being read; with an older safetensors
each tensor is read through its own short-lived ``mmap`` handle and copied. Shards are written as soon as
they are complete (``safetensors.torch.save_file``, which serialises from the tensors' own buffers).

Order of work (same error types as the in-memory path); nothing is published unless every check passed:

1. config: already rotated (``config.rolora`` or ``rolora_rotation.json``) or quantized (``rolora_quant``):
   :class:`RotationError`; unsupported family: :class:`UnsupportedArchitectureError`; a width without a
   construction and ``allow_fallback=False``: :class:`rolora_plugin.NoHadamardError`;
2. tensors, from the safetensors headers before any rotation is built: a folder holding both ``model.safetensors``
   and an index + shards (:func:`rolora_plugin.io.safetensors_reader.weight_files`, the rule of the in-memory path
   too), an index naming a shard that lacks the tensor, a model tensor missing from the checkpoint or of another
   shape than config.json implies (so a huge ``hidden_size`` is refused before anything is allocated):
   :class:`rolora_plugin.io.loading.CheckpointError` (a :class:`RotationError`);
3. dtypes, from the headers: non-float (integer, fp8) weights: :class:`RotationError` naming the tensor;
4. one pass over the units, each input tensor **read once**: as it is read, before its unit is edited, it is
   checked (non-finite values, or values beyond the requested dtype's range: :class:`RotationError` naming the
   tensor) and sampled for the base fingerprint (:class:`rolora_plugin.rotate.fingerprint.Fingerprinter`), and the
   folded norms' rms is taken for the record; then the unit is rotated (every rotated tensor must stay finite:
   float16 can overflow, :func:`rolora_plugin.rotate.rotation.check_finite_output`) and written into the staging folder
   of :func:`rolora_plugin.io.publish.atomic_output_dir` (create-exclusive, marked staging, stale staging of killed
   runs removed). A refusal midway deletes the staging folder: nothing is published and an existing ``out_dir``
   (``overwrite=True``) is left as it was. The pass writes shards + index, ``config.json`` with the record under
   ``config.rolora`` (``tie_word_embeddings`` false once R1 unties), ``generation_config.json`` and tokenizer
   files copied, ``rolora_rotation.json`` and, when the online rotations have one, ``transform_config.json``
   (like :func:`rolora_plugin.merge_and_export`), the record sealed with checksums of what was written
   (:func:`rolora_plugin.io.records.seal_export`).

The record's ``base_fingerprint`` equals :func:`rolora_plugin.rotate.fingerprint.fingerprint_tensors` over the checkpoint's
tensors under the model's parameter names (a tied ``lm_head`` counted once), sampled in the read that feeds the
rotation (only a tied ``lm_head`` folded by R1 reads the embedding a second time). Each unit's tensors are
prefetched (``POSIX_FADV_WILLNEED``) while the unit before is rotated, so reads overlap the maths. After each unit, the heap pages it freed are handed back to the OS
(:func:`release_freed_memory`), so RSS returns to the baseline after each shard.

Example::

    >>> from rolora_plugin import RotationConfig
    >>> from rolora_plugin.io.streaming import rotate_checkpoint
    >>> record = rotate_checkpoint("llama-2-7b/", "llama-2-7b-rotated/", RotationConfig(r2=True))  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QUANT_RECORD_KEY, RECORD_KEY
from ..errors import CheckpointError, RotationError, UnsupportedArchitectureError
from ..finite import all_finite, check_finite_output
from ..hadamard.edits import shared_workspaces
from ..model.architectures import ArchitectureSpec, ModelDims, get_architecture, get_submodule
from ..rotate.config import RotationConfig
from ..rotate.fingerprint import Fingerprinter
from ..rotate.rotation import (
    RotationRecord,
    _check_structure,
    _norm_gain,
    _reset_norm,
    _rms,
    _rotate_embedding,
    _rotate_layer,
    _rotate_linear,
    build_rotations,
    get_rotation_record,
)
from .loading import check_layer_count
from .publish import OutputExistsError, atomic_output_dir, atomic_write_text, check_writable_parent
from .records import RECORD_FILE, seal_export
from .safetensors_reader import INDEX_FILE, SINGLE_FILE, _Checkpoint, _header, _numel, _weight_map  # noqa: F401
from .transform_config import TRANSFORM_CONFIG_FILE, transform_config_dict

__all__ = ["rotate_checkpoint", "all_finite", "release_freed_memory", "DEFAULT_MAX_SHARD_BYTES", "COPIED_FILES"]

logger = logging.getLogger(__name__)
DEFAULT_MAX_SHARD_BYTES = 1 << 30
# files copied unchanged from the source checkpoint (tokenizer, generation and processor settings)
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the model skeleton


def _load_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def _check_config(folder: Path, hf_config) -> None:
    """The in-memory path's refusals that only need the config: already rotated, already quantized."""
    if get_rotation_record(hf_config) is not None or (folder / RECORD_FILE).is_file():
        raise RotationError(
            f"{folder} is already rotated (config.json has a {RECORD_KEY!r} record or {RECORD_FILE} exists); rotating "
            "twice would apply the rotation twice. Rotate the original checkpoint."
        )
    quant = getattr(hf_config, QUANT_RECORD_KEY, None)
    if quant:
        cfg = quant.get("config", {}) if isinstance(quant, dict) else {}
        raise RotationError(
            f"{folder} is already W{cfg.get('w_bits', '?')}A{cfg.get('a_bits', '?')}-quantized (config.json has "
            f"{QUANT_RECORD_KEY!r}); rotating quantized weights would mix the rotation into the quantization error. "
            "Rotate the full-precision checkpoint, then quantize."
        )


def _spec_for(hf_config) -> ArchitectureSpec:
    """The family spec, with :func:`get_architecture`'s messages (named after ``config.architectures``)."""
    arch = (getattr(hf_config, "architectures", None) or ["checkpoint"])[0]
    holder = type(arch, (), {"config": hf_config})()
    spec = get_architecture(holder)
    if spec.tower is not None:
        raise UnsupportedArchitectureError(
            f"streaming rotation reads text-family checkpoints; {spec.name} checkpoints store their language tower "
            "under legacy tensor names. Rotate it in memory with rolora_plugin.rotate_model_."
        )
    if spec.experts is not None:
        raise UnsupportedArchitectureError(
            f"streaming rotation does not handle Mixture-of-Experts checkpoints yet ({spec.name}: transformers saves "
            "the fused experts as one tensor per expert on disk). Rotate it in memory with rolora_plugin.rotate_model_."
        )
    return spec


def _skeleton(hf_config) -> nn.Module:
    """The model on the meta device: module structure, parameter names and ties, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _model_tensors(skeleton: nn.Module) -> tuple[list[str], list[str]]:
    """(state-dict names without tied aliases, parameter names as ``named_parameters`` yields them)."""
    seen, names = set(), []
    for name, t in skeleton.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names, [name for name, _ in skeleton.named_parameters()]


def _check_tensors(ckpt: _Checkpoint, skeleton: nn.Module, names: list[str]) -> None:
    expected = skeleton.state_dict(keep_vars=True)
    missing = [n for n in names if n not in ckpt.files]
    for n in names:  # shapes first: a config.json whose dims lie names the tensor, whatever else is missing
        if n in ckpt.files and ckpt.shapes[n] != tuple(expected[n].shape):
            raise CheckpointError(
                f"{ckpt.folder} does not match its config.json: tensor {n} has shape {ckpt.shapes[n]} in the weights but "
                f"the config implies {tuple(expected[n].shape)}; config.json was edited or belongs to another model. "
                "Restore the config that came with the weights (nothing was written)"
            )
    if missing:
        raise CheckpointError(
            f"{ckpt.folder} lacks {len(missing)} tensor(s) its config.json needs, e.g. {missing[:3]}; the checkpoint is "
            "incomplete (a shard or tensor lost) or config.json was edited (e.g. num_hidden_layers): copy the complete "
            "folder again (nothing was written)"
        )
    extra = sorted(set(ckpt.files) - set(names))
    if extra:  # from_pretrained ignores them too: the in-memory output has none of them
        logger.warning("ignoring %d checkpoint tensor(s) the model does not use, e.g. %s", len(extra), extra[:3])


def _check_dtypes(ckpt: _Checkpoint, params: list[str]) -> None:
    """Every weight floating point and not fp8 (from the headers: nothing is read)."""
    for name in params:
        raw = ckpt.dtypes[name]
        if raw is None or not raw.is_floating_point or raw in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise RotationError(
                f"tensor {name} of {ckpt.folder} has dtype {raw}: quantized or integer weights cannot be rotated "
                "exactly. Rotate the full-precision checkpoint first, then quantize it (rolora_plugin.quantize_model_)."
            )


def _check_finite(ckpt: _Checkpoint, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (as stored) must be finite, and so must its cast to the requested dtype; returns the cast tensor."""
    if not all_finite(t):
        raise RotationError(
            f"tensor {name} of {ckpt.folder} holds NaN or Inf values; a rotation would spread them over whole "
            "rows. Fix or re-download the checkpoint (nothing was written)."
        )
    cast = ckpt.cast(t)
    if cast is not t and not all_finite(cast):
        raise RotationError(
            f"tensor {name} of {ckpt.folder} holds values beyond {str(ckpt.dtype).removeprefix('torch.')}'s range "
            f"(stored as {str(t.dtype).removeprefix('torch.')}; float16 ends at ±65504): the cast would make them ±Inf. "
            "Rotate in float32 or bfloat16 (CLI: --dtype bfloat16) (nothing was written)"
        )
    return cast


class _Intake:
    """The one read of every input tensor, and what it feeds besides the rotation: the in-memory path's value checks,
    the base fingerprint and the record's ``norm_rms``, all taken before the tensor's unit is edited in place.

    ``read(name)`` returns the tensor as the in-memory path loads it (cast to the requested dtype). The first read
    of each weight (a name in ``params``) refuses non-finite values (:func:`_check_finite`) and samples it for the
    fingerprint; a norm gain folded by R1 gives its rms. (Sampling through ``mmap`` instead cost 230 s on a 7B:
    each of the 64 page faults per tensor triggers the kernel's read-around of an input no longer in the page
    cache; a separate checking pass cost a second read of the whole input.)
    """

    def __init__(self, ckpt: _Checkpoint, params: list[str], norms: dict[str, tuple[int, int]], norm_offset: float):
        self.ckpt, self.params, self.norms, self.norm_offset = ckpt, set(params), norms, norm_offset
        self.fingerprinter = Fingerprinter()
        self.norm_rms: dict[tuple[int, int], float] = {}
        self.seconds = 0.0

    def read(self, name: str) -> torch.Tensor:
        t = self.ckpt.read(name, cast=False)
        start = time.perf_counter()
        if name in self.params and name not in self.fingerprinter:
            t = _check_finite(self.ckpt, name, t)
            self.fingerprinter.take(name, t)
        else:
            t = self.ckpt.cast(t)
        if name in self.norms:
            self.norm_rms[self.norms[name]] = _rms(t.to(torch.float64) + self.norm_offset)
        self.seconds += time.perf_counter() - start
        return t

    def finish(self, n_layers: int | None) -> tuple[str, list[list[float]] | None]:
        """(base fingerprint, ``norm_rms``) once every unit was read; a weight or norm no unit read (none in the
        built-in families) is read and checked here, before anything is published."""
        for name in sorted(n for n in self.params if n not in self.fingerprinter):
            self.read(name)
        for name in sorted(n for n, key in self.norms.items() if key not in self.norm_rms):
            self.read(name)
        norm_rms = None if n_layers is None else [[self.norm_rms[(i, k)] for k in (0, 1)] for i in range(n_layers)]
        logger.info("checked and fingerprinted %d tensors in the rotation pass's read (%.1f s)", len(self.params), self.seconds)
        return self.fingerprinter.hexdigest(), norm_rms


# ---------------------------------------------------------------------------------------------- units of work


@dataclass
class _Unit:
    """Skeleton modules loaded, edited and written together; ``sources`` maps output names read under another
    name (a tied ``lm_head.weight`` is the unrotated embedding); ``copied`` tensors pass through unchanged."""

    paths: tuple[str, ...] = ()
    edit: Callable[[], None] = lambda: None
    sources: dict[str, str] = field(default_factory=dict)
    copied: tuple[str, ...] = ()

    def names(self, skeleton: nn.Module) -> list[str]:
        return [f"{p}.{k}" for p in self.paths for k in get_submodule(skeleton, p).state_dict()] + list(self.copied)


def _units(skeleton, spec: ArchitectureSpec, dims: ModelDims, transforms: dict, cdtype, tied: bool) -> list[_Unit]:
    """The units of ``rotate_model_``'s pass, in its order: embedding, layers, residual writers, norm + head."""
    r1 = transforms.get("r1")
    get = lambda path: get_submodule(skeleton, path)  # noqa: E731
    units = [_Unit((spec.embed,), (lambda: _rotate_embedding(get(spec.embed), cdtype, r1.apply)) if r1 else (lambda: None))]
    for i, layer in enumerate(spec.decoder_layers(skeleton)):
        units.append(_Unit((f"{spec.layers}.{i}",), lambda layer=layer: _rotate_layer(layer, spec, dims, transforms, cdtype)))
    for path in spec.residual_writers if r1 else ():
        units.append(_Unit((path,), lambda path=path: _rotate_linear(get(path), cdtype, left=r1.apply)))
    if not (r1 and spec.lm_head is not None):
        heads = (spec.lm_head,) if spec.lm_head is not None and not tied else ()
        return units + [_Unit((spec.final_norm, *heads))]

    def fold_head():
        norm, head = get(spec.final_norm), get(spec.lm_head)
        _rotate_linear(head, cdtype, scale=_norm_gain(norm, spec, cdtype), right=r1.apply)
        _reset_norm(norm, spec)

    sources = {f"{spec.lm_head}.weight": f"{spec.embed}.weight"} if tied else {}
    return units + [_Unit((spec.final_norm, spec.lm_head), fold_head, sources)]


def _with_rest(units: list[_Unit], skeleton: nn.Module, names: list[str]) -> list[_Unit]:
    """Add one pass-through unit per model tensor outside every unit (e.g. a family's extra modules)."""
    covered = {n for u in units for n in u.names(skeleton)}
    return units + [_Unit(copied=(n,)) for n in names if n not in covered]


def _run_unit(unit: _Unit, skeleton: nn.Module, intake: _Intake) -> dict[str, torch.Tensor]:
    """Read (and check) the unit's tensors into the skeleton, apply its edit, return its tensors and release the
    modules."""
    modules = [get_submodule(skeleton, p) for p in unit.paths]
    for path, module in zip(unit.paths, modules):
        state = {k: intake.read(unit.sources.get(f"{path}.{k}", f"{path}.{k}")) for k in module.state_dict()}
        module.load_state_dict(state, strict=True, assign=True)
    copied = {n: intake.read(n) for n in unit.copied}  # checked before the edit like the rest
    _edit_unit(unit)
    out = {f"{p}.{k}": v.detach() for p, m in zip(unit.paths, modules) for k, v in m.state_dict().items()}
    check_finite_output(out.items(), what=str(intake.ckpt.folder))  # float16: a rotation can overflow finite weights
    out.update(copied)
    for module in modules:
        module.to("meta")
    return out


def _edit_unit(unit: _Unit) -> None:
    """The unit's rotation maths (its own frame, so a profile of the pass shows the maths apart from the I/O)."""
    unit.edit()


# ---------------------------------------------------------------------------------------------- writing


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Give the heap pages freed by the last unit back to the OS (glibc ``malloc_trim(0)``; no-op elsewhere).

    glibc raises its mmap threshold to the size of the last freed mapped block (up to 32 MiB): after the first
    R4 row chunk of a 7B ``down_proj`` (381 × 11008 float64, just under 32 MiB) every temporary of that size
    lands in the heap, which keeps freed space instead of unmapping it — measured +0.4-0.9 GB of RSS over a
    7B run without this call.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _ShardWriter:
    """Writes tensors, in the order planned, into safetensors shards of at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own); each shard is saved as soon as its last tensor arrives."""

    def __init__(self, folder: Path, plan: list[tuple[str, int]], max_shard_bytes: int):
        self.folder, self.shards, sizes = folder, [], []
        for name, nbytes in plan:
            if not self.shards or (sizes[-1] + nbytes > max_shard_bytes and sizes[-1] > 0):
                self.shards.append([])
                sizes.append(0)
            self.shards[-1].append(name)
            sizes[-1] += nbytes
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_size = sum(nbytes for _, nbytes in plan)
        self.pending: dict[str, torch.Tensor] = {}
        self.done = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.pending.update(tensors)
        while self.done < len(self.shards) and all(n in self.pending for n in self.shards[self.done]):
            shard = {n: self.pending.pop(n).contiguous() for n in self.shards[self.done]}
            save_file(shard, str(self.folder / self.files[self.done]), metadata={"format": "pt"})
            logger.info("wrote shard %s (%d tensors)", self.files[self.done], len(shard))
            self.done += 1

    def finish(self) -> None:
        if self.done != len(self.shards) or self.pending:
            raise RuntimeError(f"streaming rotation wrote {self.done}/{len(self.shards)} shards; {len(self.pending)} tensors left")
        if len(self.files) > 1:
            weight_map = {n: f for f, names in zip(self.files, self.shards) for n in names}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(self.folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def _write_metadata(src: Path, tmp: Path, hf_config, record: RotationRecord, untied: bool, dtype) -> None:
    """config.json (record, untie, dtype as ``save_pretrained`` writes them), copied files, record, transforms."""
    setattr(hf_config, RECORD_KEY, record.to_dict())
    if untied:
        for cfg in {id(c): c for c in (hf_config, hf_config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
    if dtype is not None:
        hf_config.dtype = dtype
    hf_config.save_pretrained(str(tmp))
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    ct = transform_config_dict(record)
    if ct is not None:
        atomic_write_text(tmp / TRANSFORM_CONFIG_FILE, json.dumps(ct, indent=2, sort_keys=True) + "\n")
    seal_export(tmp, record)  # last: the record (config.json and rolora_rotation.json) with checksums of what was written


# ---------------------------------------------------------------------------------------------- entry point


@dataclass
class _Job:
    """Everything checked and planned before the first byte is written."""

    ckpt: _Checkpoint
    hf_config: object
    skeleton: nn.Module
    units: list[_Unit]
    intake: _Intake
    record: Callable[[str, list | None], RotationRecord]  # (base fingerprint, norm_rms) -> the record
    n_layers: int | None  # layers whose folded norms' rms the record holds (None without R1)
    untied: bool


def _prepare(src: Path, config: RotationConfig, dtype) -> _Job:
    hf_config = _load_config(src)
    _check_config(src, hf_config)
    spec = _spec_for(hf_config)
    dims = ModelDims.from_config(hf_config)
    check_layer_count(src, hf_config, "source checkpoint")  # a config of 10**6 layers: refused before its skeleton is built
    skeleton = _skeleton(hf_config)  # meta device: no memory, whatever config.json claims
    names, params = _model_tensors(skeleton)
    ckpt = _Checkpoint(src, dtype)  # the headers only
    try:
        _check_tensors(ckpt, skeleton, names)  # config.json's dims against the weights' shapes, before any allocation
        transforms = build_rotations(config, dims)  # raises before any tensor is read if a width is not allowed
        _check_structure(skeleton, spec, spec.decoder_layers(skeleton))
        tied = spec.lm_head is not None and get_submodule(skeleton, spec.lm_head).weight is get_submodule(skeleton, spec.embed).weight
        if config.r1 and tied and not config.untie_embeddings:
            raise RotationError("R1 on a model with tied embeddings needs RotationConfig(untie_embeddings=True)")
        units = _with_rest(_units(skeleton, spec, dims, transforms, getattr(torch, config.compute_dtype), tied), skeleton, names)
        _check_dtypes(ckpt, params)  # from the headers; the values are checked as the rotation pass reads them
    except BaseException:
        ckpt.close()
        raise
    n_layers = len(spec.decoder_layers(skeleton)) if config.r1 else None
    record = functools.partial(
        RotationRecord,
        config=config,
        family=spec.name,
        dims=dims,
        rotations={n: {"width": t.n, "description": t.description, "exact": t.exact, "checksum": t.checksum()} for n, t in transforms.items()},
    )
    intake = _Intake(ckpt, params, _norm_names(spec, n_layers), spec.norm_offset)
    return _Job(ckpt, hf_config, skeleton, units, intake, record, n_layers, untied=bool(config.r1 and tied))


def _norm_names(spec: ArchitectureSpec, n_layers: int | None) -> dict[str, tuple[int, int]]:
    """The gains whose rms ``RotationRecord.norm_rms`` holds, as ``rotate_model_`` records it (each layer's two
    folded norms): tensor name -> (layer, 0 for the input norm / 1 for the post-attention norm)."""
    norms = (spec.input_norm, spec.post_attention_norm)
    return {f"{spec.layers}.{i}.{norm}.weight": (i, k) for i in range(n_layers or 0) for k, norm in enumerate(norms)}


def _check_output(out: Path, src: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise OutputExistsError(f"out_dir {out} is the source checkpoint; write the rotated checkpoint elsewhere")
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists; choose a new output path, remove it, or pass overwrite=True")
    check_writable_parent(out)


def rotate_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: RotationConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> RotationRecord:
    """Rotate the safetensors checkpoint in ``src_dir`` into a new checkpoint ``out_dir``, unit by unit.

    Same result, bit for bit, as ``rotate_model_(AutoModelForCausalLM.from_pretrained(src_dir, dtype=...), config)``
    followed by a save, with peak memory of one decoder layer plus one output shard (see the module doc).
    ``src_dir`` is never modified (hence no trailing underscore).

    Args:
        src_dir: folder with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
        out_dir: new folder (must not exist or be empty unless ``overwrite``); written atomically.
        config: which rotations; default ``RotationConfig()`` = R1 + R4.
        dtype: cast floating tensors to this dtype (as ``from_pretrained(dtype=...)``); None keeps each tensor's.
        max_shard_bytes: upper bound of an output shard (one bigger tensor gets its own shard); bounds memory.
        overwrite: replace an existing ``out_dir`` (its old content is removed only once the new one is complete).
        progress: tqdm bars over the tensors checked and written.

    Returns:
        The :class:`~rolora_plugin.rotate.rotation.RotationRecord`, also in ``out_dir/config.json`` (``rolora``) and
        ``out_dir/rolora_rotation.json``. Load the result with :func:`rolora_plugin.io.export.load_rotated`.

    Raises:
        RotationError, UnsupportedArchitectureError, NoHadamardError, OutputExistsError: before anything is
        published. Config, headers (missing tensors, shapes, dtypes) and widths are refused before anything is
        read; a weight's values (NaN/Inf, beyond ``dtype``'s range) as the pass reads it, which deletes what was
        staged so far and leaves an existing ``out_dir`` as it was.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    config = config or RotationConfig()
    if config.learn:
        raise RotationError(
            f"rotate_checkpoint streams weights and never runs the model, so it cannot learn rotations "
            f"(RotationConfig.learn={list(config.learn)}): load the model and call rotate_model_(model, config, "
            "calibration=...), or drop learn for Hadamard rotations"
        )
    src, out = Path(src_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise RotationError(f"{src} has no config.json; pass a folder written by save_pretrained")
    _check_output(out, src, overwrite)
    job = _prepare(src, config, dtype)
    try:
        record = _write(job, src, out, dtype, max_shard_bytes, overwrite, progress)
    finally:
        job.ckpt.close()
    logger.info("rotated %s -> %s (%s): %s", src, out, record.family, {k: v["description"] for k, v in record.rotations.items()})
    return record


def _write(job: _Job, src: Path, out: Path, dtype, max_shard_bytes: int, overwrite: bool, progress: bool) -> RotationRecord:
    """The one pass: read, check, rotate and write each unit into the staging folder; the record last; publish."""
    ckpt, skeleton = job.ckpt, job.skeleton
    plan = [(n, _nbytes(ckpt, u.sources.get(n, n))) for u in job.units for n in u.names(skeleton)]
    with atomic_output_dir(out, overwrite=overwrite) as tmp, shared_workspaces():  # one workspace pair for every edit
        writer = _ShardWriter(tmp, plan, max_shard_bytes)
        with tqdm(total=len(plan), desc="rotating tensors", unit="tensor", disable=not progress, leave=False) as bar:
            for i, unit in enumerate(job.units):
                if i + 1 < len(job.units):  # its reads overlap this unit's maths
                    ckpt.prefetch(job.units[i + 1].sources.get(n, n) for n in job.units[i + 1].names(skeleton))
                tensors = _run_unit(unit, skeleton, job.intake)
                writer.add(tensors)
                bar.update(len(tensors))
                del tensors
                release_freed_memory()
        fingerprint, norm_rms = job.intake.finish(job.n_layers)  # every input checked: only now may it be published
        writer.finish()
        record = job.record(base_fingerprint=fingerprint, norm_rms=norm_rms)
        _write_metadata(src, tmp, job.hf_config, record, job.untied, dtype)
    return record


def _nbytes(ckpt: _Checkpoint, name: str) -> int:
    return _numel(ckpt.shapes[name]) * ckpt.out_itemsize(name)
