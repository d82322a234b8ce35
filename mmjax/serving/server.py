"""The OpenAI-compatible HTTP server: a FastAPI app around a ServingEngine (docs/serving.md).

    POST /v1/chat/completions   messages with text and image_url parts -> the checkpoint's chat template
    POST /v1/completions        a text prompt (or token ids), no template
    GET  /v1/models, /health, /metrics

A request is checked and preprocessed on the host (images fetched and decoded, prompt rendered
and tokenized, Request made) before it reaches the engine, so a bad request is answered with a
400 naming its field and never touches the running batch. Every error has OpenAI's shape,
{"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import re
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmjax.errors import InputError, MmjaxError
from mmjax.serving import protocol as P
from mmjax.serving.async_engine import AsyncEngine, EngineStepError, EngineStopped, RequestStream
from mmjax.serving.engine import EngineFull
from mmjax.serving.media import MediaError, MediaLimits
from mmjax.serving.messages import chat_prompt
from mmjax.serving.metrics import CONTENT_TYPE, Metrics
from mmjax.serving.text import TextStream

__all__ = ["Limits", "ApiError", "build_app"]

log = logging.getLogger("mmjax.serve")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 32 * 2**20  # the whole JSON body (413 over it)
    max_images: int = 16  # per request, refused before any is fetched (the model may allow fewer)
    media: MediaLimits = MediaLimits()  # per image: bytes, pixels, fetch timeout, allowed domains
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may still run


class ApiError(Exception):
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return P.ErrorBody(error=P.ErrorInfo(message=self.message, type=self.TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# An InputError from the engine, the processor or messages.py starts with the name of what it is about
# ("temperature must be ...", "messages[0].role: ..."); map it to the field the client wrote.
_ENGINE_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "prompt_token_ids": "prompt",
                 "images": "prompt", "image": "prompt", "prompt": "prompt", "chat": "prompt"}


def input_error(e: InputError, prompt_field: str = "prompt", max_field: str = "max_tokens") -> ApiError:
    msg = str(e)
    if isinstance(e, MediaError):
        return ApiError(e.status, msg, msg.split(":", 1)[0], "request_too_large" if e.status == 413 else None)
    head = msg.split(":", 1)[0] if ":" in msg else ""
    if not re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head):
        head = re.match(r"[A-Za-z_]*", msg).group(0)
    param = _ENGINE_NAMES.get(head, head or None)
    param = {"prompt": prompt_field, "max_tokens": max_field}.get(param, param)
    if param == max_field and head in ("max_tokens", "max_new_tokens") and head != max_field:
        msg = max_field + msg[len(head):]  # the name the client used (max_completion_tokens)
    return ApiError(400, msg, param)


def engine_error(e: Exception, prompt_field: str) -> ApiError:
    if isinstance(e, EngineFull):
        return ApiError(429, f"{e}; retry later", None, "queue_full")
    if isinstance(e, EngineStopped):
        return ApiError(503, str(e), None, "shutting_down")
    if isinstance(e, InputError):
        return input_error(e, prompt_field)
    if isinstance(e, EngineStepError):
        return ApiError(500, str(e), None, "engine_error")
    return ApiError(500, f"{type(e).__name__}: {e}", None, "internal_error")


class _BodyLimit:
    """413 for a body over `max_bytes`: by Content-Length up front, else while it is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await ApiError(413, f"request body of {int(length)} bytes is over the limit of {self.max_bytes} "
                                  "bytes", None, "request_too_large").response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:  # FastAPI re-raises an HTTPException from the body read
                raise HTTPException(413, f"request body is over the limit of {self.max_bytes} bytes")
            return msg

        await self.app(scope, counted, send)


@dataclasses.dataclass
class _Server:
    aeng: AsyncEngine
    model_name: str
    limits: Limits
    metrics: Metrics
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.aeng.engine.tokenizer


