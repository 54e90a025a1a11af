"""The one base of every config class: declarative field checks, typed nested sections, dict / JSON round trip.

A config is a dataclass deriving from :class:`Config` whose fields are declared with :func:`spec`: the type, range,
choices and whether None is allowed sit next to the field, and the base's ``__post_init__`` checks them in field
order, with one message form ``<Class>.<field> must be <what>, got <value>``. Rules between fields stay in a small
per-class ``_check`` method, run after the field checks. A field whose ``kind`` is another config class is a
**section**: a mapping is built with that class's :meth:`~Config.from_dict`, :meth:`~Config.to_dict` writes it back
as a mapping. ``from_dict`` refuses unknown keys and lists the valid ones. Example::

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Tiny(Config):
    ...     steps: int = spec(10, kind=int, min=1)
    ...     mode: str = spec("fast", choices=("fast", "exact"))
    >>> Tiny.from_dict({"steps": 3}).to_dict()
    {'steps': 3, 'mode': 'fast'}
    >>> Tiny(steps=True)
    Traceback (most recent call last):
    ...
    ValueError: Tiny.steps must be an int >= 1, got True

This module is the foundation layer: it imports nothing from the rest of rolora_plugin. The configs live with their
layer (``rotate.config.RotationConfig``, ``quant.config.QuantConfig``, ``lora.config``, ``app.train_config``).
"""

from __future__ import annotations

import inspect
import json
import math
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["Config", "ConfigMixin", "FieldSpec", "spec", "is_number", "RECORD_KEY", "QUANT_RECORD_KEY", "short_repr", "unknown_keys"]

RECORD_KEY = "rolora"  # model.config.<RECORD_KEY>: the rotation record (rolora_plugin.rotate.rotation)
QUANT_RECORD_KEY = "rolora_quant"  # model.config.<QUANT_RECORD_KEY>: the quantization record (rolora_plugin.quant)

_SPEC = "rolora_spec"  # the dataclasses.field metadata key holding a FieldSpec


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset, _repr.maxlevel = 60, 60, 6, 6, 6, 6, 3


def short_repr(value) -> str:
    """``repr(value)`` cut to a few dozen characters, items and levels (``reprlib``), 160 characters in all: what error messages show of a
    value read from a user's file, which may be huge or, through YAML aliases, a few lists shared billions of times.

    >>> short_repr(["q_proj"] * 100)
    "['q_proj', 'q_proj', 'q_proj', 'q_proj', 'q_proj', 'q_proj', ...]"
    """
    text = _repr.repr(value)
    return text if len(text) <= 160 else text[:150] + "...(cut)"


def unknown_keys(data: dict, known: set) -> list[str]:
    """The keys of ``data`` not in ``known``, as sorted strings (YAML keys may be numbers, booleans or None)."""
    return sorted(short_repr(k) if not isinstance(k, str) else k for k in data if k not in known)


# ---------------------------------------------------------------------------------------------- field specs


def _is_config(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, Config)


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "AEIOUaeiou" else "a ") + noun


def is_number(value) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class FieldSpec:
    """What one field accepts (build it with :func:`spec`). Checked in this order: None (``optional``), ``parse``,
    ``kind`` (bool is never an int or a float; a float field takes ints and stores a float; list / tuple fields take
    either and store ``kind``; a config class takes an instance or a mapping), ``items``, ``choices``, the bounds
    ``min <= v <= max`` and ``gt < v < lt``, then ``check(v)``. ``what`` overrides the generated description,
    ``must`` the whole phrase after "must"."""

    kind: Any = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    optional: bool = False
    items: Any = None  # a type or a FieldSpec every element of a list / tuple field must satisfy
    nonempty: bool = False
    check: Callable | None = None  # value -> bool, after the above
    parse: Callable | None = None  # value -> value, before the above (e.g. numeric strings of a YAML file)
    what: str | None = None
    must: str | None = None  # the whole "must ..." phrase, where "be <what>" does not fit ("map names to bits")

    def describe(self) -> str:
        """The ``<what>`` of ``must be <what>``."""
        if self.what is not None:
            return self.what
        kind = self.kind
        if _is_config(kind):
            text = f"{_a(kind.__name__)} or a dict of its fields"
        elif self.choices is not None:
            shown = list(self.choices)
            text = " or ".join(repr(c) for c in shown) if len(shown) == 2 else f"one of {shown}"
        elif kind is bool:
            text = "True or False"
        elif kind in (int, float):
            text = self._range("an int" if kind is int else "a number")
        elif kind is str:
            text = "a non-empty string" if self.nonempty else "a string"
        elif kind in (list, tuple):
            text = f"a {'non-empty ' if self.nonempty else ''}list"
        elif isinstance(kind, type):
            text = _a(kind.__name__)
        else:
            text = "valid"
        return text + (" or None" if self.optional else "")

    def _range(self, noun: str) -> str:
        lo, hi = self.min if self.min is not None else self.gt, self.max if self.max is not None else self.lt
        if lo is not None and hi is not None:
            if self.min is not None and self.max is not None and noun == "an int":
                return f"{noun} in {lo}..{hi}"
            return f"{noun} in {'[' if self.min is not None else '('}{lo}, {hi}{']' if self.max is not None else ')'}"
        if lo is not None:
            return f"{noun} {'>=' if self.min is not None else '>'} {lo}"
        if hi is not None:
            return f"{noun} {'<=' if self.max is not None else '<'} {hi}"
        return noun

    def validate(self, owner: str, name: str, value):
        """``value`` as stored (sections built, sequences and numbers normalised); ValueError naming ``owner.name``."""
        if value is None and self.optional:
            return None
        if self.parse is not None:
            value = self.parse(value)
        ok, value = self._kind(owner, name, value)
        if ok and self.items is not None:
            item = self.items if isinstance(self.items, FieldSpec) else FieldSpec(kind=self.items)
            value = type(value)(item.validate(owner, f"{name} entries", v) for v in value)
        ok = ok and (not self.nonempty or len(value) > 0)
        ok = ok and (self.choices is None or value in self.choices)
        ok = ok and self._in_bounds(value) and (self.check is None or self.check(value))
        if not ok:
            raise ValueError(f"{owner}.{name} must {self.must or 'be ' + self.describe()}, got {short_repr(value)}")
        return value

    def _kind(self, owner: str, name: str, value) -> tuple[bool, Any]:
        kind = self.kind
        if kind is None:
            return True, value
        if kind is bool:
            return isinstance(value, bool), value
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool), value
        if kind is float:
            return (True, float(value)) if is_number(value) else (False, value)
        if kind is list or kind is tuple:
            return (True, kind(value)) if isinstance(value, (list, tuple)) else (False, value)
        if _is_config(kind) and isinstance(value, Mapping):
            try:
                return True, kind.from_dict(value)
            except ValueError as e:
                raise ValueError(f"{owner}.{name}: {e}") from None
        return isinstance(value, kind), value

    def _in_bounds(self, value) -> bool:
        lo, hi, gt, lt = self.min, self.max, self.gt, self.lt
        if lo is None and hi is None and gt is None and lt is None:
            return True
        return is_number(value) and ((lo is None or value >= lo) and (hi is None or value <= hi)
                                     and (gt is None or value > gt) and (lt is None or value < lt))  # fmt: skip


