"""Decode attention (flash-decoding / split-K) as a Pallas kernel, with its reference.

Axis legend: B batch, T query length (1 or a few), S cache length, N query heads,
K kv heads, G = N // K, H head dim. M = T * G query rows per kv head, J cache splits.

A decode step has few queries and a long cache, so the prefill kernel's parallelism (one
program per query block) would leave the GPU idle. Instead the cache is cut into J chunks:
program (b, kv head, j) streams chunk j of kv head's cache once for all G query heads and
all T queries of that kv head (GQA folded into the rows of one tile: K/V is read once,
never repeated), and writes a partial (unnormalised out, max, sum). The wrapper combines
the J partials with a log-sum-exp rescale. Each row b only reads its own [kv_starts[b],
kv_lengths[b]) range: chunks past it do no work.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmjax.errors import InputError
from mmjax.kernels.flash_attention import LOG2_E, MIN_TILE, check_qkv, load_rows
from mmjax.kernels.mask import NEG_INF
from mmjax.kernels.reference import softmax_attention

# Enough programs to fill an H100/H200 (132 SMs) about twice over.
TARGET_PROGRAMS = 264


@functools.partial(jax.jit, static_argnames=("scale",))
def decode_attention_reference(q, k, v, kv_lengths, *, kv_starts=None, scale=None):
    """float32 jnp reference: every query of row b sees keys kv_starts[b] <= s < kv_lengths[b].
    q [B, T, N, H], k/v [B, S, K, H], kv_lengths [B] -> [B, T, N, H] in q's dtype."""
    kpos = jnp.arange(k.shape[1])[None, :]
    ok = kpos < jnp.asarray(kv_lengths)[:, None]  # [B, S]
    if kv_starts is not None:
        ok = ok & (kpos >= jnp.asarray(kv_starts)[:, None])
    return softmax_attention(q, k, v, ok[:, None, None, None, :], scale, exact=True)


