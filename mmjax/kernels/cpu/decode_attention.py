"""Decode attention on XLA:CPU (decode_attention.cc), with its reference for every cache dtype.

Axis legend: B batch, N query heads, K kv heads, G = N // K, S cache length, H head dim.

`decode_attention_cpu(q, k, v, start, end, scale=None, k_scale=None, v_scale=None)`: q
[B, 1, N, H] against the cache k/v [B, K, S, H] ("BKSH"), keys start[b] <= s < end[b] visible
-> [B, 1, N, H] in q's dtype. One XLA FFI call per layer; each (b, kv head) streams its K and V
once for all G query heads (docs/cpu_kernels.md, "CPU decode attention"). The cache is one of
CACHE_DTYPES:
  * float32;
  * bfloat16: rows widened to float32 in registers as they stream (half the bytes);
  * int8 with k_scale / v_scale float32 [B, K, S]: value = int8 * scale, one symmetric scale per
    token and kv head (a quarter of the bytes, plus 4 bytes a row).
q is float32 or bfloat16; all arithmetic is float32. ffi.py builds and registers the kernels.

`eligible(q, k, v, mask, k_scale=None, v_scale=None)` says whether it can: one query token, q
float32 or bfloat16, a cache of CACHE_DTYPES (int8 only with both scales, float32; the float
dtypes without), a mask without segment ids, and the library built. Whether it should is
the KernelPolicy's `attention_cpu` (mmjax.kernels.attention asks both, in the CPU branch of its
platform_dependent).

`paged_decode_attention_cpu(q, k_pages, v_pages, tables, lengths, scale=None, k_scale=None,
v_scale=None)`: the same kernels reading the serving engine's pools in place, k/v pages
[K, P, Z, H] (int8: scales [K, P, Z]) through block tables [B, L], keys s < lengths[b] visible
(P pages, Z rows a page, L pages a row). A row's keys sum in the order of its gathered copy, so
the result equals decode_attention_cpu over gather_pages(...) bitwise (rows.h).

`decode_attention_cpu_reference` is the same function in jnp (dequantize, then
decode_attention_reference), the kernels' test oracle and their backward pass.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.cpu import ffi
from mmjax.kernels.decode_attention import decode_attention_reference

__all__ = ["CACHE_DTYPES", "PAGED_TARGETS", "SPLIT_ROWS", "TARGET", "TARGETS", "decode_attention_cpu",
           "decode_attention_cpu_reference", "dequantize_cache", "eligible", "gather_pages", "paged_decode_attention_cpu",
           "paged_decode_attention_cpu_reference"]

# The cache dtype's custom call (decode_attention.cc: one template for the three dtypes).
TARGETS = {"float32": "mmjax_decode_attention_f32", "bfloat16": "mmjax_decode_attention_bf16",
           "int8": "mmjax_decode_attention_s8"}
TARGET = TARGETS["float32"]
PAGED_TARGETS = {dtype: "mmjax_paged_" + name[len("mmjax_"):] for dtype, name in TARGETS.items()}
CACHE_DTYPES = tuple(TARGETS)
# Rows that see more than this many keys run in parts, each a task of its own, merged by the
# row's last part (flash-decoding; decode_attention.cc): one kv head at batch 1 no longer runs on
# one core. The split follows the row's own length, so its result is the same in any batch.
SPLIT_ROWS = 1024
QUERY_DTYPES = ("float32", "bfloat16")


def dequantize_cache(x, scale=None):
    """k or v [B, K, S, H] as float32: int8 * scale [B, K, S] (per token and kv head), or a float
    cache cast."""
    x = x.astype(jnp.float32)
    return x if scale is None else x * scale.astype(jnp.float32)[..., None]


def decode_attention_cpu_reference(q, k, v, start, end, scale=None, k_scale=None, v_scale=None):
    """jnp reference of decode_attention_cpu, same arguments: the cache dequantized to float32,
    then decode_attention_reference (q in float32) -> [B, 1, N, H] in q's dtype."""
    k, v = dequantize_cache(k, k_scale), dequantize_cache(v, v_scale)
    out = decode_attention_reference(q.astype(jnp.float32), k.swapaxes(1, 2), v.swapaxes(1, 2), end,
                                     kv_starts=start, scale=scale)
    return out.astype(q.dtype)


