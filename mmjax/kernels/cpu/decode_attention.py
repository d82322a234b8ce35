"""Decode attention on XLA:CPU (decode_attention.cc); its reference is
mmjax.kernels.decode_attention.decode_attention_reference.

Axis legend: B batch, N query heads, K kv heads, G = N // K, S cache length, H head dim.

`decode_attention_cpu(q, k, v, start, end)`: q [B, 1, N, H] against the cache k/v
[B, K, S, H] ("BKSH"), keys start[b] <= s < end[b] visible -> [B, 1, N, H]. One XLA FFI call
per layer; each (b, kv head) streams its K and V once for all G query heads (docs/kernels.md,
"CPU decode attention"). ffi.py builds and registers it.

`eligible(q, k, v, mask)` says whether it can: one query token, float32, a mask without segment
ids, and the library built. Whether it should is the KernelPolicy's `attention_cpu`
(mmjax.kernels.attention asks both, in the CPU branch of its platform_dependent).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.cpu import ffi
from mmjax.kernels.decode_attention import decode_attention_reference

__all__ = ["TARGET", "decode_attention_cpu", "eligible"]

TARGET = "mmjax_decode_attention_f32"


def eligible(q, k, v, mask) -> bool:
    """Whether attention of q [B, T, N, H] over a BKSH cache goes through this kernel."""
    f32 = jnp.dtype(jnp.float32)
    return (q.shape[1] == 1 and mask.q_segment_ids is None
            and all(jnp.dtype(a.dtype) == f32 for a in (q, k, v))
            and ffi.available())


def decode_attention_cpu(q, k, v, start, end, scale: float | None = None):
    """q [B, 1, N, H] f32, k/v [B, K, S, H] f32, start/end [B] int32 -> [B, 1, N, H] f32."""
    batch, q_len, num_heads, head_dim = q.shape
    if q_len != 1 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim \
            or num_heads % k.shape[1]:
        raise ValueError(f"decode_attention_cpu: expects q [B, 1, N, H] and k/v [B, K, S, H], "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if ffi.load() is None:
        raise RuntimeError(f"decode_attention_cpu: kernel unavailable ({ffi.error()})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return _decode(q, k, v, jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32), float(scale))


def _decode_kernel(q, k, v, start, end, scale):
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(qg.shape, jnp.float32), vmap_method="sequential")
    return call(qg, k, v, start, end, scale=np.float32(scale)).reshape(q.shape)


def _reference(q, k, v, start, end, scale):
    return decode_attention_reference(q, k.swapaxes(1, 2), v.swapaxes(1, 2), end, kv_starts=start, scale=scale)


_decode = ffi.attention_with_reference_vjp(_decode_kernel, _reference)
