"""ConfigBase: to_dict / from_dict for nested frozen config dataclasses.

Its own module so that mmjax.config (the model configs) and mmjax.kernels.policy (the
KernelPolicy field those configs carry) can both build on it without importing each other
in a circle; mmjax.config re-exports it.
"""
from __future__ import annotations

import dataclasses
import numbers
import typing

__all__ = ["ConfigBase"]

# A config written before the KernelPolicy field existed names its attention kernel
# "attention_impl"; from_dict reads it as this policy (see KernelPolicy.from_attention_impl).
LEGACY_ATTENTION_KEY = "attention_impl"


class ConfigBase:
    """to_dict / from_dict for nested frozen dataclasses (tuples survive the JSON trip)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)  # type: ignore[type-var]

    @classmethod
    def from_dict(cls, d: dict):
        hints = typing.get_type_hints(cls)
        kw = {}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if LEGACY_ATTENTION_KEY in d and "kernels" in names and LEGACY_ATTENTION_KEY not in names:
            from mmjax.kernels.policy import KernelPolicy

            d = dict(d)
            legacy = KernelPolicy.from_attention_impl(d.pop(LEGACY_ATTENTION_KEY))
            d.setdefault("kernels", legacy.to_dict())
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
        for k, v in d.items():
            tp = hints[k]
            # a hand-edited "64" for an int field would pass through to shape arithmetic
            want = {int: numbers.Integral, float: numbers.Real}.get(tp)
            if want is not None and (isinstance(v, bool) or not isinstance(v, want)):
                raise TypeError(f"{cls.__name__}.{k}: expected {tp.__name__}, got {v!r}")
            kw[k] = _coerce(tp, v)
        return cls(**kw)


def _coerce(tp, v):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, ConfigBase) and isinstance(v, dict):
        return tp.from_dict(v)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in args:
            if a is type(None) and v is None:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v)
            except (TypeError, ValueError):
                continue
        return v
    if origin is tuple and isinstance(v, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], x) for x in v)
        return tuple(_coerce(a, x) for a, x in zip(args, v))
    if tp is int and isinstance(v, (list, tuple)):
        raise TypeError("not an int")
    return v
