"""The OpenAI-compatible server end to end: `python -m mmjax.serve` on the tiny LLaVA as a subprocess,
driven by the real openai client (and plain HTTP for what the client hides). One server for the
module; every answer is compared with mmjax.generate run alone (greedy)."""
import concurrent.futures
import http.client
import json
import time

import openai
import pytest

import mmjax
from serve_process import API_KEY, data_url, image, image_message, serve

MAX_REQUEST_MB = 0.25
MAX_IMAGE_MB = 0.05


@pytest.fixture(scope="module")
def server(tiny_llava):
    with serve(tiny_llava.flax, "--api-key", API_KEY, "--max-request-mb", str(MAX_REQUEST_MB),
               "--max-image-mb", str(MAX_IMAGE_MB), "--max-num-seqs", "4", "--max-waiting", "4") as srv:
        yield srv


@pytest.fixture(scope="module")
def model(tiny_llava):
    return mmjax.load(tiny_llava.flax)


def test_chat_with_image_equals_generate(server, model):
    img = image(1)
    want = mmjax.generate(model, [img], "<image> Describe it.", max_new_tokens=8)
    client = server.client()
    r = client.chat.completions.create(model=server.model, max_tokens=8, temperature=0,
                                       messages=image_message(img, "Describe it."))
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == len(want.prompt_tokens)
    assert r.choices[0].finish_reason == ("length" if len(want.token_ids) == 8 else "stop")

    chunks = list(client.chat.completions.create(model=server.model, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=image_message(img, "Describe it.")))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.id == chunks[0].id for c in chunks)


def test_two_images_in_one_message(server, model):
    imgs = [image(2), image(3, size=(40, 24))]
    want = mmjax.generate(model, imgs, "<image> and <image> compared", max_new_tokens=6)
    content = [{"type": "image_url", "image_url": {"url": data_url(imgs[0])}}, {"type": "text", "text": "and"},
               {"type": "image_url", "image_url": {"url": data_url(imgs[1], "JPEG")}},
               {"type": "text", "text": "compared"}]
    # JPEG is lossy: the reference must see the decoded JPEG too
    from mmjax.serving.media import MediaLimits, load_image
    imgs[1] = load_image(data_url(imgs[1], "JPEG"), MediaLimits())
    want = mmjax.generate(model, imgs, "<image> and <image> compared", max_new_tokens=6)
    r = server.client().chat.completions.create(model=server.model, max_tokens=6, temperature=0,
                                                messages=[{"role": "user", "content": content}])
    assert r.choices[0].message.content == want.text


