"""The serving engine (mmjax.serving.ServingEngine): continuous batching over a paged KV cache.

Every answer is checked against mmjax.generate run on that request alone; the engine's own
bookkeeping (pages, queue, aborts, preemption, encoder cache, compiled programs) is checked
through its stats. Qwen2-VL's and the custom model's serving tests sit beside their fixtures
(test_qwen2vl.py, test_custom_model.py)."""
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax.errors import InputError
from mmjax.serving import EngineFull, ServingEngine
from mmjax.serving.encoder_cache import EncoderCache
from mmjax.serving.pages import PagePool
from serving_cases import alone, assert_served_like_alone, mixed_cases, serve_staggered

IMAGES = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (24 + 8 * i, 40, 3), np.uint8)) for i in range(5)]
PROMPTS = ["describe", "what is in the picture of the cat", "the dog and the cat" * 3, "hello", "a b c d e f g h i j k"]


@pytest.fixture(scope="module")
def model(tiny_llava):
    return mmjax.load(tiny_llava.flax)


def test_32_mixed_requests_answer_as_alone(model):
    eng = ServingEngine(model, max_num_seqs=8, page_size=8)
    outs = assert_served_like_alone(model, eng, mixed_cases(IMAGES, PROMPTS))
    assert eng.preemptions == 0
    st = eng.stats()
    assert st["encoder_cache_hits"] > 0 and st["encoder_cache_misses"] == len(IMAGES)
    assert {o.finish_reason for o in outs} <= {"stop", "length"}


def test_a_small_pool_preempts_and_recomputes_without_changing_answers(model):
    """14 pages of 8 tokens hold about two of these requests: the rest wait, running ones are
    preempted when they need a page, and are recomputed later."""
    eng = ServingEngine(model, max_num_seqs=8, page_size=8, num_pages=14)
    assert_served_like_alone(model, eng, mixed_cases(IMAGES, PROMPTS, n=6, seed=1, max_new=(12, 17)))
    assert eng.preemptions > 0


def test_abort_frees_pages_and_reports_abort(model):
    eng = ServingEngine(model, max_num_seqs=4, page_size=8)
    reqs = [eng.make_request([IMAGES[i]], "<image> describe", max_new_tokens=20, min_new_tokens=20) for i in range(3)]
    waiting = eng.make_request(None, "hello", max_new_tokens=5)
    for r in reqs:
        eng.add_request(r)
    eng.step()
    eng.step()
    assert eng.stats()["pages_used"] > 0
    eng.add_request(waiting)
    eng.abort(reqs[1].request_id)
    eng.abort(waiting.request_id)  # aborted before it ever ran
    eng.abort("no-such-request")  # ignored
    outs = {o.request_id: o for o in eng.step()}
    for r in (reqs[1], waiting):
        assert outs[r.request_id].finished and outs[r.request_id].finish_reason == "abort"
    final = {}
    while eng.has_unfinished():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    assert set(final) == {reqs[0].request_id, reqs[2].request_id}
    assert all(len(final[r.request_id].token_ids) == 20 for r in (reqs[0], reqs[2]))
    assert eng.stats()["pages_used"] == 0 and eng.stats()["running"] == 0


def test_compiles_stay_within_the_bucket_set(model):
    """Decode compiles once per (batch bucket, page bucket, greedy or not) touched; the same mix
    again compiles nothing."""
    eng = ServingEngine(model, max_num_seqs=8, page_size=8)
    before = eng.steps.compiled()  # the programs are the model's, shared by every engine on it
    cases = mixed_cases(IMAGES, PROMPTS, n=12, seed=2)
    serve_staggered(eng, cases)
    first = eng.steps.compiled()
    assert first["decode"] - before["decode"] <= 2 * len(eng.batch_buckets) * len(eng.page_buckets)
    assert first["encode"] <= 1  # every image pads to the same image bucket
    serve_staggered(ServingEngine(model, max_num_seqs=8, page_size=8), cases)
    assert eng.steps.compiled() == first


def test_queue_full_is_engine_full(model):
    eng = ServingEngine(model, max_waiting=2)
    eng.add_request(eng.make_request(None, "a"))
    eng.add_request(eng.make_request(None, "b"))
    with pytest.raises(EngineFull, match="queue is full"):
        eng.add_request(eng.make_request(None, "c"))


