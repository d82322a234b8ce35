"""The generation state and the per-request step arguments, as typed pytrees.

Axis legend: B rows, K kv heads, S cache slots, H head dim, M token slots, E stop-id slots.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

__all__ = ["DecodeState", "StepArgs"]


@flax.struct.dataclass
class DecodeState:
    """Everything a decode step reads and writes; donated to each step (the cache is updated in
    place). Rows are right-padded: each row's prompt sits at cache slots 0..len-1, so a row in a
    batch sees exactly the positions and keys it would see alone."""
    cache: Any  # list of per-layer {"k", "v": [B, K, S, H]} (int8: + "k_scale", "v_scale" [B, K, S])
    last: jax.Array  # [B] token fed to the next step
    index: jax.Array  # [B] cache slot of that token (= prompt length + tokens so far)
    pos_offset: jax.Array  # [B] rope position = cache index + pos_offset (M-RoPE's rope delta)
    tokens: jax.Array  # [B, M] generated tokens (M = token slots, a bucket >= max_new_tokens)
    done: jax.Array  # [B] row finished (stop token or max_new_tokens)
    step: jax.Array  # [] tokens generated so far


@flax.struct.dataclass
class StepArgs:
    """Per-request arguments of every step. All traced: changing them compiles nothing (only
    greedy vs sampling is static)."""
    temperature: jax.Array  # [] float32 (> 0; greedy steps ignore it)
    top_k: jax.Array  # [] int32, 0 = off
    top_p: jax.Array  # [] float32, 1 = off
    stop_ids: jax.Array  # [E] int32, -1 = unused slot
    min_new_tokens: jax.Array  # [] int32: stop tokens are not eligible before this many tokens
    max_new_tokens: jax.Array  # [] int32
    key: jax.Array  # PRNG key; step i samples with fold_in(key, i)

    @classmethod
    def make(cls, sampling, stop_ids, min_new_tokens: int, max_new_tokens: int, slots: int) -> "StepArgs":
        """sampling: mmjax.generation.sampling.SamplingParams (validated on the host)."""
        stops = sorted(set(stop_ids))
        return cls(jnp.float32(max(sampling.temperature, 1e-6)), jnp.int32(sampling.top_k),
                   jnp.float32(sampling.top_p), jnp.asarray(stops + [-1] * (slots - len(stops)), jnp.int32),
                   jnp.int32(min_new_tokens), jnp.int32(max_new_tokens), jax.random.PRNGKey(sampling.seed))
