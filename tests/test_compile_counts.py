"""Bucketing: a stream of 40 mixed requests compiles exactly one program per bucket touched,
counted with JAX's own compile events (mmjax.profiling), not by guess."""
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax.bucketing import pick
from mmjax.profiling import count_compiles

WORDS = "the red cat sat on a wooden table near the window while a small dog ran in the field".split()


@pytest.fixture(scope="module")
def model(tiny_llava):
    return mmjax.load(tiny_llava.flax)


def _requests(n=40, seed=0):
    rng = np.random.RandomState(seed)
    reqs = []
    for _ in range(n):
        rows = int(rng.choice([1, 1, 2, 3]))
        prompts, images = [], []
        for _ in range(rows):
            words = " ".join(WORDS[: rng.randint(1, len(WORDS))] * int(rng.randint(1, 3)))
            with_image = rng.rand() < 0.7
            prompts.append(("<image> " if with_image else "") + words)
            size = (int(rng.randint(16, 90)), int(rng.randint(16, 90)))
            images.append([Image.fromarray(np.full((size[1], size[0], 3), rng.randint(255), np.uint8))]
                          if with_image else None)
        reqs.append((images, prompts, int(rng.choice([3, 9]))))
    return reqs


@pytest.mark.slow
def test_forty_requests_compile_once_per_bucket(model):
    bk = model.buckets
    prefill_keys, decode_keys = set(), set()
    reqs = _requests()
    for images, prompts, new in reqs:
        inputs = model.preprocess(images, prompts)
        B, T = len(prompts), int(inputs["attention_mask"].sum(1).max())
        n_img = sum(1 for i in images if i)
        Bb, Tb, M = pick(B, bk.batch, "b"), pick(T, bk.prompt, "t"), pick(new, bk.token_slots, "m")
        Ib = pick(n_img, bk.images, "i") if n_img else 0
        prefill_keys.add((Bb, Tb, Ib, M))
        decode_keys.add((Bb, Tb + M, M))
    assert len(prefill_keys) >= 5  # the stream really spans several buckets
    with count_compiles() as c:
        for images, prompts, new in reqs:
            out = mmjax.generate(model, images, prompts, max_new_tokens=new, min_new_tokens=new)
            assert all(len(t) == new for t in out.token_ids)
    assert c.by_function["jit(_prefill)"] == len(prefill_keys)
    assert c.by_function["jit(_decode_steps)"] == len(decode_keys)
    # the same stream again: everything is already compiled
    with count_compiles() as again:
        for images, prompts, new in reqs[:10]:
            mmjax.generate(model, images, prompts, max_new_tokens=new)
    assert again.by_function["jit(_prefill)"] == 0 and again.by_function["jit(_decode_steps)"] == 0
