"""What the serving engine takes and gives back: one Request per prompt, RequestOutputs as it runs.

A Request holds host-side inputs only (token ids and the processor's image arrays for one row),
so it can be built, checked and queued without touching the device."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from mmjax.generation.sampling import SamplingParams

__all__ = ["Request", "RequestOutput", "FINISH_REASONS"]

FINISH_REASONS = ("stop", "length", "abort")
_ids = itertools.count()


@dataclasses.dataclass(eq=False)  # a request is itself (its arrays have no truth value)
class Request:
    prompt_token_ids: list[int]  # after image expansion (each image's token run is in it)
    mm_inputs: dict[str, np.ndarray]  # the processor's image arrays for this row ({} without images)
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # EOS ids of the tokenizer + the caller's (ServingEngine.make_request)
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = 0.0  # time.monotonic() when added (set by the engine)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens produced since the previous output of this request
    token_ids: list[int]  # every token so far (a stop token is included, as mmjax.generate does)
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    error: Any = None  # an MmjaxError when the request failed on its own (others go on)
