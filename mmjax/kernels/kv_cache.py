"""The KV cache's storage dtype: float (the model's, float32 or bfloat16) or int8 with a scale
per token and kv head.

Axis legend: B rows, K kv heads, S cache slots, H head dim, P pages, Z page size.

int8: symmetric over the head dim, scale = max|x| / 127 per (token, kv head), q = round(x / scale)
(an all-zero vector gets scale 1). Values are read back as q * scale in float32, in the kernel
(the C++ decode kernel and JAX's Pallas GPU paged kernel take the scales) or, for the paths that
only take floats, by dequantizing the cache first (`dequantize`). A cache layer is a dict
{"k", "v"} plus {"k_scale", "v_scale"} (shape of k without H) when int8.
"""
from __future__ import annotations

import jax.numpy as jnp

from mmjax.errors import InputError

__all__ = ["KV_CACHE_DTYPES", "check_kv_cache_dtype", "storage_dtype", "quantize", "dequantize", "is_quantized"]

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8")  # auto: the model's dtype


def check_kv_cache_dtype(name) -> str:
    if name not in KV_CACHE_DTYPES:
        raise InputError(f"kv_cache_dtype={name!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    return name


def storage_dtype(name: str, model_dtype):
    return jnp.dtype(model_dtype) if name == "auto" else jnp.dtype(name)


def is_quantized(layer: dict) -> bool:
    return "k_scale" in layer


def quantize(x):
    """x [..., H] float -> (int8 [..., H], float32 scale [...])."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize(q, scale, dtype=jnp.float32):
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)
