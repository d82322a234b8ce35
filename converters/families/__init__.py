"""Which rule table converts which family: the family -> rules mapping lives here, on the
converters side (mmjax never imports converters).

Built-in families map to the tables in this package. A custom family registers its own:

    from converters.families import register_rules
    register_rules("acme_vlm", acme_rules)        # acme_rules: config -> list[Rule]

or the converter is given a rules file (`--rules my_rules.py`, a RULES list or function).
"""
from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["register_rules", "rules_for", "BUILTIN"]

# family name -> "module:function" (imported on first use)
BUILTIN = {
    "llava": "converters.families.llava:llava_rules",
    "qwen2_vl": "converters.families.qwen2vl:qwen2vl_rules",
    "qwen2_5_vl": "converters.families.qwen2vl:qwen2vl_rules",
    "clip": "converters.families.clip:clip_rules",
    "bert": "converters.families.bert:bert_rules",
}
_RULES: dict[str, Callable] = {}


def register_rules(family: str, rules: Callable) -> Callable:
    """rules: config -> list of converters.rules.Rule, for the family registered as `family`."""
    if family in _RULES and _RULES[family] is not rules:
        raise ValueError(f"rules for family {family!r} are already registered")
    _RULES[family] = rules
    return rules


def rules_for(family: str) -> Callable | None:
    """The rule function of a family (None: none registered; the converter then needs --rules)."""
    if family in _RULES:
        return _RULES[family]
    if family in BUILTIN:
        mod, fn = BUILTIN[family].split(":")
        return getattr(importlib.import_module(mod), fn)
    return None
