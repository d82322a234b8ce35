"""The OpenAI API's request and response bodies (the subset mmjax serves), as pydantic models.

Requests accept unknown fields and ignore them, as vLLM does, except the ones that would change the
answer and that mmjax cannot honour (n > 1, logprobs, tools, penalties, ...): those are refused by
`unsupported`, naming the field. Extras that vLLM also takes: top_k, min_tokens, stop_token_ids,
mm_processor_kwargs (send them with the openai client's `extra_body`)."""
from __future__ import annotations

import time
from typing import Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChatCompletionRequest", "CompletionRequest", "ChatMessage", "ErrorBody", "Usage", "unsupported",
           "chat_response", "chat_chunk", "completion_response", "completion_chunk", "model_list"]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None  # accepted and ignored (the processor decides the resolution)


class ContentPart(_Lenient):
    type: str  # "text" | "image_url" (anything else is refused with the part's index)
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(_Lenient):
    role: str  # system | user | assistant (developer is read as system); checked in server.chat_inputs
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)  # the OpenAI default; 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # extra (vLLM): 0 or -1 = off
    min_tokens: int = Field(default=0, ge=0)  # extra (vLLM)
    seed: int | None = Field(default=None, ge=0, lt=2**32)  # None: a fresh random seed per request
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extra (vLLM)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # refused when set to anything but their defaults (see `unsupported`)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    best_of: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # wins over max_tokens (OpenAI's newer name)
    mm_processor_kwargs: dict | None = None  # extra (vLLM): per-request image settings, e.g. Qwen2-VL max_pixels


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # the OpenAI completions default
    echo: bool = False
    suffix: str | None = None


def unsupported(req: _SamplingFields) -> tuple[str, str] | None:
    """(field, why) for the first parameter set to a value mmjax cannot honour, else None."""
    checks = [("n", req.n != 1, "only n=1 is served"),
              ("logprobs", bool(req.logprobs), "log probabilities are not returned"),
              ("top_logprobs", bool(req.top_logprobs), "log probabilities are not returned"),
              ("presence_penalty", bool(req.presence_penalty), "penalties are not implemented"),
              ("frequency_penalty", bool(req.frequency_penalty), "penalties are not implemented"),
              ("logit_bias", bool(req.logit_bias), "logit_bias is not implemented"),
              ("best_of", req.best_of not in (None, 1), "only best_of=1 is served"),
              ("response_format", req.response_format not in (None, {"type": "text"}), "only text responses"),
              ("tools", bool(req.tools), "tool calling is not implemented"),
              ("tool_choice", req.tool_choice not in (None, "none"), "tool calling is not implemented")]
    if isinstance(req, CompletionRequest):
        checks += [("echo", req.echo, "echo is not implemented"), ("suffix", req.suffix is not None,
                                                                   "suffix is not implemented")]
    return next(((field, why) for field, bad, why in checks if bad), None)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# --- responses: plain dicts in OpenAI's layout (built per token while streaming, so kept cheap) -----------

def chat_response(rid: str, model: str, text: str, finish_reason: str, usage: Usage) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage.model_dump()}


def chat_chunk(rid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
               usage: Usage | None = None, with_usage_field: bool = False) -> dict:
    """One `chat.completion.chunk`; delta None means the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                        "logprobs": None}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage_field:  # with include_usage every chunk has the field, null until the last one (OpenAI)
        out["usage"] = usage.model_dump() if usage is not None else None
    return out


def completion_response(rid: str, model: str, text: str, finish_reason: str, usage: Usage) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage.model_dump()}


def completion_chunk(rid: str, model: str, created: int, text: str | None, finish_reason: str | None = None,
                     usage: Usage | None = None, with_usage_field: bool = False) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish_reason,
                                       "logprobs": None}]
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage_field:
        out["usage"] = usage.model_dump() if usage is not None else None
    return out


def model_list(model: str, created: int, max_model_len: int | None) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "mmjax",
                                        "max_model_len": max_model_len}]}