def test_prompt_token_ids_and_generate_agree(model):
    ids = model.preprocess(None, "hello there")["input_ids"][0].tolist()
    eng = ServingEngine(model, max_num_seqs=2)
    out, with_image = eng.generate([eng.make_request(prompt_token_ids=ids, max_new_tokens=6),
                                    eng.make_request([IMAGES[1]], prompt_token_ids=ids, max_new_tokens=6)])
    assert out.token_ids == alone(model, {"images": None, "prompt": "hello there", "max_new_tokens": 6})
    assert out.num_prompt_tokens == len(ids)
    want = mmjax.generate(model, [IMAGES[1]], prompt_token_ids=ids, max_new_tokens=6).token_ids
    assert with_image.token_ids == want and with_image.num_prompt_tokens > len(ids)


@pytest.mark.parametrize("kw, field", [
    ({"prompt": "hi", "max_new_tokens": 10_000}, "max_tokens"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "temperature": -1.0}, "temperature"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p"),
    ({"prompt": "hi", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"prompt_token_ids": [], "max_new_tokens": 2}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, 2], "prompt": "hi"}, "prompt_token_ids"),
    ({"prompt_token_ids": [[1, 2]]}, "prompt_token_ids"),
    ({"prompt": 5}, "prompt"),
])
def test_bad_requests_name_the_field(model, kw, field):
    eng = ServingEngine(model, max_num_seqs=2, max_model_len=128)
    with pytest.raises(InputError, match=field):
        eng.make_request(**kw)


def test_a_request_larger_than_the_pool_is_refused_up_front(model):
    eng = ServingEngine(model, max_num_seqs=2, page_size=8, num_pages=4)
    with pytest.raises(InputError, match="pages"):
        eng.make_request(None, "hello", max_new_tokens=40)


def test_page_pool_never_hands_out_the_null_page_and_refuses_double_free():
    pool = PagePool(5, 4)
    got = pool.alloc(4)
    assert sorted(got) == [1, 2, 3, 4] and pool.alloc(1) is None and pool.num_free == 0
    pool.free(got[:2])
    assert pool.num_used == 2
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(got[:1])


def test_encoder_cache_is_lru_bounded_in_bytes():
    cache = EncoderCache(capacity_bytes=3 * 400)
    for k in "abc":
        cache.put(k, np.zeros(100, np.float32))  # 400 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", np.zeros(100, np.float32))  # evicts b, the least recent
    assert cache.get("b") is None and cache.get("c") is not None and cache.bytes == 1200
    cache.put("huge", np.zeros(1000, np.float32))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and len(cache) == 3
    assert (cache.hits, cache.misses) == (2, 2)


def test_a_request_that_fails_on_its_own_ends_alone(model):
    """A request whose image arrays do not fit the model (built by hand, past make_request's
    checks) ends with finish_reason "abort" and its error; the requests beside it answer as alone."""
    from mmjax.serving import Request

    eng = ServingEngine(model, max_num_seqs=4, page_size=8)
    good = [eng.make_request([IMAGES[i]], "<image> describe", max_new_tokens=5) for i in range(2)]
    ids = good[0].prompt_token_ids
    bad = Request(list(ids), {"pixel_values": np.zeros((1, 3, 7, 7), np.float32)}, max_new_tokens=5)
    outs = eng.generate([good[0], bad, good[1]])
    assert outs[1].finish_reason == "abort" and outs[1].error is not None and outs[1].token_ids == []
    for i, o in ((0, outs[0]), (1, outs[2])):
        assert o.token_ids == alone(model, {"images": [IMAGES[i]], "prompt": "<image> describe", "max_new_tokens": 5})
    assert eng.stats()["pages_used"] == 0


def test_max_new_tokens_none_runs_to_the_end_of_the_context(model):
    eng = ServingEngine(model, max_num_seqs=2, max_model_len=64)
    r = eng.make_request(None, "hello", max_new_tokens=None)
    assert r.max_new_tokens == 64 - r.num_prompt_tokens
    with pytest.raises(InputError, match="prompt"):
        eng.make_request(None, "hello " * 80, max_new_tokens=None)


def test_packed_int8_kernels_serve_like_alone(tiny_llava, tmp_path):
    """An int8 model on CPU reads its decoder kernels as panels (mmjax.kernels.cpu.panels): the
    engine's batched, paged steps answer as mmjax.generate does for each request alone."""
    from converters.torch2flax import convert
    from mmjax.kernels.cpu.panels import PACKED
    from mmjax.tree import flatten_params

    convert(tiny_llava.flax, tmp_path / "int8", quantize="int8")
    m = mmjax.load(tmp_path / "int8")
    assert any(k.endswith(PACKED) and v.dtype == np.int8 for k, v in flatten_params(m.params).items())
    eng = ServingEngine(m, max_num_seqs=4, page_size=8)
    assert_served_like_alone(m, eng, mixed_cases(IMAGES, PROMPTS, n=6, seed=2))
