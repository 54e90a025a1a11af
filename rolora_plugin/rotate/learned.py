"""Learned rotations: optimise R1 (and R2) on calibration data under W·A fake quantization, exactly orthogonal.

Objective (row-vector convention, ``nn.Linear`` computes ``y = x Wᵀ``). A linear reading the residual stream (q/k/v
after ``input_layernorm``, gate/up after ``post_attention_layernorm``) sees ``x̂ · diag(g) · Wᵀ`` where
``x̂ = x / rms(x)`` is the gain-free RMSNorm output and ``g`` the norm's gain (``1 + w`` for Gemma). After R1 (norm
folded, ``W' = W diag(g)``) it sees ``(x̂ R)(W' R)ᵀ``: unchanged in full precision, so R only moves the quantization
error. With ``x̂`` collected once from the *unrotated* model (``learn_tokens`` random tokens per layer and site)
the learned R1 minimises the relative output error summed over layers and sites::

    L(R) = Σ_sites ‖Q_a(X̂ R) · Q_w(W' R)ᵀ − X̂ W'ᵀ‖² / ‖X̂ W'ᵀ‖²

where a site concatenates the readers of one norm (``W' = [W_q; W_k; W_v] diag(g)``: per-row weight quantization
makes this the sum over the three linears), ``Q_a`` is per-token and ``Q_w`` per-channel (or per-group) RTN on the
grid of :mod:`rolora_plugin.quant.primitives` (same forward values), bits and symmetry from
``QuantConfig.preset(config.learn_quant)``. The gradient is straight-through for ``round`` only: the scales
(``max|x|/qmax``, or ``(max − min)/qmax``) stay in the graph (``fake_quant(..., scale_grad=True)``), because a rotation acts mainly on
each row's range. With the scales detached (``fake_quant(..., ste=True)``) Adam *raised* the objective on a
tiny model with outlier channels at every learning rate tried (0.063 → 0.065–0.078, 30 steps); with them it fell
(0.063 → 0.043), and on SmolLM2-135M by 17% (2.569 → 2.135, 60 steps). R2 (one head-wise rotation shared by all layers, as the Hadamard R2 is)
uses the o_proj site: ``Q_a(X_o B) Q_w(W_o B)ᵀ`` vs ``X_o W_oᵀ`` with ``B = I_heads ⊗ R2``. Not in the objective:
the output-side (row) rotation of the writers (o_proj, down_proj) and of v_proj, and GPTQ's error feedback.

Method: **Cayley parametrisation** ``R = R0 · (I − S)⁻¹(I + S)``, ``S = A − Aᵀ``, ``A`` trained with Adam from 0,
``R0`` the random-sign Hadamard the config would build (so step 0 is exactly the Hadamard baseline). Why: every
iterate is orthogonal by construction (no retraction schedule, any optimiser works, one d×d solve per step, cheap
next to the d×rows products); the SpinQuant paper uses Cayley SGD on the Stiefel manifold for the same reason; a
re-parametrisation keeps it to plain Adam. Each step uses the terms of ``learn_layers_per_step`` random layers
and, per site, ``ROWS_PER_STEP`` random weight rows (stochastic, seeded; rows are independent under per-channel
weight quantization, so the subsampled term is unbiased). At the end ``R`` is recomputed in float64 and projected on
the orthogonal group (polar factor ``U Vᴴ`` of its SVD), so ``‖RᵀR − I‖ ≤ 1e-10``; if the full objective did not decrease, the Hadamard start is kept.

The learned matrix becomes an ``OrthogonalTransform(n, dense=R, pow2=1, exact=False, description="learned-r1(...)")``
so every weight edit and checksum works unchanged. It travels with the model and its record, never through module state: in memory attached to the model
(``model._rolora_learned_rotations``, read by :func:`rolora_plugin.get_rotation_record`) and held by the
:class:`~rolora_plugin.RotationRecord` (its ``learned`` field, not serialised); on disk as
``rolora/learned_rotations.safetensors`` beside ``rolora_rotation.json`` (:func:`save_learned`), whose record entry
holds the matrix's sha256; :func:`load_learned` (called by :func:`rolora_plugin.io.export.read_rotation_record`) fills the
record's ``learned`` and refuses a missing, altered or non-orthogonal file.

Paper: SpinQuant (Liu et al., 2024) for learned rotations under quantization; DartQuant (2025) for learning them
from per-layer activations instead of end-to-end.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .._peft import lora_parts as _lora_parts
from ..errors import RotationError
from ..hadamard.constructions import derive_seed
from ..hadamard.transform import OrthogonalTransform
from ..model.architectures import ArchitectureSpec, ModelDims, get_submodule
from ..quant.calibration import _batches, check_calibration
from ..quant.config import QuantConfig
from ..quant.primitives import fake_quant

__all__ = [
    "LEARNED_FILE",
    "ORTHOGONALITY_TOL",
    "learn_rotations",
    "learned_names",
    "learned_transform",
    "cayley",
    "nearest_orthogonal",
    "rotation_objective",
    "collect_sites",
    "attach_learned",
    "record_entries",
    "resolve_learned",
]

logger = logging.getLogger(__name__)
# In a subfolder: a serving engine's loader globs every top-level *.safetensors of a checkpoint as model weights
# (vLLM then fails on "no module or parameter named 'r1'"). Exports of 0.1 kept it at the top (LEGACY_LEARNED_FILE).
LEARNED_FILE = "rolora/learned_rotations.safetensors"
LEGACY_LEARNED_FILE = "rolora_learned_rotations.safetensors"
ORTHOGONALITY_TOL = 1e-10  # max |RᵀR − I| accepted for a stored matrix (float64)
ROWS_PER_STEP = 512  # weight rows (output channels) per site and training step: an unbiased subsample
_ATTR = "_rolora_learned_rotations"  # the model attribute holding {name: OrthogonalTransform} (held_learned)


# ---------------------------------------------------------------------------------------------- maths


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """``(I − S)⁻¹ (I + S)`` for a skew-symmetric S (d, d): orthogonal, differentiable; ``cayley(0) = I``."""
    eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
    return torch.linalg.solve(eye - skew, eye + skew)


def nearest_orthogonal(m: torch.Tensor) -> torch.Tensor:
    """Polar factor ``U Vᴴ`` of ``m = U Σ Vᴴ`` in float64: the orthogonal matrix nearest to m (Frobenius)."""
    u, _, vh = torch.linalg.svd(m.to(torch.float64))
    return u @ vh


def orthogonality_error(m: torch.Tensor) -> float:
    """``max |mᵀm − I|`` in float64."""
    m = m.to(torch.float64)
    return (m.T @ m - torch.eye(m.shape[0], dtype=torch.float64)).abs().max().item()


def learned_transform(matrix: torch.Tensor, description: str) -> OrthogonalTransform:
    """The :class:`OrthogonalTransform` ``x ↦ x @ matrix`` of a learned (n, n) orthogonal matrix (stored float64)."""
    m = matrix.detach().to(torch.float64).contiguous()
    return OrthogonalTransform(n=m.shape[0], dense=m, pow2=1, exact=False, description=description)


@dataclass
class _Site:
    """One objective term: inputs ``x`` (T, d), weight ``w`` (rows, d), reference ``x wᵀ``, its energy, the rotation."""

    layer: int
    rotation: str  # "r1" or "r2"
    x: torch.Tensor
    w: torch.Tensor
    ref: torch.Tensor
    energy: float


def _site(layer: int, rotation: str, x: torch.Tensor, w: torch.Tensor) -> _Site:
    ref = x @ w.T
    return _Site(layer, rotation, x, w, ref, max(ref.pow(2).sum().item(), 1e-30))


def _blockwise(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x (I ⊗ r)``: r (hd, hd) applied to every head slice of the last dim."""
    return (x.reshape(*x.shape[:-1], -1, r.shape[0]) @ r).reshape(x.shape)


