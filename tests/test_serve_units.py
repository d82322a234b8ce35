"""The server's host-side parts on hand-made cases, no model: incremental text with stop strings,
image_url refusals, and the engine thread (a step that raises, a shutdown with a request that
never finishes) driven by a small scripted engine."""
import asyncio
import base64
import io
import threading

import pytest
from PIL import Image

from mmjax.serving.async_engine import AsyncEngine, EngineStepError, EngineStopped
from mmjax.serving.media import MediaError, MediaLimits, load_image
from mmjax.serving.request import Request, RequestOutput
from mmjax.serving.text import TextStream


class ByteTokenizer:
    """Token id = one UTF-8 byte: a character may span tokens, as with byte-fallback vocabularies."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stop=(), sizes=(1,)):
    ids, ts, out, i, k = list(text.encode()), TextStream(ByteTokenizer(), stop), [], 0, 0
    while i < len(ids) and not ts.stopped:
        n = sizes[k % len(sizes)]
        out.append(ts.push(ids[i:i + n]))
        i, k = i + n, k + 1
    out.append(ts.finish())
    return out, ts


def test_text_stream_never_splits_a_character():
    out, _ = _stream("añb€c")
    assert "".join(out) == "añb€c"
    assert all("\ufffd" not in piece for piece in out)


@pytest.mark.parametrize("sizes", [(1,), (2,), (3, 1), (7,)])
def test_stop_string_cut_and_never_partly_sent(sizes):
    out, ts = _stream("hello wor|ld and more", stop=["|ld", "zzz"], sizes=sizes)
    assert "".join(out) == "hello wor" and ts.stopped
    assert all("|" not in piece for piece in out)


def test_no_stop_match_sends_everything():
    out, ts = _stream("abcabc", stop=["abd"])
    assert "".join(out) == "abcabc" and not ts.stopped


def test_final_incomplete_character_is_written_like_a_full_decode():
    ids = list("ok €".encode())[:-1]  # the euro sign cut after two of its three bytes
    ts = TextStream(ByteTokenizer())
    assert ts.push(ids[:3]) == "ok "
    assert ts.push(ids[3:]) == ""  # held: half a character
    assert ts.finish() == ByteTokenizer().decode(ids)[3:]


def _png_url(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_data_url_decodes():
    img = load_image(_png_url(), MediaLimits())
    assert img.size == (8, 8)


@pytest.mark.parametrize("url, status, words", [
    ("data:image/png;base64,@@@@", 400, "bad base64"),
    ("data:image/png," + "abc", 400, "base64"),
    ("data:application/pdf;base64,aGk=", 400, "not image"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), 400, "not an image"),
    ("file:///etc/passwd", 400, "scheme 'file'"),
    ("/etc/passwd", 400, "scheme"),
    ("ftp://example.org/a.png", 400, "scheme 'ftp'"),
    ("http://example.org/a.png", 400, "not in --allowed-media-domains"),
])
def test_refused_urls(url, status, words):
    with pytest.raises(MediaError, match=words) as e:
        load_image(url, MediaLimits(), "messages[0].content[1].image_url")
    assert e.value.status == status and str(e.value).startswith("messages[0].content[1].image_url: ")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "10.1.2.3", "169.254.169.254", "[::1]"])
def test_allowed_host_with_a_private_address_is_refused(host):
    name = host.strip("[]")
    limits = MediaLimits(allowed_domains=(name,))
    with pytest.raises(MediaError, match="non-public address"):
        load_image(f"http://{host}/a.png", limits)


def test_size_limits_are_413():
    with pytest.raises(MediaError) as e:
        load_image(_png_url(), MediaLimits(max_bytes=10))
    assert e.value.status == 413
    with pytest.raises(MediaError) as e:
        load_image(_png_url((100, 100)), MediaLimits(max_pixels=50 * 50))
    assert e.value.status == 413 and "100x100" in str(e.value)


class ScriptedEngine:
    """The ServingEngine interface in a few lines: each request yields `length` tokens, one per step;
    step() raises while `fail` > 0; requests whose length is None never finish."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running, self.aborts, self.fail = {}, set(), 0

    def add_request(self, req):
        with self.lock:
            self.running[req.request_id] = [req, 0]

    def abort(self, rid):
        with self.lock:
            self.aborts.add(rid)

    def has_unfinished(self):
        with self.lock:
            return bool(self.running or self.aborts)

    def stats(self):
        return {"running": len(self.running)}

    def step(self):
        with self.lock:
            if self.fail:
                self.fail -= 1
                raise RuntimeError("device lost")
            outs = []
            for rid in self.aborts & set(self.running):
                req, n = self.running.pop(rid)
                outs.append(RequestOutput(rid, [], [1] * n, 1, True, "abort"))
            self.aborts.clear()
            for rid, st in list(self.running.items()):
                st[1] += 1
                done = st[0].max_new_tokens is not None and st[1] >= st[0].max_new_tokens
                if done:
                    del self.running[rid]
                outs.append(RequestOutput(rid, [1], [1] * st[1], 1, done, "length" if done else None))
            return outs


def _req(rid, n):
    r = Request([1], {}, request_id=rid)
    r.max_new_tokens = n
    return r


async def _drain(aeng, req):
    outs = []
    async with aeng.stream(req) as s:
        async for out in s:
            outs.append(out)
    return outs


def test_a_failing_step_fails_its_requests_and_serving_goes_on():
    eng = ScriptedEngine()
    aeng = AsyncEngine(eng)
    aeng.start()

    async def main():
        eng.fail = 1
        failed = await asyncio.wait_for(_drain(aeng, _req("a", 3)), 10)
        assert isinstance(failed[-1].error, EngineStepError) and "device lost" in str(failed[-1].error)
        ok = await asyncio.wait_for(_drain(aeng, _req("b", 3)), 10)
        assert [o.finished for o in ok] == [False, False, True] and ok[-1].error is None

    asyncio.run(main())
    aeng.shutdown(1.0)
    assert not aeng._thread.is_alive()


def test_cancelled_consumer_aborts_and_shutdown_never_hangs():
    eng = ScriptedEngine()
    aeng = AsyncEngine(eng)
    aeng.start()

    async def main():
        task = asyncio.ensure_future(_drain(aeng, _req("forever", None)))
        await asyncio.sleep(0.2)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not eng.has_unfinished():
                break
            await asyncio.sleep(0.02)
        assert not eng.has_unfinished()  # aborted and reported by the engine

        stuck = asyncio.ensure_future(_drain(aeng, _req("stuck", None)))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(asyncio.to_thread(aeng.shutdown, 0.3), 10)  # drain 0.3 s, then abort it
        outs = await asyncio.wait_for(stuck, 5)
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        with pytest.raises(EngineStopped):
            aeng.stream(_req("late", 1))

    asyncio.run(main())
    assert not aeng._thread.is_alive()
