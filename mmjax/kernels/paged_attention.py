"""Decode attention through a block table: the serving engine's paged KV cache.

Axis legend: B rows, N query heads, K kv heads, H head dim, P pages in the pool, Z page size
(tokens per page), L pages per row (the block table's width, a bucket), S = L * Z.

The pool of one layer is k/v_pages [K, P, Z, H] (the layout of JAX's Pallas paged-attention
kernels, GPU and TPU). Row b's keys are the pages block_tables[b, :] in order; it sees keys
0 <= s < lengths[b]. Page 0 is the engine's null page: padding entries point at it and are
masked by lengths.

`paged_attention(q, k_pages, v_pages, block_tables, lengths, kernels=...)` is chosen per lowering
platform by the one KernelPolicy (policy.dispatch):
  * cpu  "cpu":     the C++ decode kernel reading the pages in place through the block table
                    (cpu.paged_decode_attention_cpu; only [0, lengths[b]) of each row), bitwise
                    equal to the kernel over the row's gathered cache (mmjax.generate's).
  * any  "xla":     paged_attention_reference: the same gather, einsum softmax.
  * cuda "pallas":  jax.experimental.pallas.ops.gpu.paged_attention (reads pages in place).
  * tpu  "pallas":  jax.experimental.pallas.ops.tpu.paged_attention (head dim a multiple of 128).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mmjax.errors import InputError
from mmjax.kernels.cpu import decode_attention as cpu_decode
from mmjax.kernels.cpu.decode_attention import gather_pages
from mmjax.kernels.cpu import write_rows as cpu_write_rows
from mmjax.kernels.mask import MaskSpec
from mmjax.kernels.policy import KernelPolicy, dispatch
from mmjax.kernels.reference import softmax_attention

__all__ = ["gather_pages", "paged_attention", "paged_attention_reference", "write_pages"]

DEFAULT = KernelPolicy()
LANES = 128  # TPU kernel: head dim a multiple of the lane width


def write_pages(pages, new, slots, kernels: KernelPolicy = DEFAULT):
    """pages [K, P, Z, H] <- new [B, T, K, H] at flat slots [B, T] (page * Z + offset); also an
    int8 pool's scales, [K, P, Z] <- [B, T, K]. In place when donated. Slots of padding tokens
    point into the null page 0. On CPU (when `kernels` lets the CPU kernels run)
    mmjax.kernels.cpu.write_rows writes the rows: XLA:CPU expands this scatter into a loop that
    copies the pool, and widens a bfloat16 one to float32."""
    K, P, Z = pages.shape[:3]
    upd = new.reshape(-1, K, *new.shape[3:]).swapaxes(0, 1).astype(pages.dtype)  # [K, B*T(, H)]
    slots = slots.reshape(-1).astype(jnp.int32)

    def xla(pages, upd, slots):
        flat = pages.reshape(K, P * Z, *pages.shape[3:])
        return flat.at[:, slots].set(upd, mode="promise_in_bounds").reshape(pages.shape)

    def rows(pages, upd, slots):  # the same write as rows of pages.reshape(K*P*Z, H)
        r = jnp.arange(K, dtype=jnp.int32)[:, None] * (P * Z) + slots[None, :]
        return cpu_write_rows.write_rows(pages, upd.reshape(r.size, -1), r.reshape(-1))

    return cpu_write_rows.dispatch_rows(kernels, rows, xla, pages, upd, slots)


def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, scale=None):
    """q [B, 1, N, H] -> [B, 1, N, H]: einsum softmax over the gathered pages, float32 softmax."""
    k, v = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    ok = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [B, S]
    return softmax_attention(q, k, v, ok[:, None, None, None, :], scale, kv_layout="BKSH")


def _check(q, k_pages, v_pages, block_tables, lengths):
    if q.ndim != 4 or q.shape[1] != 1:
        raise InputError(f"paged_attention: q must be [B, 1, N, H] (one decode token per row), got {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise InputError(f"paged_attention: k/v pages must be [K, P, Z, H] and alike, got {k_pages.shape} / "
                         f"{v_pages.shape}")
    B, _, N, H = q.shape
    K = k_pages.shape[0]
    if k_pages.shape[3] != H or N % K:
        raise InputError(f"paged_attention: q {q.shape} does not fit pages {k_pages.shape} (head dim, N % K)")
    if block_tables.shape[0] != B or lengths.shape != (B,):
        raise InputError(f"paged_attention: block_tables {block_tables.shape} / lengths {lengths.shape} do not "
                         f"have the {B} rows of q")


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, kernels: KernelPolicy = DEFAULT,
                    scale: float | None = None, k_scales=None, v_scales=None):
    """q [B, 1, N, H]; k/v_pages [K, P, Z, H]; block_tables [B, L] int32; lengths [B] int32
    (keys 0 <= s < lengths[b] visible, >= 1) -> [B, 1, N, H] in q's dtype.
    k/v_scales [K, P, Z] float32: the pools are int8 (mmjax.kernels.kv_cache); the GPU kernel
    reads them as they are, the other paths widen the gathered pages."""
    _check(q, k_pages, v_pages, block_tables, lengths)
    if (k_scales is None) != (v_scales is None):
        raise InputError("paged_attention: k_scales and v_scales come together")
    lengths = lengths.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)
    plan = functools.partial(_plan, kernels, q, k_pages, scale, k_scales)
    return dispatch(kernels, plan, q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales)


def _widen(fn):
    """fn over float pools -> fn over narrow pools (int8 + scales, or narrower than q), widened first."""
    def run(q, k, v, tables, lengths, ks, vs):
        if ks is not None:
            from mmjax.kernels.kv_cache import dequantize
            k, v = dequantize(k, ks, q.dtype), dequantize(v, vs, q.dtype)
        return fn(q, k.astype(q.dtype), v.astype(q.dtype), tables, lengths)
    return run


def _plan(kernels: KernelPolicy, q, k_pages, scale, k_scales, platform: str | None):
    """(key, fn(q, k, v, tables, lengths, k_scales, v_scales)). The C++ decode kernel and the GPU
    kernel read narrow pools themselves; the others get floats."""
    choice = "xla" if platform is None else kernels.attention(platform)
    narrow = k_scales is not None or k_pages.dtype != q.dtype
    B, _, N, H = q.shape
    if choice == "cpu":
        kv = jax.ShapeDtypeStruct((B, k_pages.shape[0], 1, H), k_pages.dtype)  # the gathered [B, K, S, H]
        sc = None if k_scales is None else jax.ShapeDtypeStruct((B, k_pages.shape[0], 1), k_scales.dtype)
        if cpu_decode.eligible(q, kv, kv, MaskSpec(causal=True, kv_lengths=jnp.zeros((B,), jnp.int32)), sc, sc):
            return ("cpu",), functools.partial(_cpu, scale=scale)
    elif choice == "pallas" and platform not in ("tpu", "cpu") and (k_scales is not None or not narrow):
        return ("triton", False), functools.partial(_gpu, scale=scale, interpret=False)
    elif choice == "pallas" and platform == "cpu" and (k_scales is not None or not narrow):
        return ("triton", True), functools.partial(_gpu, scale=scale, interpret=True)
    elif choice == "pallas" and platform == "tpu" and q.shape[3] % LANES == 0 and k_pages.shape[2] % 8 == 0:
        fn = functools.partial(_tpu, scale=scale)
        return ("tpu",), (_widen(fn) if narrow else (lambda q, k, v, t, n, ks, vs: fn(q, k, v, t, n)))
    fn = functools.partial(_xla, scale=scale)
    return ("xla",), (_widen(fn) if narrow else (lambda q, k, v, t, n, ks, vs: fn(q, k, v, t, n)))


def _xla(q, k_pages, v_pages, block_tables, lengths, *, scale):
    return paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, scale)


def _cpu(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None, *, scale):
    return cpu_decode.paged_decode_attention_cpu(q, k_pages, v_pages, block_tables, lengths, scale, k_scales,
                                                 v_scales)


def _scaled(q, scale):  # the Pallas paged kernels take q already scaled, [B, N, H]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q[:, 0].astype(jnp.float32) * scale).astype(q.dtype)


def _gpu(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None, *, scale, interpret):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_paged

    L = block_tables.shape[1]
    splits = max(d for d in range(1, 17) if L % d == 0)
    per_block = max(d for d in range(1, 9) if (L // splits) % d == 0)
    out = gpu_paged(_scaled(q, scale), k_pages, v_pages, block_tables, lengths, k_scales, v_scales, k_splits=splits,
                    pages_per_compute_block=per_block, interpret=interpret)
    return out[:, None].astype(q.dtype)


def _tpu(q, k_pages, v_pages, block_tables, lengths, *, scale):
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged

    L = block_tables.shape[1]
    per_block = max(d for d in range(1, 17) if L % d == 0)
    out = tpu_paged(_scaled(q, scale), k_pages, v_pages, lengths, block_tables, pages_per_compute_block=per_block)
    return out[:, None].astype(q.dtype)
