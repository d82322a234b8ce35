"""Prefill attention on XLA:CPU (prefill_attention.cc); its reference is
mmjax.kernels.flash_attention.attention_reference.

Axis legend: B batch, T query tokens, S keys, N query heads, K kv heads, G = N // K, H head dim.

`prefill_attention_cpu(q, k, v, start, end)`: q [B, T, N, H] against k/v [B, S, K, H]
("BSKH"), query t of row b seeing keys start[b, t] <= s < end[b, t] -> [B, T, N, H]. One XLA
FFI call per layer, flash-attention style (docs/cpu_kernels.md, "CPU prefill attention"). ffi.py
builds and registers it.

`eligible(q, k, v, mask)` says whether it can: more than one query token, float32, a mask that
gives one key interval per query (no segment ids, or contiguous ones: packed images, Qwen2.5-VL
windows), and the library built. Any head dim. Work is proportional to the visible keys (each
register tile of rows visits only the 32-key chunks its rows' intervals meet), so packed segments
cost Σ segment², and nothing of size T x S is ever allocated. Whether it should is the
KernelPolicy's `attention_cpu` (mmjax.kernels.attention asks both, in the CPU branch of its
platform_dependent).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.cpu import ffi
from mmjax.kernels.mask import has_ranges
from mmjax.kernels.reference import softmax_attention

__all__ = ["TARGET", "eligible", "interval_attention_reference", "prefill_attention_cpu"]

TARGET = "mmjax_prefill_attention_f32"


def eligible(q, k, v, mask) -> bool:
    """Whether attention of q [B, T, N, H] over its own k/v [B, S, K, H] goes through this kernel."""
    f32 = jnp.dtype(jnp.float32)
    return (q.shape[1] > 1 and has_ranges(mask)
            and all(jnp.dtype(a.dtype) == f32 for a in (q, k, v))
            and ffi.available())


def prefill_attention_cpu(q, k, v, start, end, scale: float | None = None):
    """q [B, T, N, H] f32, k/v [B, S, K, H] f32, start/end [B, T] int32 -> [B, T, N, H] f32."""
    batch, q_len, num_heads, head_dim = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim \
            or num_heads % k.shape[2]:
        raise ValueError(f"prefill_attention_cpu: expects q [B, T, N, H] and k/v [B, S, K, H] with K | N, "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if ffi.load() is None:
        raise RuntimeError(f"prefill_attention_cpu: kernel unavailable ({ffi.error()})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return _prefill(q, k, v, jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32), float(scale))


def _prefill_kernel(q, k, v, start, end, scale):
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k, v, start, end, scale=np.float32(scale))


def interval_attention_reference(q, k, v, start, end, scale):
    """float32 jnp reference: query t of row b sees keys start[b, t] <= s < end[b, t] (clipped
    to [0, S]); no visible key gives 0. q [B, T, N, H], k/v [B, S, K, H]."""
    kv_len = k.shape[1]
    s = jnp.arange(kv_len)[None, None, :]
    ok = (s >= jnp.clip(start, 0, kv_len)[..., None]) & (s < jnp.clip(end, 0, kv_len)[..., None])  # [B, T, S]
    return softmax_attention(q, k, v, ok[:, None, None], scale, exact=True)


_prefill = ffi.attention_with_reference_vjp(_prefill_kernel, interval_attention_reference)