def test_completions_equal_generate(server, model):
    want = mmjax.generate(model, None, "a red sky at night", max_new_tokens=10, chat_template=False)
    client = server.client()
    r = client.completions.create(model=server.model, prompt="a red sky at night", max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model=server.model, prompt="a red sky at night", max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    ids = model.tokenizer.encode("a red sky at night")
    r = client.completions.create(model=server.model, prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text


def test_stop_string_cuts_the_text(server, model):
    full = mmjax.generate(model, None, "blue sea", max_new_tokens=12, chat_template=False).text
    stop = full[4:6]
    want = full[:full.find(stop)]
    client = server.client()
    r = client.completions.create(model=server.model, prompt="blue sea", max_tokens=12, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(model=server.model, prompt="blue sea", max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids_and_sampling_extras(server, model):
    want = mmjax.generate(model, None, "blue sea", max_new_tokens=12, chat_template=False)
    stop_id = want.token_ids[3]
    cut = want.token_ids[:want.token_ids.index(stop_id) + 1]
    r = server.client().completions.create(model=server.model, prompt="blue sea", max_tokens=12, temperature=0,
                                           extra_body={"stop_token_ids": [stop_id]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(cut)
    assert r.choices[0].text == model.tokenizer.decode(cut[:-1])  # the stop token's own text is left out
    sampled = [server.client().completions.create(model=server.model, prompt="blue sea", max_tokens=8,
                                                  temperature=0.9, top_p=0.9, seed=7, extra_body={"top_k": 50})
               for _ in range(2)]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text  # same seed, same tokens


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    assert server.request("GET", "/health", key=None)[0] == 200


PNG = data_url(image(0))
GOOD = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def _with(**kw):
    return {**GOOD, **kw}


def _img(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text",
                                                                                            "text": "x"}]}]


BAD = [  # (request body, status, the field the error names)
    (_with(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role"),
    (_with(messages=_img("data:image/png;base64,not*base64")), 400, "messages[0].content[0].image_url"),
    (_with(messages=_img("data:image/png;base64,aGVsbG8gd29ybGQ=")), 400, "messages[0].content[0].image_url"),
    (_with(messages=_img("data:text/plain;base64,aGVsbG8=")), 400, "messages[0].content[0].image_url"),
    (_with(messages=_img("file:///etc/passwd")), 400, "messages[0].content[0].image_url"),
    (_with(messages=_img("http://127.0.0.1/a.png")), 400, "messages[0].content[0].image_url"),
    (_with(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}] * 17}]), 400,
     "messages"),
    (_with(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]), 400,
     "messages[0].content[0].type"),
    (_with(messages=[{"role": "user", "content": "a literal <image> marker"}]), 400, "messages"),
    (_with(messages=[]), 400, "messages"),
    (_with(max_tokens=4000), 400, "max_tokens"),
    (_with(max_tokens=None, max_completion_tokens=4000), 400, "max_completion_tokens"),
    (_with(max_tokens=0), 400, "max_tokens"),
    (_with(temperature=-0.5), 400, "temperature"),
    (_with(top_p=0), 400, "top_p"),
    (_with(top_k=-2), 400, "top_k"),
    (_with(seed=-1), 400, "seed"),
    (_with(stop=[""]), 400, "stop"),
    (_with(stop_token_ids=[10**6]), 400, "stop_token_ids"),
    (_with(n=2), 400, "n"),
    (_with(logprobs=True), 400, "logprobs"),
    (_with(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (_with(model="other"), 404, "model"),
    ({k: v for k, v in GOOD.items() if k != "messages"}, 400, "messages"),
]


def test_bad_requests_name_the_field_and_disturb_no_one(server, model):
    img = image(4)
    want = mmjax.generate(model, [img], "<image> steady", max_new_tokens=16)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a good request runs while the bad ones arrive
        good = pool.submit(lambda: server.client().chat.completions.create(
            model=server.model, max_tokens=16, temperature=0, messages=image_message(img, "steady")))
        for body, status, param in BAD:
            got, err = server.request("POST", "/v1/chat/completions", body)
            assert got == status, (body, err)
            assert set(err["error"]) == {"message", "type", "param", "code"}, err
            assert err["error"]["param"] == param, (body, err)
            assert param.split("[")[0].split(".")[0] in err["error"]["message"], err
        assert good.result(timeout=120).choices[0].message.content == want.text
    status, err = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]})
    assert (status, err["error"]["param"]) == (400, "prompt")
    status, err = server.request("POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]


def test_api_key(server):
    for key in (None, "wrong"):
        status, err = server.request("POST", "/v1/chat/completions", GOOD, key=key)
        assert (status, err["error"]["code"]) == (401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert server.request("GET", "/v1/models", key=None)[0] == 401
    assert server.request("GET", "/health", key=None)[0] == 200  # probes and scrapers need no key
    assert server.request("GET", "/metrics", key=None)[0] == 200


def test_size_limits(server):
    big_text = "x" * int(MAX_REQUEST_MB * 2**20 * 1.2)
    status, err = server.request("POST", "/v1/chat/completions",
                                 _with(messages=[{"role": "user", "content": big_text}]))
    assert (status, err["error"]["code"]) == (413, "request_too_large")
    big_image = data_url(image(5, size=(160, 160)))  # random pixels: PNG ~75 KB, over 0.05 MiB
    assert MAX_IMAGE_MB * 2**20 < len(big_image) * 3 / 4 < MAX_REQUEST_MB * 2**20
    status, err = server.request("POST", "/v1/chat/completions", _with(messages=_img(big_image)))
    assert (status, err["error"]["param"]) == (413, "messages[0].content[0].image_url"), err


def test_metrics_parse(server):
    server.client().completions.create(model=server.model, prompt="count me", max_tokens=3, temperature=0)
    m = server.metrics()
    assert m['mmjax:request_success_total{finished_reason=length,model_name=tiny}'] >= 1
    assert m["mmjax:generation_tokens_total{model_name=tiny}"] >= 3
    assert m["mmjax:prompt_tokens_total{model_name=tiny}"] > 0
    assert m["mmjax:time_to_first_token_seconds_count{model_name=tiny}"] >= 1
    assert m["mmjax:inter_token_latency_seconds_count{model_name=tiny}"] >= 2
    for name in ("mmjax:num_requests_waiting", "mmjax:num_requests_running", "mmjax:kv_pages_used",
                 "mmjax:kv_pages_total", "mmjax:encoder_cache_hits_total", "mmjax:encoder_cache_misses_total"):
        assert name in m, name
    assert m["mmjax:kv_pages_total"] > 0


def _send(server, max_tokens: int, stream: bool = True) -> http.client.HTTPConnection:
    """A request for exactly max_tokens tokens: min_tokens holds off EOS, which the tiny random model
    samples after ~64 tokens of "go on" -- a "long" request must not end early by chance."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "go on", "stream": stream,
                                                        "max_tokens": max_tokens, "min_tokens": max_tokens,
                                                        "temperature": 0}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    return conn


def _open_stream(server, max_tokens: int):
    conn = _send(server, max_tokens)
    return conn, conn.getresponse()


def test_client_disconnect_frees_pages(server):
    conn, resp = _open_stream(server, 1900)
    assert resp.status == 200
    for _ in range(3):
        assert resp.readline().startswith(b"data: ")
        assert resp.readline() == b"\n"
    assert server.metrics()["mmjax:kv_pages_used"] > 0  # it is running
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    assert server.wait_metric("mmjax:kv_pages_used", 0, timeout=30) == 0
    assert server.wait_metric("mmjax:num_requests_running", 0, timeout=5) == 0

    conn = _send(server, 1900, stream=False)  # a client that gives up waiting for a whole answer
    deadline = time.monotonic() + 30
    while server.metrics()["mmjax:kv_pages_used"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metrics()["mmjax:kv_pages_used"] > 0
    conn.sock.close()
    conn.close()
    assert server.wait_metric("mmjax:kv_pages_used", 0, timeout=30) == 0


def test_queue_full_is_429(server):
    """--max-num-seqs 4 --max-waiting 4: of 12 long streams at most 8 (+1 being admitted) are taken,
    the rest are refused with 429; once the clients leave, every page is free and requests go in again."""
    opened, refused = [], 0
    try:
        for _ in range(12):
            conn, resp = _open_stream(server, 1900)
            if resp.status == 429:
                assert json.loads(resp.read())["error"]["code"] == "queue_full"
                refused += 1
                conn.close()
            else:
                assert resp.status == 200
                opened.append(conn)
    finally:
        for conn in opened:
            conn.sock.close()
            conn.close()
    assert refused >= 3 and len(opened) <= 9
    deadline = time.monotonic() + 60
    while True:  # the engine may still be compiling a bucket: retry until it takes requests again
        status, body = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": "again", "max_tokens": 2})
        if status != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, body
    for name in ("mmjax:kv_pages_used", "mmjax:num_requests_waiting", "mmjax:num_requests_running"):
        assert server.wait_metric(name, 0, timeout=30) == 0, name
