"""Every padded shape mmjax compiles for is decided here, and only here.

Inputs of varied sizes are padded up to the smallest bucket that holds them, so a stream
of requests reuses a handful of compiled programs: one per (bucket, bucket, ...) tuple
actually touched. Padding is masked (key lengths, segment ids), never computed into results.
"""
from __future__ import annotations

import dataclasses

from mmjax.errors import InputError

__all__ = ["Buckets", "DEFAULT_BUCKETS", "pick"]


def _pow2(lo: int, hi: int) -> tuple[int, ...]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return tuple(out)


def _sixteenths(lo: int, hi: int) -> tuple[int, ...]:
    """lo, then steps of 1/16 of the enclosing power of two, at least 16 (..., 256, 272, ...,
    512, 544, ...): padding wastes at most ~6% of a prompt's compute. Powers of two wasted up
    to 50% (a 322-token prompt padded to 512 made prefill 1.6x slower than it needed to be);
    eighths up to 12% (322 ran as 352). Twice the buckets of eighths: more programs to compile
    for a stream of varied prompts, each once (the persistent cache keeps them)."""
    out, p = [lo], lo
    while p < hi:
        step = max(p // 16, 16)
        out += list(range(p + step, 2 * p + 1, step))
        p *= 2
    return tuple(v for v in out if v <= hi)


@dataclasses.dataclass(frozen=True)
class Buckets:
    prompt: tuple[int, ...] = _sixteenths(32, 32768)  # prompt tokens (after image expansion)
    batch: tuple[int, ...] = _pow2(1, 256)  # rows
    images: tuple[int, ...] = _pow2(1, 64)  # images in one call
    patches: tuple[int, ...] = _pow2(64, 65536)  # native-resolution patches (Qwen2-VL)
    # Token slots: room for generated tokens in the state and the cache, a bucket >= the request's
    # max_new_tokens (which stays exact: a row stops at max_new_tokens, not at the slot count).
    token_slots: tuple[int, ...] = _pow2(16, 16384)

    def cache_length(self, prompt_len: int, max_new_tokens: int) -> int:
        """KV cache length: prompt bucket + token slots (both from finite sets)."""
        return pick(prompt_len, self.prompt, "prompt length") + pick(max_new_tokens, self.token_slots, "max_new_tokens")


DEFAULT_BUCKETS = Buckets()


def pick(value: int, buckets: tuple[int, ...], what: str) -> int:
    """Smallest bucket >= value."""
    for b in buckets:
        if b >= value:
            return b
    raise InputError(f"{what} {value} exceeds the largest bucket {buckets[-1]}")
