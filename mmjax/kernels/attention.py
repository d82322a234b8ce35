"""The one place that chooses how attention is computed.

Axis legend: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.

`attention(q, k, v, mask, impl=...)` takes the model's layouts (q [B, T, N, H], k/v
[B, S, K, H]) and a MaskSpec, and runs one of:
  * "xla":    einsum softmax below; what CPU runs, exact against HF eager attention. A single
              query token against the cache (a decode step) in float32 on CPU goes through
              the cpu_decode_attention FFI kernel instead (same math, one call per layer).
  * "pallas": the Pallas kernels: decode_attention for a single query token (T == 1,
              no segments), flash_attention otherwise. On CPU they run in interpret mode
              (slow; for tests only).
  * "auto":   the entry of AUTO_IMPL for the default backend.
`impl` is an explicit argument threaded from the model config: there is no global default.
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from mmjax.errors import InputError
from mmjax.kernels import cpu_decode_attention, cpu_prefill_attention
from mmjax.kernels.decode_attention import decode_attention
from mmjax.kernels.flash_attention import NEG_INF, MaskSpec, check_qkv, flash_attention, make_mask

__all__ = ["AUTO_IMPL", "Impl", "MaskSpec", "attention", "decode_range", "make_mask", "query_ranges", "resolve_impl",
           "xla_attention"]

Impl = Literal["auto", "xla", "pallas"]

# The kernels are written for the Triton lowering and checked in interpret mode; TPU gets
# the XLA path until they are shown to lower through Mosaic TPU there.
AUTO_IMPL = {"cpu": "xla", "gpu": "pallas", "cuda": "pallas", "rocm": "pallas", "tpu": "xla"}


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """"auto" -> the AUTO_IMPL entry for `backend` (default: jax.default_backend())."""
    if impl == "auto":
        return AUTO_IMPL.get(backend or jax.default_backend(), "xla")
    if impl not in ("xla", "pallas"):
        raise InputError(f"attention: impl={impl!r} is not one of 'auto', 'xla', 'pallas'")
    return impl


def xla_attention(q, k, v, mask: MaskSpec, scale: float | None = None, kv_layout: str = "BSKH"):
    """Einsum attention with the mask built from MaskSpec; softmax in float32.

    kv_layout "BKSH" takes k/v as [B, K, S, H] (the KV cache's layout): the contractions then
    have their batch axes (B, K) leading, so XLA needs no per-step transpose of the cache.

    Numerics follow HF eager attention: logits = (q . k) * scale, masked, softmax in
    float32, probabilities cast to v's dtype for the second product. Masked logits are
    -inf (not dtype-min) and a row with no visible key gives 0 instead of HF's uniform
    average, so padded rows stay 0 and never NaN.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv = "BSKH" if kv_layout == "BSKH" else "BKSH"
    kv_len, num_kv_heads = (k.shape[1], k.shape[2]) if kv == "BSKH" else (k.shape[2], k.shape[1])
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # Pin f32 matmuls to full precision (GPUs would otherwise use TF32 for them).
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    qg = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum(f"BTKGH,{kv}->BKGTS", qg, k, precision=prec, preferred_element_type=jnp.float32)
    logits = logits * scale
    if mask.is_trivial:
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        ok = make_mask(mask, q_len, kv_len)[:, :, None]  # [B|1, 1, 1, T, S]
        logits = jnp.where(ok, logits, NEG_INF)
        m = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - jax.lax.stop_gradient(jnp.where(m == NEG_INF, 0.0, m)))
        total = jnp.sum(e, axis=-1, keepdims=True)
        probs = e / jnp.where(total == 0.0, 1.0, total)
    probs = probs.astype(v.dtype)
    if q_len == 1 and kv == "BKSH":
        # Decode against the cache: probs @ V as a multiply + reduce over S. As a dot, XLA:CPU
        # transposed every layer's V cache (B == 1) or fell back to a naive loop (B > 1, 1.7 ms
        # per layer at B=8 and 416 slots); the reduction reads V once, in place. Same products,
        # float32 accumulation as preferred_element_type gives.
        f32 = jnp.float32
        out = jnp.sum(probs[:, :, :, 0, :, None].astype(f32) * v[:, :, None].astype(f32), axis=3)  # [B, K, G, H]
        return out.reshape(q.shape).astype(q.dtype)
    out = jnp.einsum(f"BKGTS,{kv}->BTKGH", probs, v, precision=prec, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


def query_ranges(mask: MaskSpec, batch: int, q_len: int, kv_len: int):
    """Every MaskSpec without segments gives each query an interval of keys: returns
    (start [B, T], end [B, T]) int32 with visible keys start <= s < end for query t of row b."""
    rows = lambda x, default: default if x is None else jnp.asarray(x, jnp.int32)[:, None]
    zeros = jnp.zeros((batch, q_len), jnp.int32)
    pos = rows(mask.q_offset, jnp.zeros((batch, 1), jnp.int32)) + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    end = rows(mask.kv_lengths, jnp.full((batch, 1), kv_len, jnp.int32)) + zeros
    start = zeros
    # A window wider than any distance is no window; capped so that pos + window stays in int32.
    window = None if mask.sliding_window is None else min(mask.sliding_window, 2**30)
    if mask.causal:
        c_end, c_start = pos + 1, (zeros if window is None else pos - window + 1)
        if mask.prefix_lengths is not None:  # inside the prefix: the whole prefix
            prefix = rows(mask.prefix_lengths, None)
            inside = pos < prefix
            c_end, c_start = jnp.where(inside, prefix, c_end), jnp.where(inside, 0, c_start)
        end, start = jnp.minimum(end, c_end), c_start
    elif window is not None:
        end, start = jnp.minimum(end, pos + window), pos - window + 1
    return jnp.clip(start, 0, kv_len), jnp.clip(end, 0, kv_len)


def decode_range(mask: MaskSpec, batch: int, kv_len: int):
    """query_ranges for a single query (T == 1): (start [B], end [B]) int32."""
    start, end = query_ranges(mask, batch, 1, kv_len)
    return start[:, 0], end[:, 0]


def attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H] (kv_layout "BSKH") or [B, K, S, H] ("BKSH", the KV cache)
    v: jax.Array,  # like k
    mask: MaskSpec,
    *,
    impl: Impl = "auto",
    scale: float | None = None,
    kv_layout: str = "BSKH",
) -> jax.Array:  # [B, T, N, H] in q's dtype
    if kv_layout not in ("BSKH", "BKSH"):
        raise InputError(f"attention: kv_layout={kv_layout!r} is not 'BSKH' or 'BKSH'")
    if kv_layout == "BKSH" and resolve_impl(impl) == "xla":
        check_qkv(q, k.swapaxes(1, 2), v.swapaxes(1, 2))  # shapes only: traced, not computed
        mask.check(q.shape[0], q.shape[1], k.shape[2])
        if cpu_decode_attention.use_for(q, k, v, mask):  # one token against the cache, on CPU
            start, end = decode_range(mask, q.shape[0], k.shape[2])
            return cpu_decode_attention.decode_attention_cpu(q, k, v, start, end, scale)
        return xla_attention(q, k, v, mask, scale, kv_layout)
    if kv_layout == "BKSH":  # the Pallas kernels read [B, S, K, H]
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    check_qkv(q, k, v)
    batch, q_len, _, _ = q.shape
    kv_len = k.shape[1]
    mask.check(batch, q_len, kv_len)
    backend = jax.default_backend()
    if resolve_impl(impl, backend) == "xla":
        if cpu_prefill_attention.use_for(q, k, v, mask):  # a prompt's own keys, on CPU
            start, end = query_ranges(mask, batch, q_len, kv_len)
            return cpu_prefill_attention.prefill_attention_cpu(q, k, v, start, end, scale)
        return xla_attention(q, k, v, mask, scale)
    interpret = backend == "cpu"
    if q_len == 1 and mask.q_segment_ids is None:
        start, end = decode_range(mask, batch, kv_len)
        return decode_attention(q, k, v, end, kv_starts=start, scale=scale, interpret=interpret)
    return flash_attention(q, k, v, mask=mask, scale=scale, interpret=interpret)