def rotation_objective(sites, rotations: dict[str, torch.Tensor], quant, *, detached_scales: bool = False, rows=None) -> torch.Tensor:
    """``Σ ‖Q_a(x R) Q_w(w R)ᵀ − x wᵀ‖² / ‖x wᵀ‖²`` over ``sites`` (differentiable in the rotations).

    Quantizers: :func:`~rolora_plugin.quant.primitives.fake_quant` with the config's weight / activation specs and
    ``scale_grad=True`` (scales in the graph, rounding straight-through: LSQ / SpinQuant's quantizer);
    ``detached_scales``: ``ste=True`` instead (scales detached); same value, other gradient.
    ``rows``: ``{site index: row indices}``: only those weight rows (output channels) enter that site's term, scaled
    by ``rows_total / rows_kept``. Per-channel weight quantization keeps rows independent, so a random subset is an
    unbiased estimate of the full term at a fraction of the cost (the training steps use it).
    """
    mode = {"ste": True} if detached_scales else {"scale_grad": True}
    a_spec, w_spec = quant.activation_spec(), quant.weight_spec()
    qa = lambda t: fake_quant(t, a_spec, **mode)  # noqa: E731
    qw = lambda t: fake_quant(t, w_spec, **mode)  # noqa: E731
    total = torch.zeros((), dtype=torch.float32)
    for k, s in enumerate(sites):
        r = rotations.get(s.rotation)
        if r is None:
            continue
        rot = (lambda t: t @ r) if s.rotation == "r1" else (lambda t: _blockwise(t, r))
        idx = None if rows is None else rows.get(k)
        w, ref = (s.w, s.ref) if idx is None else (s.w[idx], s.ref[:, idx])
        xq, wq = qa(rot(s.x)), qw(rot(w))
        weight = 1.0 if idx is None else s.w.shape[0] / len(idx)
        total = total + (xq @ wq.T - ref).pow(2).sum() * (weight / s.energy)
    return total


