"""Token selection inside the jitted step: greedy, or temperature -> top-k -> top-p (HF's order).

logits [B, V] float32. Sampling parameters are traced scalars (StepArgs), so changing them does not
recompile; only greedy-vs-sampling is static."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mmjax.errors import InputError

__all__ = ["SamplingParams", "select_token"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        # PRNGKey keeps 32 bits: a larger seed would silently repeat a smaller one's samples (or overflow)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise InputError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def select_token(logits, key, args, greedy: bool):
    """logits [B, V] -> tokens [B] int32; args: StepArgs (temperature, top_k, top_p)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    x = logits / args.temperature
    srt = jnp.sort(x, axis=-1)[:, ::-1]  # descending [B, V]
    k = jnp.where(args.top_k > 0, jnp.minimum(args.top_k, V), V)
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, (x.shape[0], 1)), axis=-1)  # [B, 1]
    x = jnp.where(x < kth, -jnp.inf, x)
    srt = jnp.where(srt < kth, -jnp.inf, srt)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p
    probs = jax.nn.softmax(srt, axis=-1)
    cum = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each entry
    keep = cum < args.top_p
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
