"""The engine behind an asyncio server: one thread runs engine.step(), coroutines await their outputs.

  HTTP handlers (event loop)              engine thread
  ---------------------------             ------------------------------------------
  stream(req): add_request, notify  --->  while work: outs = engine.step()
  async for out in queue            <---      loop.call_soon_threadsafe(queue.put_nowait, out)
  cancelled / client gone: abort    --->      (the abort is finished by the next step)
                                          idle: wait on the condition

step() is only ever called from this one thread. If step() raises, the requests in flight are
answered with that error (they are aborted in the engine) and the thread keeps serving; repeated
failures back off instead of spinning. shutdown(timeout) stops admitting, lets in-flight requests
finish for up to `timeout` seconds, aborts the rest, and stops the thread."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from mmjax.errors import MmjaxError
from mmjax.serving.request import Request, RequestOutput

__all__ = ["AsyncEngine", "RequestStream", "EngineStopped", "EngineStepError"]

log = logging.getLogger("mmjax.serve")


class EngineStopped(MmjaxError):
    """The server is shutting down: no new requests."""


class EngineStepError(MmjaxError):
    """engine.step() raised while this request was in flight."""


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class RequestStream:
    """One request's outputs, in order, until the finished one; closing it early aborts the request."""

    def __init__(self, aeng: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.request_id = request_id
        self._aeng, self._queue = aeng, queue
        self._finished = self._closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except BaseException:  # cancelled: the consumer is gone
            await self.aclose()
            raise
        self._finished = out.finished
        if self._finished:
            await self.aclose()
        return out

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._aeng._closed(self.request_id, self._finished)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncEngine:
    def __init__(self, engine):
        self.engine = engine
        self.stats: dict = engine.stats()  # the last snapshot, taken by the engine thread (metrics read it)
        self._cv = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._wake = False
        self._accepting = True
        self._stop = False
        self._failures = 0  # consecutive step() exceptions
        self._thread = threading.Thread(target=self._run, name="mmjax-engine", daemon=True)

    # --- the event-loop side ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._accepting

    @property
    def num_in_flight(self) -> int:
        with self._cv:
            return len(self._streams)

    def stream(self, req: Request) -> RequestStream:
        """Submit `req` now (raises EngineFull from the engine, or EngineStopped) and return its outputs:

            async with aeng.stream(req) as outs:   # leaving early (cancelled, client gone, a stop
                async for out in outs: ...         # string matched) aborts it and frees its pages
        """
        s = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        rid = req.request_id
        with self._cv:
            if not self._accepting:
                raise EngineStopped("the server is shutting down; not accepting requests")
            if rid in self._streams:
                raise MmjaxError(f"request_id {rid!r} is already in flight")
            self._streams[rid] = s
        try:
            self.engine.add_request(req)
        except BaseException:
            with self._cv:
                self._streams.pop(rid, None)
            raise
        self._notify()
        return RequestStream(self, rid, s.queue)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._notify()

    def _closed(self, rid: str, finished: bool) -> None:
        with self._cv:
            self._streams.pop(rid, None)
            self._cv.notify_all()
        if not finished:
            self.abort(rid)

    def _notify(self) -> None:
        with self._cv:
            self._wake = True
            self._cv.notify()

    # --- shutdown -----------------------------------------------------------------------------
    def shutdown(self, timeout: float, grace: float = 5.0) -> None:
        """Blocking (call it off the event loop): stop admitting, wait up to `timeout` s for in-flight
        requests, abort the rest, wait up to `grace` s for their final outputs, stop the thread."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._accepting = False
            while self._streams and time.monotonic() < deadline and self._thread.is_alive():
                self._cv.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = list(self._streams)
        if left:
            log.warning("shutdown: aborting %d request(s) still in flight after %.1fs", len(left), timeout)
        for rid in left:
            self.abort(rid)
        deadline = time.monotonic() + grace
        with self._cv:
            while self._streams and time.monotonic() < deadline and self._thread.is_alive():
                self._cv.wait(0.05)
            self._fail_streams(EngineStopped("the server shut down before this request finished"))
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=max(1.0, grace))

    # --- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._wake and not self.engine.has_unfinished():
                    self._cv.wait()
                if self._stop:
                    return
                self._wake = False
            if self.engine.has_unfinished():
                self._step()
            try:
                self.stats = self.engine.stats()
            except Exception:  # noqa: BLE001 -- metrics must not stop serving
                log.exception("engine.stats() failed")

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # noqa: BLE001 -- one bad step fails its requests, not the server
            self._failures += 1
            log.exception("engine.step() failed (%d in a row)", self._failures)
            with self._cv:
                failed = list(self._streams)
                self._fail_streams(EngineStepError(f"the engine failed while running this request: "
                                                   f"{type(e).__name__}: {e}"))
            for rid in failed:
                try:
                    self.engine.abort(rid)
                except Exception:  # noqa: BLE001
                    log.exception("engine.abort(%s) failed after a failed step", rid)
            time.sleep(min(1.0, 0.01 * 2 ** min(self._failures, 7)))  # back off instead of spinning
            return
        self._failures = 0
        with self._cv:
            for out in outs:
                s = self._streams.get(out.request_id)
                if s is not None:  # else: aborted by its consumer, who has gone
                    self._deliver(s, out)
            self._cv.notify_all()  # shutdown() waits for streams to drain

    def _fail_streams(self, error: Exception) -> None:
        """Finish every open stream with `error` (holding the lock)."""
        for rid, s in list(self._streams.items()):
            self._deliver(s, RequestOutput(rid, [], [], 0, finished=True, finish_reason="abort", error=error))
            del self._streams[rid]
        self._cv.notify_all()

    @staticmethod
    def _deliver(s: _Stream, out: RequestOutput) -> None:
        try:
            s.loop.call_soon_threadsafe(s.queue.put_nowait, out)
        except RuntimeError:  # the loop is closed: nobody is listening
            pass
