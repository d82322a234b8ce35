"""docs/components.md, generated from the component registry and the config dataclasses.

    python -m mmjax.component_reference docs/components.md

Every field of every registered component's config is listed with its type, its default and
its meaning. The meaning is the field's own `# comment` in the dataclass (on the field's line,
or on comment lines directly above it), so the reference is written where the field is and
cannot drift from it: tests/test_component_reference.py regenerates the page and fails when the
file is stale or a field has no comment. Nested config dataclasses (RopeConfig, the CLIP tower)
get their own table; KernelPolicy, a field of every component, is documented in docs/kernels.md.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

from mmjax.components import KINDS, Component, component_names, get_component
from mmjax.config_base import ConfigBase
from mmjax.kernels.policy import KernelPolicy

__all__ = ["field_docs", "reference", "undocumented"]

# Nested configs documented elsewhere (their fields' comments say where), not expanded here.
ELSEWHERE = (KernelPolicy,)
_WORD = re.compile(r"[A-Za-z]{3,}")  # a meaning says something beyond an axis letter


def _comments_by_line(source: str) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its comment} for a dataclass, fields inherited from a base included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__annotations__" not in vars(klass) or not dataclasses.is_dataclass(klass):
            continue
        lines, _ = inspect.getsourcelines(klass)
        source = textwrap.dedent("".join(lines))
        comments = _comments_by_line(source)
        code_lines = source.splitlines()
        (node,) = ast.parse(source).body
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            said = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
            n = stmt.lineno - 1  # else: the run of comment-only lines right above the field
            while n >= 1 and n in comments and code_lines[n - 1].lstrip().startswith("#"):
                said.insert(0, comments[n])
                n -= 1
            docs[stmt.target.id] = " ".join(said)
    return docs


def undocumented(cls: type) -> list[str]:
    """Fields of cls whose comment is missing or names only axis letters."""
    docs = field_docs(cls)
    return [f.name for f in dataclasses.fields(cls) if not _WORD.search(docs.get(f.name, ""))]


def _type_text(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(v, ConfigBase) and v == type(v)():
        return f"`{type(v).__name__}()`"
    return f"`{v!r}`"


def _nested(cls: type) -> list[tuple[str, type]]:
    """(field name, config dataclass) for every field whose type is, or may be, a nested config."""
    hints = typing.get_type_hints(cls)
    return [(f.name, t) for f in dataclasses.fields(cls) for t in (hints[f.name], *typing.get_args(hints[f.name]))
            if isinstance(t, type) and issubclass(t, ConfigBase) and dataclasses.is_dataclass(t)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(cls: type) -> list[str]:
    missing = undocumented(cls)
    if missing:
        raise ValueError(f"{cls.__module__}.{cls.__name__}: field(s) {', '.join(missing)} have no meaning; add a "
                         "`# comment` on the field's line (mmjax/component_reference.py reads it)")
    docs = field_docs(cls)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        rows.append(f"| `{f.name}` | `{_cell(_type_text(f))}` | {_cell(_default_text(f))} | {_cell(docs[f.name])} |")
    return rows


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls)
    if not doc or doc.startswith(cls.__name__ + "("):  # dataclasses write a signature when there is none
        doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def reference(components: list[Component] | None = None) -> str:
    """The markdown of docs/components.md. Default: the components mmjax itself registers."""
    import mmjax.autoport.component  # noqa: F401  (registers the "autoport" vision and projector)
    from mmjax.models.composed import ComposedConfig

    if components is None:
        components = [get_component(k, n) for k in KINDS for n in component_names(k)]
        components = [c for c in components if c.config_cls.__module__.startswith("mmjax.")]
    out = [
        "# Component reference",
        "",
        "<!-- Generated by `make docs` (python -m mmjax.component_reference docs/components.md) from the",
        "     config dataclasses: edit their field comments, not this file (tests/test_component_reference.py). -->",
        "",
        "A composed model (`ComposedConfig.from_spec`, docs/custom_models.md) is one dict per component,",
        "`{\"type\": <name>, <field>: <value>, ...}`, plus the keys of the model spec itself. Below: every",
        "registered type of each kind, and every field with its type, default and meaning. Letters in",
        "the meanings are the axis legend (docs/architecture.md). A projector's `in_features` and",
        "`out_features` default to the vision width and the decoder width when the spec leaves them out.",
        "",
        "## The model spec",
        "",
        "Keys of the spec besides `vision`, `projector` and `decoder`:",
        "",
        *[r for r in _table(ComposedConfig) if not re.match(r"\| `(vision|projector|decoder)(_type)?` ", r)],
    ]
    nested: dict[type, list[str]] = {}
    for kind in KINDS:
        out += ["", f"## {kind}"]
        for comp in sorted((c for c in components if c.kind == kind), key=lambda c: c.name):
            cls = comp.config_cls
            out += ["", f"### `{comp.name}`: {cls.__name__} (`{cls.__module__}`)", "", _summary(cls), "",
                    *_table(cls)]
            for name, t in _nested(cls):
                if t not in ELSEWHERE:
                    nested.setdefault(t, []).append(f"`{comp.name}.{name}`")
    if nested:
        out += ["", "## Nested configs", "", "A field whose type is one of these takes a dict of its fields."]
        for t, used in nested.items():
            out += ["", f"### {t.__name__} (`{t.__module__}`)", "", f"Used by {', '.join(used)}. {_summary(t)}", "",
                    *_table(t)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m mmjax.component_reference docs/components.md")
    Path(sys.argv[1]).write_text(reference())
    print(f"wrote {sys.argv[1]}")