def _name(x) -> str:
    return jnp.dtype(x.dtype).name


def _scales_given(k_scale, v_scale) -> bool:
    return all(s is not None and len(s.shape) == 3 and _name(s) == "float32" for s in (k_scale, v_scale))


def eligible(q, k, v, mask, k_scale=None, v_scale=None) -> bool:
    """Whether attention of q [B, T, N, H] over a BKSH cache goes through this kernel. Reads
    dtypes, not layouts (attention() passes k/v in their [B, S, K, H] view): int8 needs both
    scales, float32 and 3-d; their shape [B, K, S] is decode_attention_cpu's to check."""
    cache = _name(k)
    scaled = k_scale is not None or v_scale is not None
    return (q.shape[1] == 1 and mask.q_segment_ids is None
            and _name(q) in QUERY_DTYPES and cache in CACHE_DTYPES and _name(v) == cache
            and (_scales_given(k_scale, v_scale) if cache == "int8" else not scaled)
            and ffi.available())


def _check_cache(fn: str, q, k, v, k_scale, v_scale, *, paged: bool) -> str:
    """The dtype checks of both entry points (a cache [B, K, S, H] or pages [K, P, Z, H], whose
    int8 scales are its first three dims); the library loaded. -> the cache dtype's name."""
    kv, int8, axes = ("k/v pages", "int8 pages", "[K, P, Z]") if paged else ("k/v", "an int8 cache", "[B, K, S]")
    cache = _name(k)
    if _name(q) not in QUERY_DTYPES or cache not in CACHE_DTYPES or _name(v) != cache:
        raise ValueError(f"{fn}: q one of {', '.join(QUERY_DTYPES)} and {kv} both one of "
                         f"{', '.join(CACHE_DTYPES)}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cache == "int8" and not (_scales_given(k_scale, v_scale)
                                and k_scale.shape == v_scale.shape == k.shape[:3]):
        got = [None if s is None else f"{s.dtype} {s.shape}" for s in (k_scale, v_scale)]
        raise ValueError(f"{fn}: {int8} {'need' if paged else 'needs'} k_scale and v_scale float32 "
                         f"{tuple(k.shape[:3])} {axes}, got {got[0]} and {got[1]}")
    if cache != "int8" and (k_scale is not None or v_scale is not None):
        raise ValueError(f"{fn}: k_scale/v_scale go with {int8} only, {kv} are {cache}")
    if ffi.load() is None:
        raise RuntimeError(f"{fn}: kernel unavailable ({ffi.error()})")
    return cache


def decode_attention_cpu(q, k, v, start, end, scale: float | None = None, k_scale=None, v_scale=None):
    """q [B, 1, N, H] f32|bf16, k/v [B, K, S, H] f32|bf16|int8 (int8: k_scale/v_scale [B, K, S]
    f32), start/end [B] int32 -> [B, 1, N, H] in q's dtype."""
    batch, q_len, num_heads, head_dim = q.shape
    if q_len != 1 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim \
            or num_heads % k.shape[1]:
        raise ValueError(f"decode_attention_cpu: expects q [B, 1, N, H] and k/v [B, K, S, H], "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    cache = _check_cache("decode_attention_cpu", q, k, v, k_scale, v_scale, paged=False)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    start, end = jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32)
    if cache == "int8":
        return _decode_s8(q, k, v, k_scale, v_scale, start, end, scale)
    return _decode(q, k, v, start, end, scale)


def _call(q, *args, scale, paged=False):
    """The custom call of args[0]'s dtype: q [B, 1, N, H] (as float32, [B, K, G, H]) and the
    cache arguments -> [B, 1, N, H] in q's dtype."""
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads = args[0].shape[0 if paged else 1]
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    target = (PAGED_TARGETS if paged else TARGETS)[_name(args[0])]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(qg.shape, jnp.float32), vmap_method="sequential")
    return call(qg, *args, scale=np.float32(scale), split_rows=np.int64(SPLIT_ROWS)).reshape(q.shape).astype(q.dtype)


