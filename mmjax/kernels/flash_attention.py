"""Flash attention (prefill / encoder) as a Pallas kernel, with its pure-jnp reference.

Axis legend: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.

Layouts are fixed: q [B, T, N, H], k and v [B, S, K, H], output [B, T, N, H] in q's dtype.
GQA is done by the kv BlockSpec's index map (query head n reads kv head n // G), so the
repeated K/V is never materialised. Softmax runs in float32 with the online (streaming)
formulation of FlashAttention-2 (arXiv 2307.08691, Alg. 1): one program per
(query block, batch row, query head) loops over key blocks, keeping a running max `m`,
running sum `l` and an unnormalised accumulator.

The kernel is written against the Triton lowering of `pl.pallas_call` (the tile sizes it
loads are powers of two >= 16, the head dim is padded through the BlockSpec and masked on
load, never copied) and runs anywhere with `interpret=True`, which is how the tests run it
on CPU. Which keys a query sees is a MaskSpec (mmjax/kernels/mask.py); the kernel body reads
it through the same `visible` predicate as the reference.

Contiguous segments (packed images, windows: `MaskSpec.contiguous_segments`) give each query
one key interval (mask.query_ranges); the wrapper reduces them to one key range per query block
(min start, max end) and the kernel's loop runs over the key blocks of that range only, so keys
of other segments and padding are never loaded: cost ~ Σ segment², not T x S.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmjax.errors import InputError
from mmjax.kernels.mask import NEG_INF, MaskSpec, make_mask, query_ranges, visible
from mmjax.kernels.reference import softmax_attention

# exp(x) = exp2(x * log2(e)): exp2 is the cheaper instruction on GPUs.
LOG2_E = math.log2(math.e)
MIN_TILE = 16  # smallest tile Triton's tl.dot accepts on each side


def check_qkv(q, k, v) -> None:
    """Raises InputError naming the array/dimension that breaks the fixed layouts."""
    if q.ndim != 4:
        raise InputError(f"q: expected [B, T, N, H], got shape {q.shape}")
    if k.ndim != 4 or k.shape != v.shape:
        raise InputError(f"k, v: expected equal [B, S, K, H] shapes, got {k.shape=} {v.shape=}")
    batch, _, num_heads, head_dim = q.shape
    if k.shape[0] != batch:
        raise InputError(f"k: batch {k.shape[0]} does not match q's {batch=}")
    if k.shape[3] != head_dim:
        raise InputError(f"{head_dim=} of q does not match k/v head dim {k.shape[3]}")
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
        raise InputError(f"{num_heads=} must be a multiple of {num_kv_heads=} (GQA)")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share a dtype, got {q.dtype=} {k.dtype=} {v.dtype=}")


# ----------------------------------------------------------------------------- reference


@functools.partial(jax.jit, static_argnames=("scale",))
def attention_reference(q, k, v, mask: MaskSpec, scale: float | None = None):
    """Plain jnp attention in float32 throughout: the truth the kernels are tested against.
    q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H] in q's dtype."""
    ok = make_mask(mask, q.shape[1], k.shape[1])[:, :, None]  # [B|1, 1, 1, T, S]
    return softmax_attention(q, k, v, ok, scale, exact=True)


