"""A model with its own tokenization: converted and loaded without tokenizer files, prompted with
token ids (mmjax.generate(..., prompt_token_ids=...)); a text prompt then says why it cannot be
used and what to pass instead."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mmjax
from converters.torch2flax import convert
from mmjax.api import _stop_ids
from mmjax.errors import InputError
from mmjax.preprocess.tokenizer import TOKENIZER_FILES
from tests.custom_vlm.checkpoint import save_acme_checkpoint
from tests.custom_vlm.torch_model import build_acme

FAMILY = "tests.custom_vlm.port:FAMILY"
EOS = 2  # "</s>" of the tutorial's tokenizer


def _image(seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-tok")
    ckpt = save_acme_checkpoint(root / "ckpt", build_acme(seed=0))
    bare = shutil.copytree(ckpt, root / "ckpt-bare")
    for name in TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    convert(ckpt, root / "with-tok", model=FAMILY, progress=False)
    convert(bare, root / "own-tok", model=FAMILY, progress=False)
    return mmjax.load(root / "with-tok"), mmjax.load(root / "own-tok")


def test_loads_without_tokenizer_files_and_stops_at_generation_config_eos(models):
    with_tok, own = models
    assert own.tokenizer is None and own.processor is not None  # images are still processed
    assert _stop_ids(own, None) == [EOS] == _stop_ids(with_tok, None)


def test_text_prompt_says_why_and_what_to_pass(models):
    _, own = models
    with pytest.raises(InputError, match=r"no tokenizer files .* pass prompt_token_ids=\[\.\.\.\]"):
        mmjax.generate(own, _image(0), "Describe the image.", max_new_tokens=4)


def test_token_ids_generate_what_the_text_prompt_does(models):
    with_tok, own = models
    prompts, images = ["Describe the image.", "What colour?"], [_image(1), _image(2)]
    want = mmjax.generate(with_tok, [[im] for im in images], prompts, max_new_tokens=12)
    # the ids the model's own tokenizer would give: the text of each row without its image tokens
    ids = [[t for t in row if t != own.config.image_token_id] for row in want.prompt_tokens]
    got = mmjax.generate(own, [[im] for im in images], prompt_token_ids=ids, max_new_tokens=12)
    assert got.token_ids == want.token_ids and got.prompt_tokens == want.prompt_tokens
    assert got.text is None and isinstance(want.text, list)
    one = mmjax.generate(own, images[0], prompt_token_ids=ids[0], max_new_tokens=12)
    assert one.token_ids == want.token_ids[0] and one.text is None
    # the model with a tokenizer takes ids too, and then still decodes its output
    assert mmjax.generate(with_tok, images[0], prompt_token_ids=np.array(ids[0]), max_new_tokens=12).text == \
        want.text[0]


def test_image_goes_where_the_ids_mark_it_or_first(models):
    _, own = models
    tid, q = own.config.image_token_id, own.config.image_seq_length
    marked = own.preprocess(_image(3), prompt_token_ids=[7, tid, 8, 9])
    first = own.preprocess(_image(3), prompt_token_ids=[7, 8, 9])
    np.testing.assert_array_equal(marked["input_ids"], first["input_ids"])  # prefix fusion: image first anyway
    assert first["input_ids"][0].tolist() == [tid] * q + [7, 8, 9]
    with pytest.raises(InputError, match="2 image token id.s. 4, but 1 image.s. were given"):
        own.preprocess(_image(3), prompt_token_ids=[tid, 7, tid])


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt_token_ids": [5, 10 ** 6]}, r"row 0: 1000000 is not a token id in \[0, 384\)"),
    ({"prompt_token_ids": [[5], [-1]]}, r"row 1: -1 is not a token id"),
    ({"prompt_token_ids": []}, "non-empty list of token ids"),
    ({"prompt_token_ids": [[5], "abc"]}, "non-empty list of token ids"),
    ({"prompt_token_ids": [5, 6], "prompt": "hi"}, "a text prompt or prompt_token_ids, not both"),
    ({"prompt_token_ids": [5, 6], "chat_template": True}, "chat_template=True applies to text prompts"),
])
def test_bad_token_ids_are_named(models, kwargs, match):
    _, own = models
    with pytest.raises(InputError, match=match):
        own.preprocess(_image(4), **kwargs)
