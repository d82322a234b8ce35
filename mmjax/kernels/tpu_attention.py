"""Attention on TPU through JAX's own Pallas TPU kernels, behind mmjax's MaskSpec.

Axis legend: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K, H head dim; Tp, Sp padded lengths.

  * `splash_attention` (prefill, encoders): jax.experimental.pallas.ops.tpu.splash_attention,
    one MQA kernel per (row, kv head) under vmap, so GQA never repeats K/V. The static part of
    the mask (causal, sliding window) is a splash mask object; key padding (`kv_lengths`, and
    the padding up to block multiples) and segment ids are splash SegmentIds.
  * `paged_decode` (one query token against the KV cache): ...ops.tpu.paged_attention, each
    row's contiguous cache [K, S, H] read as S / page pages of one sequence (a free reshape).

A query row that sees no key is 0 under MaskSpec: splash returns each row's log-sum-exp, which
is (about) its mask value for such a row; the paged kernel's rows see keys 0..end-1, empty only
when end is 0. Masks neither kernel can express (per-row prefix-LM bounds, per-row offsets of a
causal or windowed mask, a window in decode) run on XLA's ops: `splash_eligible`,
`paged_eligible`, docs/kernels.md ("TPU"). Neither kernel is differentiated here:
mmjax.kernels.attention gives every Pallas branch the XLA path's derivative. Both take no
scale: q is scaled first. Checked on CPU in TPU interpret mode (tests/test_tpu_attention.py);
lowered for TPU in tests/test_lowering.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from mmjax.kernels.mask import MaskSpec

__all__ = ["paged_decode", "paged_eligible", "splash_attention", "splash_eligible"]

LANES = 128  # TPU vector lanes: splash blocks and the paged kernel's head dim are multiples of it
MAX_BLOCK = 512
PAD_Q, PAD_KV = -1, -2  # segment ids of padding: distinct, so padding never attends to padding


def splash_eligible(q, k, mask: MaskSpec) -> bool:
    """Whether splash_attention computes `mask` exactly (every other mask runs on XLA): no
    prefix-LM (`prefix_lengths`, a per-row bound) and no `q_offset` where it matters (causal or
    windowed): splash's position masks are static, the same for every row."""
    if mask.causal and mask.prefix_lengths is not None:
        return False
    return mask.q_offset is None or not (mask.causal or mask.sliding_window is not None)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(length: int) -> int:
    return MAX_BLOCK if length > MAX_BLOCK else _round_up(length, LANES)


