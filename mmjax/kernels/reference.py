"""The one masked-softmax attention that every jnp path computes.

Axis legend: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.

Four callers, one core: `attention.xla_attention` (the model's numerics, what XLA runs) and the
kernels' references `flash_attention.attention_reference`,
`decode_attention.decode_attention_reference` and `cpu.prefill_attention.interval_attention_reference`
(float32 throughout, `exact=True`). They differ only in how they say which keys are visible:
a MaskSpec, a key range per row, or a key interval per query; each turns that into a bool `ok`
broadcastable to the logits [B, K, G, T, S] and calls `softmax_attention`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from mmjax.kernels.mask import NEG_INF

__all__ = ["masked_softmax", "softmax_attention"]


def masked_softmax(logits, ok):
    """softmax over the last axis of float32 logits, keys where `ok` is False excluded
    (ok None: nothing masked). A row with no visible key gives 0, not NaN and not HF's
    uniform average, so padded rows stay 0."""
    if ok is None:
        return jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(ok, logits, NEG_INF)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - lax.stop_gradient(jnp.where(m == NEG_INF, 0.0, m)))
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total == 0.0, 1.0, total)


def softmax_attention(q, k, v, ok, scale: float | None = None, *, kv_layout: str = "BSKH", exact: bool = False):
    """q [B, T, N, H]; k/v [B, S, K, H] ("BSKH") or [B, K, S, H] ("BKSH"); ok bool broadcastable
    to [B, K, G, T, S] or None -> [B, T, N, H] in q's dtype.

    exact=False follows HF eager attention: products in the inputs' dtype accumulated in float32,
    logits * scale, softmax in float32, probabilities cast to v's dtype for the second product.
    exact=True (the references) casts everything to float32 first."""
    out_dtype = q.dtype
    if exact:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = (k.shape[1], k.shape[2]) if kv_layout == "BSKH" else (k.shape[2], k.shape[1])
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # Pin f32 matmuls to full precision (GPUs would otherwise use TF32 for them).
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    qg = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum(f"BTKGH,{kv_layout}->BKGTS", qg, k, precision=prec, preferred_element_type=jnp.float32)
    probs = masked_softmax(logits * scale, ok).astype(v.dtype)
    if q_len == 1 and kv_layout == "BKSH":
        # Decode against the cache: probs @ V as a multiply + reduce over S. As a dot, XLA:CPU
        # transposed every layer's V cache (B == 1) or fell back to a naive loop (B > 1, 1.7 ms
        # per layer at B=8 and 416 slots); the reduction reads V once, in place. Same products,
        # float32 accumulation as preferred_element_type gives.
        f32 = jnp.float32
        out = jnp.sum(probs[:, :, :, 0, :, None].astype(f32) * v[:, :, None].astype(f32), axis=3)  # [B, K, G, H]
    else:
        out = jnp.einsum(f"BKGTS,{kv_layout}->BTKGH", probs, v, precision=prec, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(out_dtype)
