"""Test-wide settings: offline, single device in this process, no persistent compile cache
(compile-count tests must see real compiles; the cache has its own test in a subprocess); and
the fixtures several files share.

Tiers: `pytest -m "not slow"` is the fast inner loop; `make test` runs everything (the slow
end-to-end tests and the lowering tier included)."""
import dataclasses
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["MMJAX_COMPILE_CACHE"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclasses.dataclass(frozen=True)
class TinyLlava:
    hf: Path  # what save_pretrained wrote (safetensors, tokenizer, processor)
    flax: Path  # converters.torch2flax's output
    hf_model: object  # the LlavaForConditionalGeneration in eval mode (do not modify)
    hf_processor: object


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> TinyLlava:
    """The default tiny LLaVA (mmjax.testing.save_tiny_llava), written and converted once for the
    whole run. Read-only: a test that damages or edits files copies the folder first."""
    from converters.torch2flax import convert
    from mmjax.testing.checkpoints import save_tiny_llava

    root = tmp_path_factory.mktemp("tiny_llava")
    _, hf_model, proc = save_tiny_llava(root / "hf")
    convert(root / "hf", root / "flax", progress=False)
    return TinyLlava(root / "hf", root / "flax", hf_model, proc)
