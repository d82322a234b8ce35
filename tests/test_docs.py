"""The docs' examples run: every ```python block marked `<!-- test: run -->` in these pages is
executed in order, one namespace per page (docs/custom_models.md and docs/sharding.md have
their own runners in test_custom_model.py / test_sharding.py)."""
import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = ["architecture.md", "converters.md", "kernels.md", "cpu_kernels.md", "autoport.md", "serving.md"]


def blocks(page: str) -> list[str]:
    text = (DOCS / page).read_text()
    return re.findall(r"<!-- test: run -->\n```python\n(.*?)\n```", text, re.S)


@pytest.mark.parametrize("page", PAGES)
def test_marked_examples_run(page, tmp_path, monkeypatch):
    code = blocks(page)
    assert code, f"docs/{page} has no runnable example"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(code):
        exec(compile(block, f"docs/{page}[{i}]", "exec"), ns)
