"""Many clients at once against one server: 32 concurrent requests with different images, prompt
lengths and max_tokens, then a bounded load of 200 requests at 16 concurrent. Every answer must
equal mmjax.generate run alone for that request (greedy): nothing lost, nothing mixed up."""
import concurrent.futures
import time

import pytest

import mmjax
from serve_process import API_KEY, image, image_message, serve

WORDS = "the cat sat on a red mat while the blue sea sang under a grey sky".split()


def _spec(i: int) -> dict:
    """Request i: an image (or none, every 5th), 1-16 words of prompt, 3-16 new tokens."""
    text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 16))
    img = None if i % 5 == 4 else image(100 + i, size=(24 + 8 * (i % 4), 32 + 4 * (i % 3)))
    return {"img": img, "text": text, "max_tokens": 3 + (i * 7) % 14}


@pytest.fixture(scope="module")
def specs(tiny_llava):
    model = mmjax.load(tiny_llava.flax)
    out = []
    for i in range(32):
        s = _spec(i)
        prompt = f"<image> {s['text']}" if s["img"] is not None else s["text"]
        s["want"] = mmjax.generate(model, [s["img"]] if s["img"] is not None else None, prompt,
                                   max_new_tokens=s["max_tokens"])
        out.append(s)
    return out


@pytest.fixture(scope="module")
def server(tiny_llava):
    with serve(tiny_llava.flax, "--api-key", API_KEY, "--max-num-seqs", "32") as srv:
        yield srv


def _ask(server, s: dict, stream: bool) -> tuple[str, int]:
    messages = image_message(s["img"], s["text"]) if s["img"] is not None else \
        [{"role": "user", "content": s["text"]}]
    client = server.client()
    if not stream:
        r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=s["max_tokens"],
                                           temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=s["max_tokens"],
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage.completion_tokens


def _run_all(server, jobs: list[tuple[dict, bool]], concurrency: int, timeout: float):
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(_ask, server, s, stream) for s, stream in jobs]
        done, not_done = concurrent.futures.wait(futures, timeout=timeout)
        for f in not_done:
            f.cancel()
        assert not not_done, f"{len(not_done)} of {len(jobs)} requests unanswered after {timeout}s"
        return [f.result() for f in futures]


def test_32_concurrent_mixed_requests_equal_generate_alone(server, specs):
    got = _run_all(server, [(s, i % 2 == 1) for i, s in enumerate(specs)], concurrency=32, timeout=300)
    for i, (s, (text, n)) in enumerate(zip(specs, got)):
        assert (text, n) == (s["want"].text, len(s["want"].token_ids)), f"request {i}"
    assert server.wait_metric("mmjax:kv_pages_used", 0, timeout=30) == 0


def test_200_requests_at_16_concurrent_lose_and_mix_nothing(server, specs):
    jobs = [(specs[(i * 13) % 32], i % 3 == 0) for i in range(200)]
    t0 = time.monotonic()
    got = _run_all(server, jobs, concurrency=16, timeout=240)
    elapsed = time.monotonic() - t0
    for i, ((s, _), (text, n)) in enumerate(zip(jobs, got)):
        assert (text, n) == (s["want"].text, len(s["want"].token_ids)), f"request {i}"
    m = server.metrics()
    assert m["mmjax:kv_pages_used"] == 0 or server.wait_metric("mmjax:kv_pages_used", 0, timeout=30) == 0
    assert elapsed < 120, f"200 requests took {elapsed:.0f}s"
