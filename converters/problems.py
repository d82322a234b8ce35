"""What a failed plan reports: each problem with its kind, the name it is about, and the
closest names (so a missing rule is easy to write)."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from typing import Mapping

from mmjax.errors import ConversionError

__all__ = ["Problem", "closest", "expected_sources", "raise_problems"]

_KINDS = ("ambiguous_source", "unmatched_source", "missing_source", "unknown_target",
          "duplicate_target", "unfilled_target", "transform_error", "shape_mismatch")


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str          # one of _KINDS
    name: str          # the source tensor or target path it is about
    message: str
    candidates: tuple[str, ...] = ()  # closest names, each "name (shape)"

    def __str__(self) -> str:
        s = self.message
        if self.candidates:
            s += "\n      closest: " + "; ".join(self.candidates)
        return s


def _norm(name: str) -> str:
    return " ".join(re.split(r"[./_]+", name.lower()))


def closest(name: str, shape, pool: Mapping[str, tuple], k: int = 3) -> tuple[str, ...]:
    """The k pool entries closest to `name` by name (difflib) and, as a bonus, element count."""
    sm = difflib.SequenceMatcher(None, b=_norm(name), autojunk=False)  # b is preprocessed once
    numel = math.prod(shape) if shape is not None else None

    def bonus(cshape):
        if numel is None or math.prod(cshape) != numel:
            return 0.0
        return 0.5 + (0.1 if sorted(cshape) == sorted(shape) else 0.0)

    # quick_ratio bounds ratio from above and is cheap: rank by it, then score the best few exactly
    rough = []
    for cand, cshape in pool.items():
        sm.set_seq1(_norm(cand))
        rough.append((-(sm.quick_ratio() + bonus(cshape)), cand))
    rough.sort()
    exact = []
    for _, cand in rough[:8 * k]:
        sm.set_seq1(_norm(cand))
        exact.append((-(sm.ratio() + bonus(pool[cand])), cand))
    exact.sort()
    return tuple(f"{c} {tuple(pool[c])}" for _, c in exact[:k])


def raise_problems(problems: list[Problem], n_src: int, n_tgt: int, partial=None):
    problems = sorted(problems, key=lambda p: _KINDS.index(p.kind))
    lines = [f"cannot map {n_src} source tensors onto {n_tgt} parameters: {len(problems)} problem(s)"]
    lines += [f"  - {p}" for p in problems]
    err = ConversionError("\n".join(lines))
    err.problems = problems
    err.partial_plan = partial  # the steps that did check out, so --dry-run can still show them
    raise err


@functools.lru_cache(maxsize=None)
def _target_regex(pattern: str) -> re.Pattern:
    from converters.rules import _compile  # the one pattern syntax (rules imports this module)

    return _compile(pattern).regex


def expected_sources(target: str, rules) -> list[str]:
    """Source names the rules would have read to fill `target` (a missing tensor, named)."""
    out = []
    for r in rules:
        if r.target is None or r.stack_var:
            continue
        for tpat in r.targets:
            m = _target_regex(tpat).fullmatch(target)
            if m is None:
                continue
            b = m.groupdict()
            try:
                out += [src.format(**b) for src in r.sources]
            except (KeyError, IndexError, ValueError):
                pass
    return list(dict.fromkeys(out))