def _decode_kernel(
    q_ref,  # [Mp, Hp]: the T*G query rows of one kv head (zero-padded)
    k_ref, v_ref,  # [Sp, Hp]: that kv head's whole cache (rows past S masked on load)
    start_ref, end_ref,  # [] int32: visible keys are [start, end)
    o_ref,  # [Mp, Hp] float32, unnormalised
    m_ref, l_ref,  # [Mp] float32: running max (log2 units) and sum
    *, scale, block_k, blocks_per_split, kv_len, head_dim,
):
    start, end = start_ref[...], end_ref[...]
    split_lo = pl.program_id(2) * blocks_per_split
    blk_lo = jnp.maximum(split_lo, lax.div(start, block_k))
    blk_hi = jnp.minimum(split_lo + blocks_per_split, lax.div(end + block_k - 1, block_k))
    q = q_ref[...]
    tail = kv_len if kv_len % block_k else None  # the last block reads past S

    def body(j, carry):
        acc, m_prev, l_prev = carry
        rows = pl.ds(j * block_k, block_k)
        k = load_rows(k_ref, rows, head_dim, tail)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * (scale * LOG2_E)  # [Mp, block_k]
        kpos = (j * block_k + jnp.arange(block_k, dtype=jnp.int32))[None, :]
        s = jnp.where((kpos >= start) & (kpos < end), s, NEG_INF)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        m_safe = jnp.where(m_next == NEG_INF, 0.0, m_next)
        correction = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        l_next = correction * l_prev + jnp.sum(p, axis=-1)
        v = load_rows(v_ref, rows, head_dim, tail)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return correction[:, None] * acc + pv, m_next, l_next

    rows_pad, head_pad = q_ref.shape
    init = (
        jnp.zeros((rows_pad, head_pad), jnp.float32),
        jnp.full((rows_pad,), NEG_INF, jnp.float32),
        jnp.zeros((rows_pad,), jnp.float32),
    )
    # An empty range (start >= end, or a chunk past the row's length) runs zero steps and
    # leaves (0, -inf, 0), which the combine step weighs by 0.
    acc, m, l = lax.fori_loop(blk_lo, jnp.maximum(blk_lo, blk_hi), body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _combine(o, m, l):
    """Merge J partials: o [..., J, M, H], m/l [..., J, M] (log2 units) -> [..., M, H]."""
    m_all = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp2(m - jnp.where(m_all == NEG_INF, 0.0, m_all))  # empty chunks: exp2(-inf) = 0
    total = jnp.sum(w * l, axis=-2)
    out = jnp.sum(w[..., None] * o, axis=-3)
    return out / jnp.where(total == 0.0, 1.0, total)[..., None]


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "num_splits", "interpret"))
def decode_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    kv_lengths: jax.Array,  # [B] int32: row b sees keys s < kv_lengths[b]
    *,
    kv_starts: jax.Array | None = None,  # [B] int32: ... and s >= kv_starts[b] (sliding window)
    scale: float | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, T, N, H]
    """Attention of a few queries against each row's filled part of the KV cache.
    Every one of the T queries sees the same key range (no causal order among them)."""
    check_qkv(q, k, v)
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    for name, x in (("kv_lengths", kv_lengths), ("kv_starts", kv_starts)):
        if x is not None and tuple(x.shape) != (batch,):
            raise InputError(f"decode_attention: {name} expected shape ({batch},), got {tuple(x.shape)}")
    groups = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    head_pad = max(MIN_TILE, pl.next_power_of_2(head_dim))
    if block_k is None:
        block_k = 128 if head_pad <= 128 else 64
    if block_k < MIN_TILE or block_k & (block_k - 1):
        raise InputError(f"decode_attention: {block_k=} must be a power of two >= {MIN_TILE}")
    block_k = min(block_k, max(MIN_TILE, pl.next_power_of_2(kv_len)))
    num_blocks = -(-kv_len // block_k)
    if num_splits is None:
        num_splits = -(-TARGET_PROGRAMS // (batch * num_kv_heads))
    if num_splits < 1:
        raise InputError(f"decode_attention: {num_splits=} must be >= 1")
    blocks_per_split = -(-num_blocks // min(num_splits, num_blocks))
    num_splits = -(-num_blocks // blocks_per_split)

    # Fold GQA into rows: [B, T, K, G, H] -> [B, K, T*G, H]. q is tiny in decode, so this
    # copy (and padding its rows to a tile) costs nothing next to streaming the cache.
    rows = q_len * groups
    rows_pad = max(MIN_TILE, pl.next_power_of_2(rows))
    qr = q.reshape(batch, q_len, num_kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
    qr = qr.reshape(batch, num_kv_heads, rows, head_dim)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows_pad - rows), (0, head_pad - head_dim)))

    end = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, kv_len)
    start = jnp.zeros_like(end) if kv_starts is None else jnp.clip(jnp.asarray(kv_starts, jnp.int32), 0, kv_len)

    cache_spec = pl.BlockSpec((None, num_blocks * block_k, None, head_pad), lambda b, h, j: (b, 0, h, 0))
    row_spec = pl.BlockSpec((None,), lambda b, h, j: (b,))
    part = lambda *tail: pl.BlockSpec((None, None, None, *tail), lambda b, h, j: (b, h, j) + (0,) * len(tail))
    part_shape = lambda *tail: jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, *tail), jnp.float32)
    kernel = functools.partial(
        _decode_kernel, scale=scale, block_k=block_k, blocks_per_split=blocks_per_split,
        kv_len=kv_len, head_dim=head_dim,
    )
    o, m, l = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, rows_pad, head_pad), lambda b, h, j: (b, h, 0, 0)),
            cache_spec, cache_spec, row_spec, row_spec,
        ],
        out_specs=[part(rows_pad, head_pad), part(rows_pad), part(rows_pad)],
        out_shape=[part_shape(rows_pad, head_pad), part_shape(rows_pad), part_shape(rows_pad)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="mmjax_decode_attention",
    )(qr, k, v, start, end)

    out = _combine(o, m, l)[:, :, :rows, :head_dim]  # [B, K, T*G, H]
    out = out.reshape(batch, num_kv_heads, q_len, groups, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(q.shape).astype(q.dtype)
