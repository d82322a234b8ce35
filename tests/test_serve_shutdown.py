"""SIGTERM: the server stops admitting, lets in-flight requests finish (up to --shutdown-timeout),
answers the rest with an error, and exits 0 within a bound. Nothing hangs."""
import json
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
import time

from serve_process import API_KEY, serve
from test_serve_api import _open_stream


def _read_events(resp, out: list, done: threading.Event):
    try:
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                out.append(line[6:].strip())
    except OSError:
        pass
    finally:
        done.set()


def _stream_in_background(srv, max_tokens: int):
    conn, resp = _open_stream(srv, max_tokens)
    assert resp.status == 200
    events, done = [], threading.Event()
    threading.Thread(target=_read_events, args=(resp, events, done), daemon=True).start()
    return conn, events, done


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_0(tiny_llava):
    with serve(tiny_llava.flax, "--api-key", API_KEY, "--shutdown-timeout", "1") as srv:
        # compile first what the drain will run (two rows, page buckets up to ~100 tokens): each new
        # bucket compiles in ~1 s on a loaded CI machine, which would eat the short stream's drain
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: srv.client().completions.create(
                model=srv.model, prompt="go on", max_tokens=96, temperature=0, extra_body={"min_tokens": 96}), range(2)))
        long_conn, long_events, long_done = _stream_in_background(srv, 1900)  # outlives the 1 s drain
        short_conn, short_events, short_done = _stream_in_background(srv, 32)  # finishes within it
        # SIGTERM once the short stream has streamed a few tokens: both streams are then decoding
        deadline = time.monotonic() + 60
        while len(short_events) < 8 and not short_done.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert long_events and 8 <= len(short_events) and not short_done.is_set(), len(short_events)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, body = srv.request("POST", "/v1/completions", {"model": "tiny", "prompt": "late", "max_tokens": 2},
                                   timeout=10)  # while draining: refused, not queued
        assert (status, body["error"]["code"]) == (503, "shutting_down"), body
        assert short_done.wait(30) and long_done.wait(30), "a stream was never ended"
        final = json.loads(short_events[-2])
        assert short_events[-1] == b"[DONE]" and final["choices"][0]["finish_reason"] in ("length", "stop"), final
        last = json.loads(long_events[-2])
        assert long_events[-1] == b"[DONE]" and last.get("error", {}).get("code") == "aborted", last
        try:
            assert srv.proc.wait(30) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 30 s after SIGTERM:\n{srv.log_tail()}") from None
        assert time.monotonic() - t0 < 15
        long_conn.close()
        short_conn.close()