def _kernel(groups: int, q_pad: int, kv_pad: int, block_q: int, block_kv: int, causal: bool,
            window: int | None, interpret: bool):
    """The splash MQA kernel for one mask. Built inside each trace: it holds the processed mask
    as arrays, which a trace must create itself (arrays kept from an earlier trace would be
    closed-over constants, which jax.export refuses); the costly host-side processing (seconds
    at 32k tokens) is cached by splash itself, per mask and block shape."""
    shape = (q_pad, kv_pad)
    if window is not None:  # |pos - s| < window, and s <= pos when causal
        base = splash_mask.LocalMask(shape, (window - 1, 0 if causal else window - 1), offset=0)
    else:
        base = splash_mask.CausalMask(shape) if causal else splash_mask.FullMask(shape)
    # Forward blocks only: jax.grad through attention() takes the XLA path's derivative.
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv)
    return splash.make_splash_mqa(splash_mask.MultiHeadMask([base] * groups), block_sizes=sizes, save_residuals=True,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, mask: MaskSpec, scale: float | None = None, *, interpret: bool = False):
    """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H]; `mask` must pass splash_eligible."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    block_q, block_kv = _block(q_len), _block(kv_len)
    q_pad, kv_pad = _round_up(q_len, block_q), _round_up(kv_len, block_kv)
    window = None if mask.sliding_window is None else min(mask.sliding_window, q_pad + kv_pad)
    kernel = _kernel(groups, q_pad, kv_pad, block_q, block_kv, mask.causal, window, interpret)

    # Segment ids carry everything per row: MaskSpec's segments (negative: padding), key padding
    # (kv_lengths) and the padding up to block multiples, which get ids that match nothing.
    q_seg, kv_seg = mask.segments()
    q_seg = jnp.zeros((batch, q_len), jnp.int32) if q_seg is None else jnp.asarray(q_seg, jnp.int32)
    kv_seg = jnp.zeros((batch, kv_len), jnp.int32) if kv_seg is None else jnp.asarray(kv_seg, jnp.int32)
    q_seg, kv_seg = jnp.where(q_seg < 0, PAD_Q, q_seg), jnp.where(kv_seg < 0, PAD_KV, kv_seg)
    if mask.kv_lengths is not None:
        kpos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
        kv_seg = jnp.where(kpos < jnp.asarray(mask.kv_lengths, jnp.int32)[:, None], kv_seg, PAD_KV)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, q_pad - q_len)), constant_values=PAD_Q)  # [B, Tp]
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, kv_pad - kv_len)), constant_values=PAD_KV)  # [B, Sp]

    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    qh = pad(qs, q_pad).reshape(batch, q_pad, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tp, H]
    kh, vh = (pad(x, kv_pad).transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, Sp, H]

    def row(qb, kb, vb, qsb, kvsb):  # one batch row, vmapped over kv heads
        ids = splash.SegmentIds(q=qsb, kv=kvsb)
        return jax.vmap(lambda qk, kk, vk: kernel(qk, kk, vk, segment_ids=ids))(qb, kb, vb)

    out, (lse,) = jax.vmap(row)(qh, kh, vh, q_seg, kv_seg)  # [B, K, G, Tp, H], [B, K, G, Tp]
    # A row that sees no key has log-sum-exp about the mask value (or -inf where splash skipped
    # all its blocks); MaskSpec makes its output 0.
    out = jnp.where((lse > 0.5 * splash.DEFAULT_MASK_VALUE)[..., None], out, 0)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_pad, num_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)


def paged_eligible(q, k_cache, mask: MaskSpec) -> bool:
    """Whether paged_decode computes `mask` for q [B, 1, N, H] against a [B, K, S, H] cache: one
    query, no window (the kernel reads keys from 0), no segment ids, head dim a multiple of 128
    and S a multiple of 8 (the kernel's tile constraints)."""
    return (q.shape[1] == 1 and mask.sliding_window is None and mask.q_segment_ids is None
            and q.shape[3] % LANES == 0 and k_cache.shape[2] % 8 == 0)


def paged_decode(q, k, v, end, scale: float | None = None):
    """q [B, 1, N, H], k/v [B, K, S, H] (the cache), end [B] int32 (keys s < end[b] visible)
    -> [B, 1, N, H]. The cache is paged as it lies: row b's [K, S, H] is [K, S/page, page, H]."""
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    page = max(p for p in (128, 64, 32, 16, 8) if kv_len % p == 0)
    pages = kv_len // page
    per_block = max(d for d in range(1, 17) if pages % d == 0)
    table = jnp.arange(pages, dtype=jnp.int32)[None]  # [1, P]
    qs = (q[:, 0].astype(jnp.float32) * scale).astype(q.dtype)  # [B, N, H]

    def row(qb, kb, vb, n):
        as_pages = lambda x: x.reshape(num_kv_heads, pages, page, head_dim)
        return paged_attention(qb[None], as_pages(kb), as_pages(vb), n[None], table,
                               pages_per_compute_block=per_block)[0]

    end = jnp.clip(jnp.asarray(end, jnp.int32), 0, kv_len)
    out = jax.vmap(row)(qs, k, v, end)  # [B, N, H]
    out = jnp.where((end > 0)[:, None, None], out, 0)  # an empty cache row: 0
    return out[:, None].astype(q.dtype)