# ----------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: block_q query rows per program, block_k keys per inner-loop step.
    Powers of two >= 16 (Triton tiles). Both are clamped down for short sequences."""

    block_q: int = 128
    block_k: int = 64

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            b = getattr(self, name)
            if b < MIN_TILE or b & (b - 1):
                raise InputError(f"BlockSizes: {name}={b} must be a power of two >= {MIN_TILE}")

    @classmethod
    def default(cls, head_dim: int) -> "BlockSizes":
        # Wide heads (Gemma's 256) would not fit two 128-row K/V stages in shared memory.
        if pl.next_power_of_2(head_dim) > 128:
            return cls(block_q=64, block_k=32)
        return cls(block_q=128, block_k=64)


def load_rows(ref, rows, head_dim: int, num_valid_rows: int | None = None):
    """ref[rows, :] where the ref's last dim may be padded past `head_dim` (and its rows
    past `num_valid_rows`): padded entries read as 0. Plain indexing when nothing is padded."""
    view = ref.at[rows, :]
    padded_h = ref.shape[-1] != head_dim
    if not padded_h and num_valid_rows is None:
        return view[...]
    block_rows, width = view.shape
    col_ok = (jnp.arange(width) < head_dim)[None, :] if padded_h else None  # [1, Hp]
    row_ok = None
    if num_valid_rows is not None:
        row_ok = ((rows.start + jnp.arange(block_rows)) < num_valid_rows)[:, None]  # [rows, 1]
    ok = col_ok if row_ok is None else row_ok if col_ok is None else row_ok & col_ok
    return plgpu.load(view, mask=ok, other=0.0)


def store_full(ref, value, head_dim: int):
    """ref[...] = value, skipping the head-dim columns past `head_dim`."""
    if ref.shape[-1] == head_dim:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=(jnp.arange(ref.shape[-1]) < head_dim)[None, :])


def _dot_t(a, b):
    """a [M, H] . b [N, H]^T -> [M, N] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _flash_kernel(
    q_ref, k_ref, v_ref,  # [block_q, Hp], [Sp, Hp], [Sp, Hp]
    q_off_ref, kv_len_ref, prefix_ref,  # [] int32 each, or None
    q_seg_ref, kv_seg_ref,  # [block_q], [Sp] int32, or None
    key_lo_ref, key_hi_ref,  # [] int32 each, or None: the keys this query block's intervals reach
    o_ref,  # [block_q, Hp]
    *, scale, causal, window, block_q, block_k, head_dim,
):
    kv_pad = k_ref.shape[0]
    q_start = pl.program_id(0) * block_q
    q = load_rows(q_ref, pl.ds(0, block_q), head_dim)
    q_off = 0 if q_off_ref is None else q_off_ref[...]
    kv_len = None if kv_len_ref is None else kv_len_ref[...]
    prefix = None if prefix_ref is None else prefix_ref[...]
    pos_lo = q_start + q_off
    pos = (pos_lo + jnp.arange(block_q, dtype=jnp.int32))[:, None]  # [block_q, 1]
    q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]

    # Key range [lo, hi) that can be visible to any row of this block: whole key blocks
    # outside it are skipped (causal upper triangle, sliding-window tail, cache padding).
    pos_hi = pos_lo + block_q  # exclusive
    hi = kv_pad if kv_len is None else jnp.minimum(kv_len, kv_pad)
    lo = 0
    if causal:
        reach = pos_hi if prefix is None else jnp.maximum(pos_hi, prefix)
        hi = jnp.minimum(hi, reach)
    elif window is not None:
        hi = jnp.minimum(hi, pos_hi - 1 + window)
    if window is not None:
        lo = jnp.maximum(pos_lo - window + 1, 0)
        if causal and prefix is not None:
            lo = jnp.where(pos_lo < prefix, 0, lo)
    if key_lo_ref is not None:  # contiguous segments: only the block's own segments' keys
        lo = jnp.maximum(lo, key_lo_ref[...])
        hi = jnp.minimum(hi, key_hi_ref[...])
    blk_lo = lax.div(lo, block_k) if not isinstance(lo, int) else 0
    blk_hi = lax.div(jnp.maximum(hi, 0) + block_k - 1, block_k) if not isinstance(hi, int) else hi // block_k
    if not isinstance(lo, int):
        blk_hi = jnp.maximum(blk_hi, blk_lo)  # an empty range: no iteration

    def body(j, carry):
        acc, m_prev, l_prev = carry
        rows = pl.ds(j * block_k, block_k)
        k = load_rows(k_ref, rows, head_dim)
        s = _dot_t(q, k) * (scale * LOG2_E)  # [block_q, block_k], log2 units
        kpos = (j * block_k + jnp.arange(block_k, dtype=jnp.int32))[None, :]
        ok = visible(
            pos, kpos, causal=causal, window=window, kv_len=kv_len, prefix=prefix,
            q_seg=q_seg, kv_seg=None if kv_seg_ref is None else kv_seg_ref[rows][None, :],
        )
        if ok is not None:
            s = jnp.where(ok, s, NEG_INF)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = jnp.where(m_next == NEG_INF, 0.0, m_next)
        correction = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        l_next = correction * l_prev + jnp.sum(p, axis=-1)
        v = load_rows(v_ref, rows, head_dim)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return correction[:, None] * acc + pv, m_next, l_next

    init = (
        jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32),
        jnp.full((block_q,), NEG_INF, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, l = lax.fori_loop(blk_lo, blk_hi, body, init)
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]  # fully masked rows: 0 / 1 = 0
    store_full(o_ref, out.astype(o_ref.dtype), head_dim)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tile(block: int, length: int) -> int:
    """The block size actually used: no bigger than the (power-of-two padded) length."""
    return min(block, max(MIN_TILE, pl.next_power_of_2(length)))


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def flash_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    mask: MaskSpec,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, T, N, H]
    """Fused attention; any T and S (padded internally up to block multiples)."""
    check_qkv(q, k, v)
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    mask.check(batch, q_len, kv_len)
    groups = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    sizes = BlockSizes.default(head_dim) if block_sizes is None else block_sizes
    block_q, block_k = _tile(sizes.block_q, q_len), _tile(sizes.block_k, kv_len)
    q_pad, kv_pad = _round_up(q_len, block_q), _round_up(kv_len, block_k)
    head_pad = max(MIN_TILE, pl.next_power_of_2(head_dim))

    if q_pad != q_len:
        q = jnp.pad(q, ((0, 0), (0, q_pad - q_len), (0, 0), (0, 0)))
    if kv_pad != kv_len:
        k = jnp.pad(k, ((0, 0), (0, kv_pad - kv_len), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, kv_pad - kv_len), (0, 0), (0, 0)))

    as_rows = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    uses_pos = mask.causal or mask.sliding_window is not None
    q_off = as_rows(mask.q_offset) if uses_pos else None
    kv_lengths = as_rows(mask.kv_lengths)
    if kv_lengths is None and kv_pad != kv_len:
        kv_lengths = jnp.full((batch,), kv_len, jnp.int32)  # hide the padded keys
    if kv_lengths is not None:
        kv_lengths = jnp.minimum(kv_lengths, kv_len)
    prefix = as_rows(mask.prefix_lengths) if mask.causal else None
    q_seg, kv_seg = mask.segments()
    key_lo = key_hi = None
    if mask.contiguous_segments:  # each query block's key range: [min start, max end) of its intervals
        start, end = query_ranges(mask, batch, q_len, kv_len)
        pad_q = lambda x: jnp.pad(x, ((0, 0), (0, q_pad - q_len))).reshape(batch, -1, block_q)
        start, end = pad_q(start), pad_q(end)  # padded queries: [0, 0), seen as empty below
        seen = start < end
        key_lo = jnp.min(jnp.where(seen, start, kv_pad), axis=-1)  # [B, T / block_q]
        key_hi = jnp.max(jnp.where(seen, end, 0), axis=-1)
    if q_seg is not None:  # padded positions get segment -1 (= padding)
        q_seg = jnp.pad(as_rows(q_seg), ((0, 0), (0, q_pad - q_len)), constant_values=-1)
        kv_seg = jnp.pad(as_rows(kv_seg), ((0, 0), (0, kv_pad - kv_len)), constant_values=-1)

    kv_head = lambda n: lax.div(n, jnp.array(groups, n.dtype))
    row_spec = pl.BlockSpec((None,), lambda i, b, n: (b,))
    spec_if = lambda x, spec: None if x is None else spec
    in_specs = [
        pl.BlockSpec((None, block_q, None, head_pad), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, kv_pad, None, head_pad), lambda i, b, n: (b, 0, kv_head(n), 0)),
        pl.BlockSpec((None, kv_pad, None, head_pad), lambda i, b, n: (b, 0, kv_head(n), 0)),
        spec_if(q_off, row_spec),
        spec_if(kv_lengths, row_spec),
        spec_if(prefix, row_spec),
        spec_if(q_seg, pl.BlockSpec((None, block_q), lambda i, b, n: (b, i))),
        spec_if(kv_seg, pl.BlockSpec((None, kv_pad), lambda i, b, n: (b, 0))),
        spec_if(key_lo, pl.BlockSpec((None, None), lambda i, b, n: (b, i))),
        spec_if(key_hi, pl.BlockSpec((None, None), lambda i, b, n: (b, i))),
    ]
    kernel = functools.partial(
        _flash_kernel, scale=scale, causal=mask.causal, window=mask.sliding_window,
        block_q=block_q, block_k=block_k, head_dim=head_dim,
    )
    out = pl.pallas_call(
        kernel,
        grid=(q_pad // block_q, batch, num_heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_q, None, head_pad), lambda i, b, n: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4 if head_pad <= 64 else 8, num_stages=2),
        interpret=interpret,
        name="mmjax_flash_attention",
    )(q, k, v, q_off, kv_lengths, prefix, q_seg, kv_seg, key_lo, key_hi)
    return out[:, :q_len]
