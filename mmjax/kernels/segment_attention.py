"""The XLA path for contiguous segments: each block of queries against its own key window.

Axis legend: B batch, T query length (= S, self-attention), S key length, N query heads,
K kv heads, H head dim; I query blocks, Q queries per block, W keys per window.

With `MaskSpec(contiguous_segments=True)` every query sees one key interval (mask.query_ranges),
no longer than the static bound L = `max_segment_length` (default S). Queries are cut into blocks
of Q; block i's intervals all lie inside a span of at most Q + 2(L - 1) keys (a run that ends in
the block starts at most L - 1 before it, one that starts in it ends at most L - 1 after it).
So each block takes a window of W = Q + 2(L - 1) keys (rounded up to 8, at most S) from the
smallest start among its queries, and the usual masked softmax (reference.softmax_attention, the
one core, with the intervals as the mask) runs over [I, Q, W] instead of [T, S]:

  cost    T * W logits per head instead of T * S: with Qwen2.5-VL's 64-patch windows (L = 64,
          Q = 32, W = 160) 2.5x the ideal T * L, against S / 64 x for the dense mask;
  memory  the logits of one step of blocks, and the K/V windows gathered for it.

When W reaches S (a full-attention block: L is the whole bucket) there is no saving in work: an
image that fills the bucket costs T * S, as it does in HF. What remains is memory: blocks run in
sequential steps of at most STEP_BYTES of logits and gathered K/V (lax.map), and a step whose
queries all see nothing (bucket padding) is skipped (lax.cond), so padding costs no work and no
step holds a [T, S] matrix. A problem that fits one step is computed in one go (dense when W = S:
the same program as before the segments were declared contiguous).

Numerics: the same products, scale, float32 masked softmax and casts as the dense XLA path,
over W keys instead of S (masked keys add exact zeros); equal to the reference within the
kernels' tolerances (tests/test_kernels.py).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from mmjax.kernels.mask import MaskSpec, make_mask, query_ranges
from mmjax.kernels.reference import softmax_attention

__all__ = ["STEP_BYTES", "block_plan", "segment_attention"]

STEP_BYTES = 64 * 2**20  # logits + probabilities + K/V windows of one sequential step


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def block_plan(batch: int, length: int, num_heads: int, kv_bytes: int, max_len: int | None):
    """(Q queries per block, W keys per window, blocks per step) for one self-attention of
    `length` tokens whose segments are at most `max_len` long. kv_bytes: K plus V bytes per key
    (2 * K * H * itemsize)."""
    L = length if max_len is None else min(max_len, length)
    # Blocks of about L/2 queries: W ~ 2.5 L for windows; 8..128 rows per block.
    q_block = min(128, max(8, _pow2_floor(L // 2)), max(8, _pow2_floor(length)))
    window = min(length, -(-(q_block + 2 * (L - 1)) // 8) * 8)
    per_block = batch * (num_heads * q_block * window * 4 * 2 + window * kv_bytes)  # f32 logits + probs, K/V
    return q_block, window, max(1, STEP_BYTES // per_block)


def segment_attention(q, k, v, mask: MaskSpec, scale: float | None = None):
    """q [B, T, N, H], k/v [B, T, K, H], mask with contiguous segments -> [B, T, N, H] in q's dtype."""
    B, T, N, H = q.shape
    K = k.shape[2]
    Q, W, per_step = block_plan(B, T, N, 2 * K * H * k.dtype.itemsize, mask.max_segment_length)
    blocks = -(-T // Q)
    if W >= T and blocks <= per_step:  # one window holds every key and it all fits: the dense path
        return softmax_attention(q, k, v, make_mask(mask, T, T)[:, :, None], scale)

    start, end = query_ranges(mask, B, T, T)  # [B, T]
    steps = -(-blocks // per_step)
    per_step = -(-blocks // steps)  # as even as the steps allow
    Tp = steps * per_step * Q
    pad = Tp - T
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    start = jnp.pad(start, ((0, 0), (0, pad)))  # padded queries: the empty interval [0, 0)
    end = jnp.pad(end, ((0, 0), (0, pad)))
    # Each block's window starts at its smallest non-empty interval start, pulled back so it ends by T.
    seen = start < end
    lo = jnp.min(jnp.where(seen, start, T).reshape(B, -1, Q), axis=-1)  # [B, I]
    k0 = jnp.clip(lo, 0, T - W)  # [B, I]

    def run(qs, st, en, k0):
        """One step: qs [B, J, Q, N, H], st/en [B, J, Q], k0 [B, J] -> [B, J, Q, N, H]."""
        J = k0.shape[1]
        keys = k0[..., None] + jnp.arange(W, dtype=jnp.int32)  # [B, J, W]
        gather = lambda x: jnp.take_along_axis(x[:, None], keys[..., None, None], axis=2)  # [B, J, W, K, H]
        kw, vw = gather(k), gather(v)
        ok = (keys[:, :, None, :] >= st[..., None]) & (keys[:, :, None, :] < en[..., None])  # [B, J, Q, W]
        fold = lambda x: x.reshape((B * J,) + x.shape[2:])
        out = softmax_attention(fold(qs), fold(kw), fold(vw), fold(ok)[:, None, None], scale)  # [B*J, Q, N, H]
        return out.reshape(B, J, Q, N, H)

    as_steps = lambda x: jnp.moveaxis(x.reshape((B, steps, per_step) + x.shape[2:]), 1, 0)  # [steps, B, J, ...]
    qs = as_steps(qp.reshape(B, -1, Q, N, H))
    st, en = as_steps(start.reshape(B, -1, Q)), as_steps(end.reshape(B, -1, Q))
    ks = as_steps(k0)
    if steps == 1:
        out = run(qs[0], st[0], en[0], ks[0])[None]
    else:
        def step(xs):
            qs, st, en, k0 = xs
            # all-padding steps (the bucket's tail) do no work
            return lax.cond(jnp.any(st < en), run, lambda *a: jnp.zeros(a[0].shape, q.dtype), qs, st, en, k0)

        out = lax.map(step, (qs, st, en, ks))  # [steps, B, J, Q, N, H]
    out = jnp.moveaxis(out, 0, 1).reshape(B, Tp, N, H)
    return out[:, :T]