def _decode_kernel(q, k, v, start, end, scale):  # float32 or bfloat16 cache
    return _call(q, k, v, start, end, scale=scale)


def _reference(q, k, v, start, end, scale):
    return decode_attention_cpu_reference(q, k, v, start, end, scale)


_decode = ffi.attention_with_reference_vjp(_decode_kernel, _reference)


# int8 cache: the custom call has no derivative of its own; the backward pass is the reference's
# with respect to q and the scales. The int8 values get none (None: a zero cotangent), nor do the
# integer intervals.
def _decode_s8_kernel(q, k, v, k_scale, v_scale, start, end, scale):
    return _call(q, k, v, k_scale, v_scale, start, end, scale=scale)


_decode_s8 = jax.custom_vjp(_decode_s8_kernel, nondiff_argnums=(7,))


def _decode_s8_fwd(q, k, v, k_scale, v_scale, start, end, scale):
    return _decode_s8(q, k, v, k_scale, v_scale, start, end, scale), (q, k, v, k_scale, v_scale, start, end)


def _decode_s8_bwd(scale, res, g):
    q, k, v, k_scale, v_scale, start, end = res
    ref = lambda q, ks, vs: decode_attention_cpu_reference(q, k, v, start, end, scale, ks, vs)
    dq, dks, dvs = jax.vjp(ref, q, k_scale, v_scale)[1](g)
    return dq, None, None, dks, dvs, None, None


_decode_s8.defvjp(_decode_s8_fwd, _decode_s8_bwd)


# --- the serving engine's pools, read through block tables ------------------------------------
def gather_pages(pages, tables):
    """pages [K, P, Z, H] (or scales [K, P, Z]), tables [B, L] -> [B, K, L*Z(, H)]: each row's
    cache in order (the copy the paged kernel does not make; the references' and XLA's path)."""
    K, _, Z = pages.shape[:3]
    B, L = tables.shape
    return jnp.moveaxis(pages[:, tables], 1, 0).reshape(B, K, L * Z, *pages.shape[3:])


def paged_decode_attention_cpu_reference(q, k_pages, v_pages, tables, lengths, scale=None, k_scale=None,
                                         v_scale=None):
    """jnp reference of paged_decode_attention_cpu: the pages gathered, then
    decode_attention_cpu_reference over keys [0, lengths[b])."""
    k, v = gather_pages(k_pages, tables), gather_pages(v_pages, tables)
    ks = vs = None
    if k_scale is not None:
        ks, vs = gather_pages(k_scale, tables), gather_pages(v_scale, tables)
    return decode_attention_cpu_reference(q, k, v, jnp.zeros_like(lengths), lengths, scale, ks, vs)


def paged_decode_attention_cpu(q, k_pages, v_pages, tables, lengths, scale: float | None = None, k_scale=None,
                               v_scale=None):
    """q [B, 1, N, H] f32|bf16; k/v_pages [K, P, Z, H] f32|bf16|int8 (int8: k_scale/v_scale
    [K, P, Z] f32); tables [B, L] int32; lengths [B] int32 -> [B, 1, N, H] in q's dtype. No
    derivative: the serving engine's decode only."""
    B, q_len, N, H = q.shape
    if q_len != 1 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.shape[3] != H \
            or N % k_pages.shape[0] or tables.ndim != 2 or tables.shape[0] != B or lengths.shape != (B,):
        raise ValueError(f"paged_decode_attention_cpu: expects q [B, 1, N, H], k/v pages [K, P, Z, H], tables "
                         f"[B, L], lengths [B], got {q.shape}, {k_pages.shape}, {v_pages.shape}, {tables.shape}, "
                         f"{lengths.shape}")
    cache = _check_cache("paged_decode_attention_cpu", q, k_pages, v_pages, k_scale, v_scale, paged=True)
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    scales = (k_scale, v_scale) if cache == "int8" else ()
    return _call(q, k_pages, v_pages, *scales, jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32),
                 scale=scale, paged=True)