def build_app(engine, model_name: str, *, api_key: str | None = None, allowed_media_domains=(),
              limits: Limits = Limits()) -> FastAPI:
    """The app around `engine` (a ServingEngine). The engine thread starts with the app's lifespan;
    app.state.aeng is the AsyncEngine (serve.py drains it on SIGTERM)."""
    limits = dataclasses.replace(limits, media=dataclasses.replace(
        limits.media, allowed_domains=tuple(d.strip().lower() for d in allowed_media_domains if d.strip())))
    aeng = AsyncEngine(engine)
    srv = _Server(aeng, model_name, limits, Metrics(model_name, lambda: aeng.stats))

    async def lifespan(app):
        aeng.start()
        yield
        await asyncio.to_thread(aeng.shutdown, 0.0, 2.0)  # already drained by serve.py on SIGTERM

    app = FastAPI(title="mmjax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.aeng, app.state.server = aeng, srv
    app.add_middleware(_BodyLimit, max_bytes=limits.max_request_bytes)

    async def check_key(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')", None,
                           "invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        srv.metrics.error(e.status)
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [] if err.get("type") == "json_invalid" else [p for p in err.get("loc", ()) if p != "body"]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        msg = "request body is not valid JSON" if err.get("type") == "json_invalid" else err.get("msg", "invalid")
        return await _api_error(request, ApiError(400, f"{param or 'body'}: {msg}", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        if e.status_code == 413:
            return await _api_error(request, ApiError(413, str(e.detail), None, "request_too_large"))
        return await _api_error(request, ApiError(e.status_code, f"{request.url.path}: {e.detail}"))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, f"{type(e).__name__}: {e}", None, "internal_error").response()

    @app.get("/health")
    async def health():
        return Response(status_code=200 if aeng.alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return P.model_list(model_name, srv.created, getattr(engine, "max_model_len", None))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: P.ChatCompletionRequest, request: Request):
        _check_common(srv, body)
        n_images = sum(_num_images(m) for m in body.messages)
        if n_images > limits.max_images:  # before fetching or decoding any of them
            raise ApiError(400, f"messages: {n_images} images, over the limit of {limits.max_images} per request",
                           "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"

        def prepare():
            images, prompt = chat_prompt(engine.model.processor, body.messages, limits.media)
            return _make_request(engine, max_tokens, body, prompt=prompt, images=images or None,
                                 chat_template=False, mm_processor_kwargs=body.mm_processor_kwargs,
                                 request_id=f"chatcmpl-{uuid.uuid4().hex}")

        req = await _prepare(prepare, "messages", field)
        return await _respond(srv, request, body, req, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: P.CompletionRequest, request: Request):
        _check_common(srv, body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request is served, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        kw = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}

        def prepare():
            return _make_request(engine, body.max_tokens, body, chat_template=False,
                                 request_id=f"cmpl-{uuid.uuid4().hex}", **kw)

        req = await _prepare(prepare, "prompt")
        return await _respond(srv, request, body, req, chat=False)

    return app


def _num_images(m: P.ChatMessage) -> int:
    return sum(1 for p in m.content if p.type == "image_url") if isinstance(m.content, list) else 0


def _check_common(srv: _Server, body) -> None:
    if body.model != srv.model_name:
        raise ApiError(404, f"model: {body.model!r} is not served here (this server serves {srv.model_name!r})",
                       "model", "model_not_found")
    bad = P.unsupported(body)
    if bad is not None:
        raise ApiError(400, f"{bad[0]}: {bad[1]}", bad[0])
    for i, s in enumerate([body.stop] if isinstance(body.stop, str) else body.stop or []):
        if not s:
            raise ApiError(400, f"stop[{i}]: an empty stop string would stop at once", "stop")


def _make_request(engine, max_tokens: int | None, body, **kw):
    """engine.make_request with the sampling fields of `body`. Without max_tokens, the request may
    run to the end of the context (vLLM's default; make_request's max_new_tokens=None)."""
    sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                    seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
                    min_new_tokens=body.min_tokens, stop_token_ids=body.stop_token_ids)
    return engine.make_request(max_new_tokens=max_tokens, **sampling, **kw)


async def _prepare(fn, prompt_field: str, max_field: str = "max_tokens"):
    """Host-side work (images, template, tokenizer) off the event loop; InputError -> 400 naming the field."""
    try:
        return await asyncio.to_thread(fn)
    except InputError as e:
        raise input_error(e, prompt_field, max_field) from None


def _listen_disconnect(request: Request):
    async def wait():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return asyncio.ensure_future(wait())


class _Run:
    """One request's outputs -> text, finish reason, usage and metrics."""

    def __init__(self, srv: _Server, req, stop, stream: RequestStream):
        self.srv, self.req, self.outs = srv, req, stream
        self.text = TextStream(srv.tokenizer, [stop] if isinstance(stop, str) else stop or [])
        self.t0 = self.last = time.monotonic()
        self.num_tokens = 0
        self.finish_reason: str | None = None
        srv.metrics.prompt_tokens.labels(srv.model_name).inc(req.num_prompt_tokens)

    def push(self, out) -> str:
        """The text this output adds (a stop token's own text is left out, as vLLM does)."""
        if out.error is not None:
            raise engine_error(out.error, "prompt")
        new = list(out.new_token_ids)
        self._observe(len(new))
        self.num_tokens = len(out.token_ids)
        if out.finished and out.finish_reason == "stop" and new and new[-1] in self.req.stop_token_ids:
            new = new[:-1]
        delta = self.text.push(new)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif out.finished:
            if out.finish_reason == "abort":
                raise ApiError(503, "the request was aborted (the server is shutting down)", None, "aborted")
            self.finish_reason = out.finish_reason
            delta += self.text.finish()
        if self.finish_reason is not None:
            m = self.srv.metrics
            m.e2e.labels(m.model_name).observe(time.monotonic() - self.t0)
            m.finished(self.finish_reason)
        return delta

    def _observe(self, n: int) -> None:
        if not n:
            return
        m, now = self.srv.metrics, time.monotonic()
        m.generation_tokens.labels(m.model_name).inc(n)
        if self.num_tokens == 0:
            m.ttft.labels(m.model_name).observe(now - self.t0)
            n -= 1
        for _ in range(n):  # several tokens in one output (a prefill's first token and more): split evenly
            m.itl.labels(m.model_name).observe((now - self.last) / max(n, 1))
        self.last = now

    def usage(self) -> P.Usage:
        return P.Usage.of(self.req.num_prompt_tokens, self.num_tokens)


async def _respond(srv: _Server, request: Request, body, req, *, chat: bool):
    try:
        outs = srv.aeng.stream(req)
    except (EngineFull, EngineStopped, MmjaxError) as e:
        raise engine_error(e, "messages" if chat else "prompt") from None
    run = _Run(srv, req, body.stop, outs)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(srv, run, body.model, chat, usage), media_type="text/event-stream")
    collect = asyncio.ensure_future(_collect(run))
    gone = _listen_disconnect(request)
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        collect.cancel()
        await outs.aclose()
        raise
    finally:
        gone.cancel()
    if not collect.done():  # the client left: stop generating for it (nobody reads this answer)
        collect.cancel()
        await outs.aclose()
        return Response(status_code=499)
    text = collect.result()  # raises ApiError
    if chat:
        return P.chat_response(req.request_id, body.model, text, run.finish_reason, run.usage())
    return P.completion_response(req.request_id, body.model, text, run.finish_reason, run.usage())


async def _collect(run: _Run) -> str:
    parts = []
    async with run.outs as outs:
        async for out in outs:
            parts.append(run.push(out))
            if run.finish_reason is not None:
                break  # a stop string: leaving the stream aborts the request
    return "".join(parts)


def _sse_line(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(srv: _Server, run: _Run, model: str, chat: bool, include_usage: bool):
    rid, created = run.req.request_id, int(time.time())

    def chunk(text: str | None, finish: str | None = None, usage=None, delta: dict | None = None):
        """text None: the usage-only chunk; chat: `delta` as given, else {"content": text}."""
        if chat:
            d = None if text is None else delta if delta is not None else {"content": text}
            return _sse_line(P.chat_chunk(rid, model, created, d, finish, usage, include_usage))
        return _sse_line(P.completion_chunk(rid, model, created, text, finish, usage, include_usage))

    try:
        async with run.outs as outs:
            if chat:
                yield chunk("", delta={"role": "assistant", "content": ""})
            async for out in outs:
                text = run.push(out)
                if text:
                    yield chunk(text)
                if run.finish_reason is not None:
                    break
        yield chunk("", run.finish_reason, delta={})  # OpenAI: the finish_reason chunk has an empty delta
        if include_usage:
            yield chunk(None, usage=run.usage())
    except ApiError as e:  # the status line is sent already: the error goes in the stream (vLLM does the same)
        srv.metrics.error(e.status)
        yield _sse_line(e.body())
    yield "data: [DONE]\n\n"
