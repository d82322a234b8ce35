"""Soak: 200 mmjax.generate calls in one process, varied prompts, images and sampling settings,
on a tiny converted LLaVA. After a warm-up that touches every compiled shape the stream uses:

- no new compiles (the jitted prefill / decode_step caches keep their size): catches compile leaks,
  e.g. a Python value that should be traced becoming part of the cache key;
- live device buffers (len(jax.live_arrays())) never exceed the warm-up count: catches state,
  KV caches or outputs that outlive their call;
- resident memory (VmRSS) grows by at most RSS_BOUND_MIB over the 200 calls.

Measured on the 2-core CPU box (recorded in docs/refusals.md): live arrays constant, RSS growth
a few MiB.
"""
import gc
import itertools
import time

import jax
import numpy as np
import pytest
from PIL import Image

import mmjax

N_CALLS = 200
RSS_BOUND_MIB = 32
WORDS = ("cat", "sat", "on", "the", "mat", "a", "red", "dog", "ran", "far", "blue", "sky")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def live_arrays() -> int:
    gc.collect()
    return len(jax.live_arrays())


@pytest.fixture(scope="module")
def model(tiny_llava):
    return mmjax.load(tiny_llava.flax)


def request(rng, with_image=None, greedy=None, n_words=None):
    """One varied call: 1-4 words, no image or one of random size and mode, greedy or sampled."""
    n_words = n_words or int(rng.integers(1, 5))
    prompt = " ".join(rng.choice(WORDS, n_words))
    kw = {"max_new_tokens": int(rng.integers(1, 9)), "seed": int(rng.integers(0, 2**31))}
    if greedy is False or (greedy is None and rng.random() < 0.5):
        kw.update(temperature=float(rng.uniform(0.2, 1.5)), top_k=int(rng.integers(0, 50)),
                  top_p=float(rng.uniform(0.3, 1.0)))
    if with_image is True or (with_image is None and rng.random() < 0.6):
        w, h = (int(x) for x in rng.integers(4, 90, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).convert(str(rng.choice(["RGB", "L", "RGBA"])))
        return [img], "<image> " + prompt, kw
    return None, prompt, kw


def cache_sizes(model):
    return model.engine.prefill._cache_size(), model.engine.decode_steps._cache_size()


@pytest.mark.slow
def test_soak_200_generate_calls(model):
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    # warm-up: every (image?, greedy?, shortest/longest prompt) combination the stream can produce
    for with_image, greedy, n_words in itertools.product([False, True], [True, False], [1, 4]):
        images, prompt, kw = request(rng, with_image, greedy, n_words)
        mmjax.generate(model, images, prompt, **kw)
    compiled, base_live, base_rss = cache_sizes(model), live_arrays(), rss_mib()
    peak_live, texts = base_live, set()
    for i in range(N_CALLS):
        images, prompt, kw = request(rng)
        out = mmjax.generate(model, images, prompt, **kw)
        assert 1 <= len(out.token_ids) <= kw["max_new_tokens"]
        texts.add(out.text)
        if i % 20 == 19:
            peak_live = max(peak_live, live_arrays())
    end_live, end_rss = live_arrays(), rss_mib()
    seconds = time.perf_counter() - t0
    print(f"soak: {N_CALLS} calls in {seconds:.1f} s; live arrays {base_live} -> {end_live} (peak {peak_live}); "
          f"RSS {base_rss:.0f} -> {end_rss:.0f} MiB; compiled (prefill, decode) {compiled}")
    assert cache_sizes(model) == compiled, "new compiles after warm-up"
    assert peak_live <= base_live and end_live <= base_live, (base_live, peak_live, end_live)
    assert end_rss - base_rss <= RSS_BOUND_MIB, f"RSS grew {end_rss - base_rss:.0f} MiB"
    assert len(texts) > 10  # the stream really varied
