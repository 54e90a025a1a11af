"""``QuantConfig``: what :func:`rolora_plugin.quant.quantize_model_` does, validated, dict / JSON round trip.

The same config describes a fake-quant forward (QAT, the W4A4 monitor): :class:`rolora_plugin.QATConfig` and
:class:`rolora_plugin.MonitorConfig` *hold* one (``QATConfig(quant=QuantConfig(...))``) instead of copying its fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, FieldSpec, short_repr, spec
from .calibration import DEFAULT_A_CLIP_CANDIDATES
from .primitives import FORMATS, FP4_GROUP, INT_GRIDS, OFF_BITS, TensorQuant, _check_bits

__all__ = ["QuantConfig", "WEIGHT_METHODS", "QUANT_PRESETS", "SERVABLE_PRESETS"]

WEIGHT_METHODS = ("rtn", "gptq")  # weight quantizers; rolora_plugin.quant.model dispatches on them

_W4A4 = dict(
    w_bits=4, a_bits=4, method="gptq", w_clip_search=True, w_clip_grid=50, w_clip_max_shrink=0.5, a_sym=False, a_clip_search=True
)
# name -> QuantConfig fields; measured in benchmarks/peer_llmcompressor.py and benchmarks/RESULTS.md
QUANT_PRESETS = {
    "w4a4": _W4A4,
    "w4a4kv4": dict(_W4A4, kv_bits=4),
    "w4a4-gate-up-a8": dict(_W4A4, a_bits_for={"gate_proj": 8, "up_proj": 8}),  # mixed: not W4A4
    "w4a8": dict(_W4A4, a_bits=8, a_sym=True, a_clip_search=False, int_grid="full"),
    "w8a8": dict(w_bits=8, a_bits=8, int_grid="full"),
    # servable W4A4: what a serving engine computes (README "Deploying"; QuantConfig.engine_contract)
    "w4a4-int": dict(_W4A4, a_sym=True, a_clip_search=False, int_grid="full"),
    "nvfp4": dict(w_bits=4, a_bits=4, w_format="nvfp4", a_format="nvfp4", method="gptq", w_clip_search=True, w_clip_grid=50, w_clip_max_shrink=0.5),
    "mxfp4": dict(w_bits=4, a_bits=4, w_format="mxfp4", a_format="mxfp4", method="gptq", w_clip_search=True, w_clip_grid=50, w_clip_max_shrink=0.5),
}
SERVABLE_PRESETS = ("w4a4-int", "nvfp4", "mxfp4", "w4a8", "w8a8")

_BITS = "an int in 2..16 (16 means no quantization)"
_RATIO = dict(kind=float, gt=0, max=1, what="a number in (0, 1] (1 = no clipping)")


def _all_str(names) -> bool:
    return all(isinstance(n, str) for n in names)


def _str_keys(mapping: dict) -> bool:
    return _all_str(mapping)


@dataclass
class QuantConfig(Config):
    """What :func:`quantize_model_` does. 16 bits means "off" for that tensor kind.

    Args:
        w_bits / a_bits / kv_bits: weight, activation (linear inputs) and KV-cache bits, each in 2..16.
        w_group_size: quantize weights per group of this many input columns (None: per output channel).
        w_sym / a_sym / kv_sym: symmetric (zero point 0) or asymmetric grids.
        a_bits_for: per-linear activation bits overriding ``a_bits``, ``{name: bits}`` with names matched like
            ``skip`` (full name, dotted suffix or leaf name), e.g. ``{"gate_proj": 8, "up_proj": 8}``. A config
            with overrides is a **mixed** setting (e.g. W4 A4/A8), not W4A4: :meth:`label` says so.
        a_clip_ratio / kv_clip_ratio: fixed clip ratio in (0, 1] for the dynamic per-token scales.
        a_clip_search: per linear, pick the activation clip ratio among ``a_clip_candidates`` that minimises the
            layer's output error on calibration data (:mod:`rolora_plugin.quant.calibration`; needs calibration
            data); ``a_clip_ratio`` is then the ratio used upstream while searching and for linears not searched.
        a_clip_candidates: candidate ratios in (0, 1] (1 is always tried).
        w_clip_search: pick a clip ratio per row/group minimising ``Σ|W - Q(W)|^p`` (:func:`~rolora_plugin.quant.mse_clip_search`).
        w_clip_grid / w_clip_max_shrink / w_clip_norm: candidates ``1 - i/grid`` for ``i < max_shrink·grid``; p.
        method: "rtn" (round to nearest) or "gptq" (needs calibration data; :mod:`rolora_plugin.quant.gptq`).
        gptq_damp: damping ``λ = damp · mean(diag H)`` added to the Hessian diagonal.
        gptq_act_order: quantize columns by decreasing ``diag H`` (with groups: static groups, see :mod:`rolora_plugin.quant.gptq`).
        gptq_block_size: columns per lazy-batch block.
        gptq_true_sequential: within a layer, quantize linears in call order, re-running the layer in between
            so later linears see the outputs of already-quantized ones (GPTQ's ``true-sequential``).
        gptq_quantized_inputs: take each Hessian from the *quantized* activations the linear will see
            (``H = 2/n · Q(X)ᵀQ(X)``: the activation quantizers are active during GPTQ, so every layer is also
            calibrated on the outputs of already W·A-quantized layers). Off: full-precision activations (QuaRot).
        skip: linears left in high precision, matched by full name, by a dotted suffix or by leaf name.
        w_format / a_format: ``"int"``, ``"nvfp4"`` (E2M1, groups of 16, FP8 scales, FP32 global scale) or
            ``"mxfp4"`` (E2M1, groups of 32, power-of-two scales); the FP4 formats fix bits (4), symmetry and group
            size (set here). NVFP4 activations use a per-linear ``input_global_scale`` calibrated on ``calibration=``.
        int_grid: symmetric int scale ``max/(2^(b-1)-½)`` (``"full"``: 16 levels at 4 bits, compressed-tensors'
            definition) or ``max/(2^(b-1)-1)`` (``"narrow"``: 15 levels, rolora's grid before 0.2 and vLLM Humming's).
        a_group_size: int activations per group of this many columns (None: per token); FP4: the format's group.
    """

    w_bits: int = spec(4, kind=int, min=2, max=OFF_BITS, what=_BITS)
    a_bits: int = spec(4, kind=int, min=2, max=OFF_BITS, what=_BITS)
    kv_bits: int = spec(OFF_BITS, kind=int, min=2, max=OFF_BITS, what=_BITS)
    w_group_size: int | None = spec(None, kind=int, min=1, optional=True, what="a positive int or None (per channel)")
    w_sym: bool = spec(True, kind=bool)
    a_sym: bool = spec(True, kind=bool)
    kv_sym: bool = spec(False, kind=bool)
    a_bits_for: dict = spec(factory=dict, kind=dict, check=_str_keys, must="map linear names to bits, e.g. {'gate_proj': 8}")
    a_clip_ratio: float = spec(1.0, **_RATIO)
    kv_clip_ratio: float = spec(1.0, **_RATIO)
    a_clip_search: bool = spec(False, kind=bool)
    a_clip_candidates: tuple = spec(
        DEFAULT_A_CLIP_CANDIDATES, kind=tuple, nonempty=True, items=FieldSpec(**_RATIO), what="a non-empty list of ratios in (0, 1]"
    )
    w_clip_search: bool = spec(False, kind=bool)
    w_clip_grid: int = spec(100, kind=int, min=1, what="a positive int")
    w_clip_max_shrink: float = spec(0.8, kind=float, min=0, lt=1, what="in [0, 1)")
    w_clip_norm: float = spec(2.4, kind=float, gt=0, must="be > 0 (it is the p of the error norm)")
    method: str = spec("rtn", choices=WEIGHT_METHODS)
    gptq_damp: float = spec(0.01, kind=float, gt=0, what="> 0 (e.g. 0.01)")
    gptq_act_order: bool = spec(False, kind=bool)
    gptq_block_size: int = spec(128, kind=int, min=1, what="a positive int")
    gptq_true_sequential: bool = spec(True, kind=bool)
    gptq_quantized_inputs: bool = spec(False, kind=bool)
    skip: tuple = spec(("lm_head",), kind=tuple, check=_all_str, what="a list of module names, e.g. ['lm_head']")
    w_format: str = spec("int", choices=FORMATS)
    a_format: str = spec("int", choices=FORMATS)
    int_grid: str = spec("narrow", choices=INT_GRIDS, what="'full' (16 levels at 4 bits) or 'narrow' (15)")
    a_group_size: int | None = spec(None, kind=int, min=1, optional=True, what="a positive int or None (per token)")

    def _check(self) -> None:
        self._check_formats()
        for k, b in self.a_bits_for.items():
            _check_bits(b, f"QuantConfig.a_bits_for[{k!r}]")
        if min(self.w_bits, self.a_bits, self.kv_bits) >= OFF_BITS:
            raise ValueError("QuantConfig: w_bits, a_bits and kv_bits are all 16 (off); set at least one below 16")

    def _check_formats(self):
        """The FP4 formats fix bits, group size and symmetry."""
        for kind, fmt in (("w", self.w_format), ("a", self.a_format)):
            if fmt == "int":
                continue
            group = FP4_GROUP[fmt]
            if getattr(self, f"{kind}_bits") != 4:
                raise ValueError(f"QuantConfig.{kind}_format={fmt!r} is a 4-bit format; set {kind}_bits=4")
            if getattr(self, f"{kind}_group_size") not in (None, group):
                raise ValueError(f"QuantConfig.{kind}_format={fmt!r} uses groups of {group}; leave {kind}_group_size unset (or {group})")
            setattr(self, f"{kind}_group_size", group)
            if kind == "w" and not self.w_sym:
                raise ValueError(f"QuantConfig.w_format={fmt!r} is symmetric; set w_sym=True")
            if kind == "a" and (not self.a_sym or self.a_clip_search or self.a_clip_ratio != 1.0):
                raise ValueError(f"QuantConfig.a_format={fmt!r}: activations are symmetric and unclipped (a_sym=True, no a_clip_*)")
        if self.a_bits_for and self.a_format != "int":
            raise ValueError("QuantConfig.a_bits_for (mixed activation bits) is for int activations only")

    def weight_spec(self, clip_ratio=1.0) -> TensorQuant:
        """The :class:`~rolora_plugin.quant.primitives.TensorQuant` of every quantized weight."""
        return TensorQuant(self.w_format, self.w_bits, self.w_sym, self.int_grid, self.w_group_size, clip_ratio)

    def activation_spec(self, name: str = "", clip_ratio: float | None = None) -> TensorQuant:
        """The dynamic activation quantizer of linear ``name`` (its ``a_bits_for`` bits; ``clip_ratio`` default ``a_clip_ratio``)."""
        bits = self.activation_bits(name) if name else self.a_bits
        clip = self.a_clip_ratio if clip_ratio is None else clip_ratio
        return TensorQuant(self.a_format, bits, self.a_sym, self.int_grid, self.a_group_size, clip)

    def kv_spec(self) -> TensorQuant:
        return TensorQuant("int", self.kv_bits, self.kv_sym, self.int_grid, None, self.kv_clip_ratio)

    def engine_contract(self) -> dict:
        """What a serving engine runs for this config: ``{"servable": bool, "scheme": str, "reasons": [...]}``.

        ``scheme`` is the vLLM 0.34 compressed-tensors scheme class its scheme selection picks for such a checkpoint
        (benchmarks/vllm_scheme.py checks it with vLLM's own code); ``reasons`` says why a config is not servable
        (asymmetric or clipped dynamic activations, a 15-level int grid compressed-tensors does not define, a KV
        cache or mixed bits no engine runs from this format).
        """
        reasons = []
        a_on = self.a_bits < OFF_BITS
        if a_on and self.a_format == "int":
            if not self.a_sym:
                reasons.append("asymmetric dynamic activations (engines take symmetric ones)")
            if self.a_clip_search or self.a_clip_ratio != 1.0:
                reasons.append("activation clip ratios (no field in compressed-tensors; engines quantize unclipped)")
            if self.int_grid != "full":
                reasons.append("15-level int grid max/(2^(b-1)-1): compressed-tensors defines max/(2^(b-1)-1/2)")
        if self.kv_bits < OFF_BITS:
            reasons.append("int KV-cache quantization (vLLM serves FP8 KV caches only)")
        if self.a_bits_for:
            reasons.append("mixed activation bits (a_bits_for)")
        if self.w_format != self.a_format and a_on:
            reasons.append(f"{self.w_format} weights with {self.a_format} activations")
        if self.w_format == "int" and not self.w_sym:
            reasons.append("asymmetric int weights (vLLM's W4A4/W4A8 int schemes take symmetric weights)")
        return {"servable": not reasons, "scheme": self._scheme_name(), "reasons": reasons}

    def _scheme_name(self) -> str:
        if self.w_format == "nvfp4":
            return "CompressedTensorsW4A4Fp4"
        if self.w_format == "mxfp4":
            return "CompressedTensorsW4A4Mxfp4"
        if self.a_bits == 4:
            return "CompressedTensorsWNA4Int"
        if self.a_bits == 8:
            return "CompressedTensorsWNA8Int" if self.w_bits == 4 else "CompressedTensorsW8A8Int8"
        return "CompressedTensorsWNA16" if self.a_bits >= OFF_BITS else "none"

    def activation_bits(self, name: str) -> int:
        """Activation bits of linear ``name``: its ``a_bits_for`` entry (full name, dotted suffix or leaf), else ``a_bits``."""
        for key, bits in self.a_bits_for.items():
            if name == key or name.endswith("." + key):
                return bits
        return self.a_bits

    def label(self) -> str:
        """``"W4A4"``, ``"W4A4KV4"``, or for a mixed setting e.g. ``"W4A4 (A8: gate_proj, up_proj)"`` (never plain W4A4)."""
        if self.w_format != "int" and self.w_format == self.a_format:
            return self.w_format.upper() + " W4A4"
        text = f"W{self.w_bits}A{self.a_bits}" + (f"KV{self.kv_bits}" if self.kv_bits < OFF_BITS else "")
        if self.a_bits_for:
            text += " (" + "; ".join(f"A{b}: {k}" for k, b in sorted(self.a_bits_for.items())) + ")"
        return text

    @classmethod
    def preset(cls, name: str, **overrides) -> QuantConfig:
        """A named recipe (the best we measured: benchmarks/RESULTS.md), optionally with some fields overridden.

        **Servable** presets (:data:`SERVABLE_PRESETS`; :meth:`engine_contract` names the vLLM scheme): the numerics
        are the compressed-tensors format's definition, so its reference forward and vLLM compute this model.

        * ``"w4a4-int"``: int4 symmetric weights per channel (GPTQ + weight clip search), int4 **symmetric dynamic
          per-token** activations on compressed-tensors' 16-level grid (``int_grid="full"``), no activation clip.
          vLLM: ``CompressedTensorsWNA4Int`` (Humming kernels; its dynamic int4 activation scale is max/7, 15
          levels: it computes the ``int_grid="narrow"`` model, see README "Deploying").
        * ``"nvfp4"`` / ``"mxfp4"``: FP4 weights and activations (GPTQ with group-scale clip search), vLLM
          ``CompressedTensorsW4A4Fp4`` / ``CompressedTensorsW4A4MxFp4``.

        The research recipe ``"w4a4"`` is **not servable** (asymmetric, clipped activations): no engine runs it.

        * ``"w4a4"``: every linear but lm_head at 4-bit weights (per channel, symmetric) and 4-bit per-token
          **asymmetric** activations (16 levels over ``[min, max]`` of each token); GPTQ with a per-row weight clip
          search (p = 2.4, ratios 1…0.52); a per-linear activation clip ratio searched on the calibration data
          (:mod:`rolora_plugin.quant.calibration`). What each of these steps measured, with each rotation preset
          and beside llm-compressor: benchmarks/RESULTS.md ("Numbers that lived in config docstrings" and the
          sections it points to). Needs ``calibration=`` in :func:`~rolora_plugin.quant.quantize_model_` and a
          rotated model to be useful: ``RotationConfig.preset("w4a4")`` (R1+R2 learned on calibration data + R4)
          or ``RotationConfig.preset("w4a4-hadamard")`` (Hadamard R1+R2+R4, no calibration).
        * ``"w4a4kv4"``: the same and a 4-bit (asymmetric, per head and token) KV cache; rotate with R3 too.
        * ``"w4a4-gate-up-a8"``: a **mixed** setting, not W4A4: the w4a4 recipe with the MLP inputs (gate_proj,
          up_proj) at 8-bit activations, the kind that dominates the 4-bit activation error on SmolLM2.
        * ``"w4a8"``: GPTQ 4-bit weights, 8-bit symmetric activations. ``"w8a8"``: RTN, 8/8 bits (both on the full grid: servable).

        Example::

            >>> QuantConfig.preset("w4a4", gptq_act_order=True).method
            'gptq'
        """
        if name not in QUANT_PRESETS:
            raise ValueError(f"unknown QuantConfig preset {short_repr(name)}; choose one of {sorted(QUANT_PRESETS)}")
        return cls(**{**QUANT_PRESETS[name], **overrides})

    def clip_search_kwargs(self) -> dict | None:
        """Keyword arguments for :func:`~rolora_plugin.quant.mse_clip_search`, or None when the search is off."""
        if not self.w_clip_search:
            return None
        return dict(grid=self.w_clip_grid, max_shrink=self.w_clip_max_shrink, norm=self.w_clip_norm)
