"""docs/components.md is generated from the config dataclasses (mmjax/component_reference.py):
it must be current, every field must say what it means, and the tutorial must link to it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mmjax.component_reference import field_docs, reference, undocumented
from mmjax.config import ConfigBase

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_components_md_is_current():
    want = reference()
    have = (DOCS / "components.md").read_text()
    assert have == want, ("docs/components.md is stale: run `python -m mmjax.component_reference docs/components.md` "
                          "and commit the result")


def test_every_kind_type_and_field_is_listed():
    from mmjax.components import KINDS, component_names, get_component

    text = reference()
    for kind in KINDS:
        assert f"\n## {kind}\n" in text
        for name in component_names(kind):
            comp_cls = get_component(kind, name).config_cls
            assert f"### `{name}`: {comp_cls.__name__}" in text
            for f in dataclasses.fields(comp_cls):
                assert f"| `{f.name}` |" in text, f"{kind} {name}: field {f.name} missing"
    assert "| `shared_norm` | `bool` | `False` |" in text
    assert "| `intermediate_size` | `int \\| None` | required |" in text  # the resampler's, None = no feed-forward
    assert "### RopeConfig" in text and "Used by `llama.rope`, `neox.rope`" in text


def test_a_field_without_a_comment_is_refused():
    @dataclasses.dataclass(frozen=True)
    class PoolConfig(ConfigBase):
        in_features: int  # Dv, the vision features' width
        # the decoder width, said on the line above
        out_features: int
        window: int = 2  # W
        stride: int = 2

    assert field_docs(PoolConfig)["out_features"] == "the decoder width, said on the line above"
    assert undocumented(PoolConfig) == ["window", "stride"]  # an axis letter alone says nothing
    from mmjax.components import Component

    with pytest.raises(ValueError, match="field.s. window, stride have no meaning"):
        reference([Component("projector", "pool", PoolConfig, object)])


def test_tutorial_links_the_reference():
    assert "(components.md)" in (DOCS / "custom_models.md").read_text()