def spec(default=MISSING, *, factory=MISSING, compare: bool = True, repr: bool = True, **checks):  # noqa: A002
    """A dataclass field with its checks: ``spec(0, kind=int, min=0)``, ``spec("rtn", choices=("rtn", "gptq"))``,
    ``spec(None, kind=int, min=1, optional=True)``, ``spec(factory=list, kind=list, items=str)``,
    ``spec(factory=QuantConfig, kind=QuantConfig)`` (a section). ``checks``: the :class:`FieldSpec` fields."""
    kwargs = {"default": default} if factory is MISSING else {"default_factory": factory}
    return field(**kwargs, compare=compare, repr=repr, metadata={_SPEC: FieldSpec(**checks)})


# ---------------------------------------------------------------------------------------------- the base


class _ConfigType(type):
    """Lets a config take **flat keys** in its constructor: keyword arguments that are not fields but fill one
    (``QATConfig(w_bits=4)`` fills the held ``quant``). A class lists them in ``FLAT_KEYS`` and folds them into its
    real fields in ``_fold_flat_keys`` (called only when some are given); ``from_dict`` accepts them too."""

    def __call__(cls, *args, **kwargs):
        flat = {k: kwargs.pop(k) for k in cls.FLAT_KEYS if k in kwargs}
        if flat:
            kwargs = cls._fold_flat_keys(kwargs, flat)
        return super().__call__(*args, **kwargs)

    @property
    def __signature__(cls) -> inspect.Signature:
        """``help(QATConfig)`` / ``inspect.signature``: the dataclass fields, then the flat keys (keyword-only)."""
        sig = inspect.signature(cls.__init__)
        flat = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in cls.FLAT_KEYS]
        return sig.replace(parameters=[*list(sig.parameters.values())[1:], *flat])


class Config(metaclass=_ConfigType):
    """Base of the config dataclasses: runs the :func:`spec` checks of every field, then ``_check`` (the rules
    between fields); ``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json``; sections nest."""

    FLAT_KEYS: ClassVar[tuple] = ()
    KEY_NAMES: ClassVar[tuple] = ("field", "fields")  # how from_dict's unknown-key message names the keys

    def __post_init__(self):
        owner = type(self).__name__
        for f in fields(self):
            s = f.metadata.get(_SPEC)
            if s is not None:
                setattr(self, f.name, s.validate(owner, f.name, getattr(self, f.name)))
        self._check()

    def _check(self) -> None:
        """Rules between fields (override); the fields have passed their own checks."""

    @classmethod
    def _fold_flat_keys(cls, kwargs: dict, flat: dict) -> dict:
        raise NotImplementedError  # a class with FLAT_KEYS defines it

    @classmethod
    def default(cls, name: str):
        """The default of field ``name`` (its factory called): what other hosts' args take as theirs."""
        f = next((f for f in fields(cls) if f.name == name), None)
        if f is None:
            raise KeyError(f"{cls.__name__} has no field {name!r}")
        return f.default_factory() if f.default_factory is not MISSING else f.default

    def to_dict(self) -> dict:
        """The fields as JSON-ready values: sections as mappings, tuples as lists (as they come back from JSON)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping):
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__} needs a mapping of its {cls.KEY_NAMES[1]}, got {type(data).__name__} {short_repr(data)}")
        known = {f.name for f in fields(cls) if f.init} | set(cls.FLAT_KEYS)
        unknown = unknown_keys(data, known)
        if unknown:
            one, many = cls.KEY_NAMES
            raise ValueError(f"{cls.__name__}: unknown {one}(s) {unknown}; valid {many} are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


ConfigMixin = Config  # the name before 0.2


def _plain(value):
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