# ---------------------------------------------------------------------------------------------- collection


def _gain_free(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``x / rms(x)`` (the RMSNorm without its gain) in float32, rows flattened to (tokens, d)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _Sampler:
    """Keeps ``per_batch`` random rows (seeded generator) of every tensor it is handed, per key."""

    def __init__(self, per_batch: int, generator: torch.Generator):
        self.per_batch, self.g, self.rows = per_batch, generator, {}

    def add(self, key, x: torch.Tensor) -> None:
        idx = torch.randperm(x.shape[0], generator=self.g)[: self.per_batch]
        self.rows.setdefault(key, []).append(x[idx])


def _weights(layer: nn.Module, paths, gain: torch.Tensor | None) -> torch.Tensor:
    w = torch.cat([_lora_parts(get_submodule(layer, p))[0].weight.detach().float() for p in paths])
    return w * gain if gain is not None else w


def _hooks(layers, spec: ArchitectureSpec, learn, sampler: _Sampler) -> list:
    handles = []
    for i, layer in enumerate(layers):
        if "r1" in learn:
            for key, path in (("attn", spec.input_norm), ("mlp", spec.post_attention_norm)):
                norm = get_submodule(layer, path)
                hook = lambda m, args, i=i, key=key: sampler.add((i, key), _gain_free(args[0], m))  # noqa: E731
                handles.append(norm.register_forward_pre_hook(hook))
        if "r2" in learn:
            o = _lora_parts(get_submodule(layer, spec.o_proj))[0]
            hook = lambda m, args, i=i: sampler.add((i, "o"), args[0].detach().reshape(-1, args[0].shape[-1]).float())  # noqa: E731
            handles.append(o.register_forward_pre_hook(hook))
    return handles


def collect_sites(model: nn.Module, spec: ArchitectureSpec, config, calibration, generator: torch.Generator) -> list[_Site]:
    """Run the (unrotated) model on ``calibration`` once and build the objective terms of every layer.

    R1 sites: per layer ``attn`` (x̂ before the attention readers, ``W' = [readers] diag(g_input_norm)``) and ``mlp``
    (the same for the MLP readers); R2 site: o_proj's input and weight. Each keeps ``config.learn_tokens`` tokens.
    """
    batches = _batches(calibration, next(model.parameters()).device)
    sampler = _Sampler(-(-config.learn_tokens // len(batches)), generator)
    layers = spec.decoder_layers(model)
    handles = _hooks(layers, spec, config.learn, sampler)
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return _build_sites(layers, spec, config, sampler.rows)


def _build_sites(layers, spec: ArchitectureSpec, config, rows: dict) -> list[_Site]:
    sites = []
    for i, layer in enumerate(layers):
        take = lambda key: torch.cat(rows[(i, key)])[: config.learn_tokens]  # noqa: E731
        if "r1" in config.learn:
            for key, norm_path, readers in (("attn", spec.input_norm, spec.attention_inputs()), ("mlp", spec.post_attention_norm, spec.mlp_inputs())):
                gain = spec.norm_gain(get_submodule(layer, norm_path), torch.float32)
                sites.append(_site(i, "r1", take(key), _weights(layer, readers, gain)))
        if "r2" in config.learn:
            sites.append(_site(i, "r2", take("o"), _weights(layer, (spec.o_proj,), None)))
    return sites


# ---------------------------------------------------------------------------------------------- learning


def learn_rotations(
    model: nn.Module, spec: ArchitectureSpec, dims: ModelDims, config, transforms: dict, calibration, *, quant=None, given=None, progress: bool = True
) -> dict:
    """``transforms`` with the rotations named in ``config.learn`` replaced by learned ones (model unchanged).

    Args:
        model: the *unrotated* bare model (its activations are collected here).
        transforms: the rotations ``build_rotations(config, dims)`` gives: the Hadamard starting points.
        calibration: ``input_ids`` tensors (batch, seq) or dicts for ``model(**batch)``; required.
        quant: the QuantConfig whose bits / symmetry the objective uses (default ``preset(config.learn_quant)``).
        given: ``{name: OrthogonalTransform}`` learned before (e.g. read by :func:`load_learned`): used as they are.
    """
    if given is not None:
        return _given(config, transforms, given)
    if calibration is None:
        raise RotationError(
            f"RotationConfig(learn={list(config.learn)}) learns rotations on calibration data: pass "
            "rotate_model_(model, config, calibration=[input_ids tensors or dicts]) or RoLoRACallback(config, "
            "calibration=[...]) (or drop learn for Hadamard rotations)"
        )
    quant = quant or QuantConfig.preset(config.learn_quant)  # a known preset: RotationConfig checked the name
    _refuse_moe(model, spec, config)
    calibration = check_calibration(model, calibration)
    g = torch.Generator(device="cpu").manual_seed(derive_seed(config.seed, "learn"))
    sites = collect_sites(model, spec, config, calibration, g)
    starts = {n: transforms[n].matrix(torch.float64) for n in config.learn}
    params = {n: torch.zeros_like(m, dtype=torch.float32, requires_grad=True) for n, m in starts.items()}
    before = _full_objective(sites, starts, quant)
    _optimise(sites, starts, params, quant, config, g, progress)
    learned = {n: nearest_orthogonal(m @ cayley(_skew(params[n].detach().double()))) for n, m in starts.items()}
    after = _full_objective(sites, learned, quant)
    logger.info("learned %s: W%dA%d objective %.5g → %.5g (%d steps, %d sites)", list(config.learn), quant.w_bits, quant.a_bits, before, after, config.learn_steps, len(sites))
    if not after < before:
        logger.warning("learned rotations did not lower the calibration objective (%.5g → %.5g): keeping the Hadamard start", before, after)
        learned = starts
    out = dict(transforms)
    for n, m in learned.items():
        out[n] = learned_transform(m, _description(n, config, transforms[n]) + ("" if m is not starts.get(n) else "[start kept]"))
    return out


def _refuse_moe(model: nn.Module, spec: ArchitectureSpec, config) -> None:
    """R1's objective has a site per norm reader; fused MoE experts (3-D, routed) have none yet."""
    if "r1" in config.learn and spec.experts is not None and any(spec.is_moe_layer(x) for x in spec.decoder_layers(model)):
        raise RotationError(
            f"learning R1 is not supported for Mixture-of-Experts models yet ({spec.name}: the fused experts read the "
            "residual stream through routed 3-D weights the objective does not model); use Hadamard R1 "
            "(RotationConfig.preset('w4a4-hadamard')) or learn=('r2',)"
        )


def _given(config, transforms: dict, given: dict) -> dict:
    missing = sorted(set(config.learn) - set(given))
    if missing:
        raise RotationError(f"learned rotations {missing} were asked for (RotationConfig.learn) but not given; pass them all or calibration data")
    for n in config.learn:
        if given[n].n != transforms[n].n:
            raise RotationError(f"the given learned {n} has width {given[n].n}, the model needs {transforms[n].n}")
    return {**transforms, **{n: given[n] for n in config.learn}}


def _skew(a: torch.Tensor) -> torch.Tensor:
    return a - a.T


def _full_objective(sites, matrices: dict, quant) -> float:
    with torch.no_grad():
        return rotation_objective(sites, {n: m.float() for n, m in matrices.items()}, quant).item()


def _optimise(sites, starts: dict, params: dict, quant, config, g: torch.Generator, progress: bool) -> None:
    """Adam on the Cayley parameters; each step the terms of ``learn_layers_per_step`` random layers."""
    opt = torch.optim.Adam(list(params.values()), lr=config.learn_lr)
    r0 = {n: m.float() for n, m in starts.items()}
    n_layers = 1 + max(s.layer for s in sites)
    per_step = config.learn_layers_per_step or n_layers
    bar = tqdm(range(config.learn_steps), desc="learning rotations", disable=not progress, leave=False)
    for _ in bar:
        chosen = set(torch.randperm(n_layers, generator=g)[:per_step].tolist())
        batch = [s for s in sites if s.layer in chosen]
        rows = {k: torch.randperm(s.w.shape[0], generator=g)[:ROWS_PER_STEP] for k, s in enumerate(batch)}
        rots = {n: r0[n] @ cayley(_skew(params[n])) for n in params}
        loss = rotation_objective(batch, rots, quant, rows=rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(objective=f"{loss.item() * n_layers / len(chosen):.4g}")


def _description(name: str, config, start: OrthogonalTransform) -> str:
    return (
        f"learned-{name}(seed={config.seed},steps={config.learn_steps},lr={config.learn_lr:g},tokens={config.learn_tokens},"
        f"layers_per_step={config.learn_layers_per_step},quant={config.learn_quant},from={start.checksum()})"
    )


# ---------------------------------------------------------------------------------------------- record and files


def learned_names(record) -> list[str]:
    """Names of the rotations of ``record`` (a RotationRecord) that were learned."""
    return sorted(n for n, r in record.rotations.items() if r.get("learned"))


def matrix_sha256(m: torch.Tensor) -> str:
    return hashlib.sha256(m.detach().cpu().to(torch.float64).contiguous().numpy().tobytes()).hexdigest()


def record_entries(transforms: dict, config) -> dict:
    """The extra record fields of every learned rotation: ``{name: {"learned": True, "sha256", "file"}}``."""
    return {n: {"learned": True, "sha256": matrix_sha256(transforms[n].dense), "file": LEARNED_FILE} for n in config.learn}


def attach_learned(model: nn.Module, transforms: dict, names) -> None:
    """Keep the learned transforms on ``model`` (a plain, non-persistent attribute: :func:`held_learned`)."""
    model.__dict__[_ATTR] = {n: transforms[n] for n in names}


def held_learned(model: nn.Module) -> dict:
    """``{name: OrthogonalTransform}`` of the learned rotations ``model`` holds (empty when none)."""
    return dict(model.__dict__.get(_ATTR, {}))


def resolve_learned(record, transforms: dict) -> dict:
    """``transforms`` (rebuilt from the config) with each learned rotation of ``record`` taken from ``record.learned``."""
    out = dict(transforms)
    for name in learned_names(record):
        held = record.learned.get(name)
        if held is None:
            raise RotationError(
                f"the rotation record's {name} is a learned matrix (checksum {record.rotations[name]['checksum']}) that "
                f"this record does not hold: load the model with rolora_plugin.load_rotated(<dir>), or read the record "
                f"with rolora_plugin.io.export.read_rotation_record(<dir>) (both read {LEARNED_FILE}), or take it from the "
                "model that learned it (rolora_plugin.get_rotation_record(model))"
            )
        out[name] = held
    return out
