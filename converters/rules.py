"""Declarative converter rules and the plan that checks them before any tensor is read.

A Rule maps torch tensor names onto flax parameter paths ("/"-joined keys of the params dict,
no leading "params"):

    Rule("model.layers.{i}.self_attn.q_proj.weight", "decoder/layers_{i}/attn/q/kernel", linear_to_heads)

* `{i}` (any `{name}`) in a source matches a decimal index and is substituted into the target.
* Several targets (a tuple): the transform returns one array per target (fused qkv -> q, k, v).
* Several sources (a tuple): one tensor per pattern, all with the same placeholders, passed to
  the transform in the rule's order (separate q, k, v -> one fused parameter).
* Stacking: a source placeholder that the target lacks (target "decoder/layers/q/kernel",
  source "...layers.{i}.q_proj.weight") gathers the tensors of i = 0..L-1 into a list, ordered by
  i, for one transform call (`stack`, `stacked(fn)`). At most one such placeholder per rule.
* target None drops what the source matches; only drop rules may use `*` (any characters).

Correctness never depends on rule order: every source tensor must match exactly one rule,
every target must be filled exactly once, and every output shape is checked (jax.eval_shape
runs the transforms on shapes only). build_plan reports all violations in one ConversionError
whose `.problems` lists them, each with the closest names/shapes as candidates.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from converters.problems import Problem, closest as _closest, expected_sources as _expected_sources
from converters.problems import raise_problems as _raise
from converters.transforms import apply, identity, transform_name
from mmjax.errors import ConversionError
from mmjax.tree import flatten_params as flatten, unflatten_params as unflatten

__all__ = ["Rule", "Problem", "Plan", "Step", "build_plan", "flatten", "unflatten", "resolve_dtype"]

_TOKEN = re.compile(r"\{([A-Za-z_]\w*)\}|\*")
_INDEX = r"0|[1-9][0-9]*"


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str | tuple[str, ...]
    target: str | tuple[str, ...] | None
    transform: Callable = identity

    def __post_init__(self):
        srcs, tgts = self.sources, self.targets
        if not srcs or not all(isinstance(s, str) and s for s in srcs):
            self._fail("source must be a non-empty pattern string or a tuple of them")
        if self.target is not None and (not tgts or not all(isinstance(t, str) and t for t in tgts)):
            self._fail("target must be a path string, a tuple of them, or None (drop)")
        for t in tgts:
            if "" in t.split("/"):  # "/", "a//b", "/a", "a/": no parameter has an empty name
                self._fail(f"target {t!r}: a path of '/'-separated names, none empty")
        if not callable(self.transform):
            self._fail(f"transform {self.transform!r} is not callable")
        pats = self._patterns
        if self.target is None:
            return
        if any(p.glob for p in pats):
            self._fail("'*' is allowed only in drop rules (target None): a target cannot be derived from it")
        for t in tgts:  # the engine str.format()s targets: "{i!r}", "{0}" or a stray "{" must not reach it
            if any(c in "{}" for c in _TOKEN.sub("", t)):
                self._fail(f"target {t!r}: braces are only allowed as {{name}} placeholders")
        if len({p.names for p in pats}) != 1:
            self._fail("all source patterns of a rule need the same placeholders")
        tvars = {_placeholders(t) for t in tgts}
        if len(tvars) != 1:
            self._fail("all targets of a rule need the same placeholders")
        extra = set(next(iter(tvars))) - set(pats[0].names)
        if extra:
            self._fail(f"target placeholder(s) {sorted(extra)} do not appear in the source")
        if len(self.stack_var or ()) > 1:
            self._fail(f"at most one placeholder may be stacked (absent from the target), got {self.stack_var}")

    # ---- derived views
    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else tuple(self.source)

    @property
    def targets(self) -> tuple[str, ...]:
        if self.target is None:
            return ()
        return (self.target,) if isinstance(self.target, str) else tuple(self.target)

    @property
    def multi(self) -> bool:
        """Several targets: the transform returns a tuple, one array per target."""
        return self.target is not None and not isinstance(self.target, str)

    @functools.cached_property
    def _patterns(self) -> tuple["_Pattern", ...]:
        try:
            return tuple(_compile(s) for s in self.sources)
        except ValueError as e:
            self._fail(str(e))

    @property
    def stack_var(self) -> tuple[str, ...] | None:
        """The placeholder gathered into a list (in source, not in target), if any."""
        if self.target is None:
            return None
        tv = set(_placeholders(self.targets[0]))
        return tuple(v for v in self._patterns[0].names if v not in tv) or None

    def __str__(self) -> str:
        src = self.source if isinstance(self.source, str) else ", ".join(self.source)
        tgt = "(dropped)" if self.target is None else (
            self.target if isinstance(self.target, str) else ", ".join(self.target))
        tf = "" if self.target is None else f" [{transform_name(self.transform)}]"
        return f"Rule({src} -> {tgt}{tf})"

    def _fail(self, why: str):
        raise ConversionError(f"Rule({self.source!r} -> {self.target!r}): {why}")


@dataclasses.dataclass(frozen=True)
class _Pattern:
    text: str
    regex: re.Pattern
    names: tuple[str, ...]  # distinct placeholder names, in order of appearance
    glob: bool
    prefix: str  # literal text before the first placeholder: a cheap test before the regex


def _compile(text: str) -> _Pattern:
    parts, names, pos, glob = [], [], 0, False
    for m in _TOKEN.finditer(text):
        parts.append(re.escape(text[pos:m.start()]))
        if m.group(0) == "*":
            parts.append(".*")
            glob = True
        elif m.group(1) in names:  # the same placeholder twice must match the same index
            parts.append(f"(?P={m.group(1)})")
        else:
            names.append(m.group(1))
            parts.append(f"(?P<{m.group(1)}>{_INDEX})")
        pos = m.end()
    if any(c in "{}" for c in _TOKEN.sub("", text)):
        raise ValueError(f"pattern {text!r}: braces are only allowed as {{name}} placeholders")
    parts.append(re.escape(text[pos:]))
    first = _TOKEN.search(text)
    return _Pattern(text, re.compile("".join(parts)), tuple(names), glob, text[:first.start()] if first else text)


def _placeholders(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m.group(1) for m in _TOKEN.finditer(text) if m.group(1)))


# ---------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True)
class Step:
    """One transform call: its inputs, in call order, are a source name per pattern, or (in a
    stacking rule) a list of names per pattern ordered by the stacked index."""
    rule: Rule
    inputs: tuple
    targets: tuple[str, ...]
    target_shapes: tuple[tuple[int, ...], ...]
    binding: tuple[tuple[str, int], ...]

    @property
    def names(self) -> list[str]:
        return [n for x in self.inputs for n in ([x] if isinstance(x, str) else x)]

    @property
    def shape_arg(self):
        return self.target_shapes if self.rule.multi else self.target_shapes[0]

    def describe_sources(self, sources: Mapping[str, tuple]) -> str:
        parts = []
        for pi, x in enumerate(self.inputs):
            if isinstance(x, str):
                parts.append(f"'{x}' {tuple(sources[x][0])}")
            else:
                (var,) = self.rule.stack_var
                b = dict(self.binding, **{var: f"{{0..{len(x) - 1}}}"})
                parts.append(f"'{self.rule.sources[pi].format(**b)}' {tuple(sources[x[0]][0])} x{len(x)}")
        return ", ".join(parts)


class Plan:
    """The checked mapping. table() shows it; execute() / arrays() perform it one step at a time."""

    def __init__(self, steps: list[Step], dropped: list[tuple[str, Rule]], unused_rules: list[Rule],
                 sources: Mapping[str, tuple], targets: Mapping[str, Any]):
        self.steps, self.dropped, self.unused_rules = steps, dropped, unused_rules
        self.sources, self.targets = dict(sources), dict(targets)
        self.origin = {t: s.names for s in steps for t in s.targets}  # target -> source names

    @property
    def num_sources(self) -> int:
        """Source tensors read by execute() (dropped ones are never read)."""
        return sum(len(s.names) for s in self.steps)

    def table(self) -> str:
        rows = [("source", "target", "transform", "shapes")]
        for s in self.steps:
            src = s.describe_sources(self.sources)
            tname = transform_name(s.rule.transform)
            for j, (t, shp) in enumerate(zip(s.targets, s.target_shapes)):
                rows.append((src if j == 0 else "", t, tname if j == 0 else "", f"-> {shp}"))
        for name, _ in self.dropped:
            rows.append((f"'{name}' {tuple(self.sources[name][0])}", "(dropped)", "", ""))
        w = [min(max(len(r[c]) for r in rows), 90) for c in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip() for r in rows]
        lines.append(f"{len(self.steps)} steps: {self.num_sources} source tensors -> {len(self.targets)} "
                     f"parameters; {len(self.dropped)} dropped")
        if self.unused_rules:  # alternative key layouts and optional tensors: normal, so just counted
            lines.append(f"{len(self.unused_rules)} rules matched no tensor (see Plan.unused_rules)")
        return "\n".join(lines)

    def execute(self, reader, dtype=None, progress: Callable[[int], None] | None = None) -> dict:
        """Read, transform and cast every step; returns the nested params dict of C-contiguous
        numpy arrays (the whole model in memory: the converter writes arrays() out instead).

        dtype (None, "float32", "bfloat16", ...): floating outputs are cast to it; integer and
        bool tensors are left as they are; None keeps the checkpoint's dtypes."""
        # np.require, not ascontiguousarray: the latter turns 0-d arrays (CLIP's logit_scale) into (1,).
        return unflatten({t: np.require(a, requirements="C") for t, a in self.arrays(reader, dtype, progress)})

    def arrays(self, reader, dtype=None, progress: Callable[[int], None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """execute() one step at a time: yields (target, array) pairs, each array often a view of
        the step's source tensors (a transpose, a split), which mmjax.checkpoint.save_params
        gathers a chunk at a time. Memory holds about one step's tensors, whatever the size of
        the model (with a cast: the cast outputs, once the sources are released)."""
        dt = resolve_dtype(dtype)
        for step in self.steps:
            xs = tuple(reader.read(x) if isinstance(x, str) else [reader.read(n) for n in x] for x in step.inputs)
            try:
                out = apply(step.rule.transform, xs, step.shape_arg)
            except Exception as e:
                raise ConversionError(f"{', '.join(step.targets)}: transform {transform_name(step.rule.transform)} "
                                      f"of {step.describe_sources(self.sources)} failed: {e}") from e
            outs = tuple(out) if step.rule.multi else (out,)
            del xs, out
            ready = []
            for t, want, a in zip(step.targets, step.target_shapes, outs):
                a = np.asarray(a)
                if a.shape != want:  # eval_shape agreed at plan time; numpy must too
                    raise ConversionError(f"{t}: expected shape {want}, transform "
                                          f"{transform_name(step.rule.transform)} gave {a.shape}")
                ready.append((t, _cast(a, dt)))
            outs = a = None  # with a cast, the sources go here
            while ready:  # popped, so each array goes as soon as the consumer is done with it
                yield ready.pop(0)
            if progress is not None:
                progress(len(step.names))


def _cast(a: np.ndarray, dt) -> np.ndarray:
    if dt is not None and a.dtype != dt and jnp.issubdtype(a.dtype, jnp.floating):
        return a.astype(dt, order="K")  # in the source's memory order: one sequential pass
    return a


def resolve_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        try:
            return np.dtype(getattr(ml_dtypes, dtype)) if hasattr(ml_dtypes, dtype) else np.dtype(dtype)
        except TypeError:
            raise ConversionError(f"unknown dtype {dtype!r}") from None
    return np.dtype(dtype)


def _sds(info) -> jax.ShapeDtypeStruct:
    shape, dtype = info
    return jax.ShapeDtypeStruct(tuple(shape), resolve_dtype(dtype))


def build_plan(sources: Mapping[str, tuple], rules: Sequence[Rule], targets: Mapping[str, Any]) -> Plan:
    """Check `rules` against the source tensors and target parameters; read no tensor data.

    sources: name -> (shape, dtype name), e.g. reader.tensors().
    targets: "a/b/kernel" -> anything with .shape (jax.ShapeDtypeStruct), or a nested dict of them.
    Raises one ConversionError (with .problems) listing every violation."""
    if any(isinstance(v, Mapping) for v in targets.values()):
        targets = flatten(targets)
    tshape = {p: tuple(t.shape) for p, t in targets.items()}
    sshape = {n: tuple(info[0]) for n, info in sources.items()}
    rules = list(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise ConversionError(f"rules must be converters.rules.Rule objects, got {r!r}")
    problems: list[Problem] = []

    # 1. every source tensor matches exactly one rule
    index = _PatternIndex(rules)
    owner: dict[str, tuple[int, int, dict]] = {}
    unmatched: list[str] = []
    claimed: set[str] = set()
    for name in sources:
        hits = index.matches(name)
        if not hits:
            unmatched.append(name)
        elif len(hits) > 1:
            which = "; ".join(str(rules[ri]) for ri, _, _ in hits)
            # its would-be targets are not reported again as unfilled
            claimed.update(t.format(**{k: int(v) for k, v in b.items()})
                           for ri, _, b in hits for t in rules[ri].targets)
            problems.append(Problem("ambiguous_source", name, f"{name}: matched by {len(hits)} rules (correctness "
                                    f"must not depend on rule order): {which}"))
        else:
            owner[name] = hits[0]

    # 2. group each rule's matches into steps (one per binding of the target placeholders)
    groups: dict[tuple, dict] = {}
    dropped, used = [], set()
    for name, (ri, pi, b) in owner.items():
        used.add(ri)
        rule = rules[ri]
        if rule.target is None:
            dropped.append((name, rule))
            continue
        b = {k: int(v) for k, v in b.items()}
        sv = rule.stack_var[0] if rule.stack_var else None
        key_b = tuple(sorted((k, v) for k, v in b.items() if k != sv))
        g = groups.setdefault((ri, key_b), [dict() for _ in rule.sources])
        g[pi][b[sv] if sv else None] = name

    steps: list[Step] = []
    for (ri, key_b), members in groups.items():
        rule, b = rules[ri], dict(key_b)
        sv = rule.stack_var[0] if rule.stack_var else None
        want_idx = range(max(max(m) for m in members if m) + 1) if sv else [None]
        missing = [rule.sources[pi].format(**b, **({sv: k} if sv else {}))
                   for pi, m in enumerate(members) for k in want_idx if k not in m]
        present = next(n for m in members for n in m.values())
        for n in missing:
            problems.append(Problem("missing_source", n, f"{n}: missing; {rule} needs it beside '{present}'"))
        tpaths = tuple(t.format(**b) for t in rule.targets)
        if missing:
            claimed.update(tpaths)  # reported once, as the missing source, not again as unfilled
            continue
        inputs = tuple(m[None] if sv is None else [m[k] for k in want_idx] for m in members)
        steps.append(Step(rule, inputs, tpaths, tuple(tshape.get(t, ()) for t in tpaths), key_b))

    # 3. every target filled exactly once, and only known targets
    fills: dict[str, list[Step]] = {}
    for s in steps:
        for t in s.targets:
            fills.setdefault(t, []).append(s)
    for t, ss in fills.items():
        if t not in tshape:
            first = ss[0]
            problems.append(Problem("unknown_target", t, f"{t}: not a parameter of the model (from {first.rule} "
                                    f"on {first.describe_sources(sources)})",
                                    _closest(t, sshape[first.names[0]], tshape)))
        elif len(ss) > 1:
            problems.append(Problem("duplicate_target", t, f"{t}: filled {len(ss)} times, by "
                                    + "; ".join(f"{s.rule} on {s.describe_sources(sources)}" for s in ss)))

    unfilled = [t for t in tshape if t not in fills and t not in claimed]
    src_pool = {n: sshape[n] for n in unmatched} or sshape
    tgt_pool = {t: tshape[t] for t in unfilled} or tshape
    for i, n in enumerate(unmatched):
        cands = _closest(n, sshape[n], tgt_pool) if i < 64 else ()
        problems.append(Problem("unmatched_source", n, f"{n} {sshape[n]}: no rule matches it (map it, or drop it "
                                f"with Rule({n!r}, None))", cands))
    for i, t in enumerate(unfilled):
        cands = _closest(t, tshape[t], src_pool) if i < 64 else ()
        want = _expected_sources(t, rules) if i < 64 else []
        why = f"; the rules expect it from {' or '.join(repr(w) for w in want[:4])}, not in the checkpoint" if want else ""
        problems.append(Problem("unfilled_target", t, f"{t} {tshape[t]}: no rule fills it{why}", cands))

    # 4. every output shape, on shapes only
    problems += _check_shapes([s for s in steps if all(t in tshape for t in s.targets)], sources)
    if problems:
        bad = {p.name for p in problems}
        ok = [s for s in steps if all(t in tshape and t not in bad for t in s.targets)
              and not any(n in bad for n in s.names)]
        _raise(problems, len(sources), len(tshape), Plan(ok, dropped, [], sources, targets))
    order = {n: k for k, n in enumerate(sources)}  # read in checkpoint order: shards front to back
    steps.sort(key=lambda s: min(order[n] for n in s.names))
    unused = [r for ri, r in enumerate(rules) if ri not in used]
    return Plan(steps, dropped, unused, sources, targets)


def _check_shapes(steps: list[Step], sources: Mapping[str, tuple]) -> list[Problem]:
    problems, checked = [], {}
    for s in steps:
        inputs = tuple(_sds(sources[x]) if isinstance(x, str) else [_sds(sources[n]) for n in x] for x in s.inputs)
        sig = tuple((x.shape, str(x.dtype)) if not isinstance(x, list) else tuple((a.shape, str(a.dtype)) for a in x)
                    for x in inputs)
        # layers repeat transforms and shapes: trace each combination once
        key = (id(s.rule.transform), s.rule.multi, sig, s.target_shapes)
        if key not in checked:
            checked[key] = _eval_shapes(s, inputs)
        got, tname, src = checked[key], transform_name(s.rule.transform), s.describe_sources(sources)
        if isinstance(got, str):
            problems.append(Problem("transform_error", s.targets[0],
                                    f"{', '.join(s.targets)}: transform {tname} of {src} fails: {got}"))
            continue
        problems += [Problem("shape_mismatch", t, f"{t}: expected shape {want}, transform {tname} of {src} gives {g}")
                     for t, want, g in zip(s.targets, s.target_shapes, got) if g != want]
    return problems


class _PatternIndex:
    """Finds every (rule, pattern) matching a name without trying all of them: patterns are
    bucketed by the whole dotted segments of their literal prefix ("a.b." of "a.b.c{i}"), and a
    name only visits the buckets of its own dotted prefixes."""

    def __init__(self, rules: Sequence[Rule]):
        self.buckets: dict[str, list] = {}
        for ri, r in enumerate(rules):
            for pi, p in enumerate(r._patterns):
                self.buckets.setdefault(p.prefix[:p.prefix.rfind(".") + 1], []).append((ri, pi, p))

    def matches(self, name: str) -> list[tuple[int, int, dict]]:
        keys = [""] + [name[:k + 1] for k, ch in enumerate(name) if ch == "."]
        hits = [(ri, pi, m.groupdict()) for key in keys for ri, pi, p in self.buckets.get(key, ())
                if name.startswith(p.prefix) and (m := p.regex.fullmatch(name))]
        return sorted(hits, key=lambda h: h[:2])


def _eval_shapes(step: Step, inputs) -> list[tuple] | str:
    """Output shapes of the step's transform, or why it fails. Allocates nothing."""
    try:
        out = jax.eval_shape(lambda *xs: apply(step.rule.transform, xs, step.shape_arg), *inputs)
    except Exception as e:  # any failure inside a user transform is a reportable problem
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if step.rule.multi:
        if not isinstance(out, (tuple, list)) or len(out) != len(step.targets):
            n = len(out) if isinstance(out, (tuple, list)) else "not a tuple"
            return f"returned {n} outputs for {len(step.targets)} targets"
        return [tuple(o.shape) for o in out]
    if not hasattr(out, "shape"):
        return f"returned {type(out).__name__}, not one array"
    return [tuple(out.shape)]
