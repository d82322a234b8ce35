"""Exact-name registry of model families.

A *family* is everything mmjax needs to run one architecture: how to read its HF
config, how to build its Flax module, its processor and prepare step (host side), and its
sharding rules. Families register under the exact `model_type` string of the checkpoint's
config.json (no fuzzy matching); a custom model registers under a name of its own. The
converter rules that map its torch tensor names onto the module's parameter tree live on the
converters side (converters.families), which imports mmjax, never the reverse.

Built-in families are files of mmjax/families/ (a VLM is a composed model: see
mmjax.families.composed.composed_family).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

__all__ = ["Family", "register", "get", "names", "resolve"]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    # HF config.json dict -> the family's frozen config dataclass.
    config_from_hf: Callable[[dict], Any]
    # config dataclass type: rebuilds the config from mmjax_config.json.
    config_cls: type
    # (config, dtype) -> flax.linen.Module implementing the protocol in mmjax.models.base.
    build: Callable[..., Any]
    # (checkpoint folder, config) -> processor with .__call__(images, prompt, ...) -> dict
    processor: Callable[[str, Any], Any] | None = None
    # config -> list[(regex on "a/b/c" param path, PartitionSpec-like tuple of logical axes)]
    sharding: Callable[[Any], list] | None = None
    # The host-side prepare step: (config, HF-named numpy inputs, Buckets | None, rows, tokens)
    # -> the batch arrays besides input_ids, checked (InputError) and, with buckets, padded.
    prepare: Callable | None = None


_REGISTRY: dict[str, Family] = {}
_BUILTIN_MODULES = ("mmjax.families.llava", "mmjax.families.qwen2vl", "mmjax.families.clip", "mmjax.families.bert")


def register(family: Family) -> Family:
    if family.name in _REGISTRY and _REGISTRY[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> Family:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model_type {name!r}; supported: {', '.join(sorted(_REGISTRY))}. "
            "A custom model registers with mmjax.registry.register(Family(...)) and is "
            "named on the converter command line with --model my_pkg.my_module:FAMILY "
            "(see docs/custom_models.md)"
        ) from None


def resolve(spec: str) -> Family:
    """'pkg.module:ATTR' -> the Family object it names (imports the module)."""
    if ":" not in spec:
        return get(spec)
    mod_name, attr = spec.split(":", 1)
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownModelError(f"--model {spec!r}: cannot import it: {e}") from e
    if not isinstance(obj, Family):
        raise UnknownModelError(f"--model {spec!r}: names a {type(obj).__name__}, not a mmjax.registry.Family")
    return obj


from mmjax.errors import UnknownModelError  # noqa: E402  (errors has no imports of its own)
