"""Multi-head / grouped-query self-attention with an optional KV cache.

Axis legend: B batch, T query tokens, S key/value tokens (cache length), D model dim,
N query heads, K kv heads, H head dim. Projection kernels are stored per head
(q: [D, N, H], o: [N, H, D]) so converter rules and sharding rules can name heads.

The kernel itself is chosen in exactly one place: mmjax.kernels.attention.attention.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.kernels.attention import MaskSpec, attention
from mmjax.kernels import kv_cache
from mmjax.kernels.cpu import write_rows as cpu_write_rows
from mmjax.kernels.paged_attention import paged_attention, write_pages
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers import fusion
from mmjax.layers.linear import Einsum
from mmjax.layers.rope import apply_rope

__all__ = ["Attention", "store_kv", "write_cache"]


def write_cache(cache, new, index, kernels: KernelPolicy = KernelPolicy()):
    """cache [B, K, S, H] <- new [B, T, K, H] at per-row offsets index [B] (in place when donated);
    also an int8 cache's scales, cache [B, K, S] <- new [B, T, K].

    The cache keeps S next to H ("BKSH") so that decode attention contracts it without a
    transpose: with [B, S, K, H], XLA on CPU copied every layer's whole cache every step.
    On CPU (when `kernels` lets the CPU kernels run) mmjax.kernels.cpu.write_rows writes the rows
    in place: XLA:CPU widens a bfloat16 write to float32, converting the whole cache. Elsewhere one
    row (the latency case) is a plain dynamic_update_slice, done in place; several rows are
    vmap(dynamic_update_slice), a scatter that the SPMD partitioner splits over `data` (a loop
    over rows made it all-gather the cache)."""
    scales = cache.ndim == 3
    upd = new.swapaxes(1, 2).astype(cache.dtype)  # [B, K, T(, H)]

    def xla(cache, upd, index):
        if scales:
            return xla4(cache[..., None], upd[..., None], index)[..., 0]
        return xla4(cache, upd, index)

    def xla4(cache, upd, index):
        if cache.shape[0] == 1:
            return jax.lax.dynamic_update_slice(cache, upd, (0, 0, index[0], 0))

        def one(c, n, i):  # c [K, S, H], n [K, T, H]
            return jax.lax.dynamic_update_slice(c, n, (0, i, 0))

        return jax.vmap(one)(cache, upd, index)

    def rows(cache, upd, index):  # the same write as rows of cache.reshape(B*K*S, H)
        B, K, S = cache.shape[:3]
        T = upd.shape[2]
        start = jnp.clip(index.astype(jnp.int32), 0, S - T)  # dynamic_update_slice's clamping
        r = (jnp.arange(B * K, dtype=jnp.int32).reshape(B, K, 1) * S + start[:, None, None]
             + jnp.arange(T, dtype=jnp.int32))
        return cpu_write_rows.write_rows(cache, upd.reshape(B * K * T, -1), r.reshape(-1))

    return cpu_write_rows.dispatch_rows(kernels, rows, xla, cache, upd, index)


def store_kv(cache, k, v, write):
    """The cache layer with this call's k/v [B, T, K, H] written by write(buffer, new) (int8:
    quantized, the scales [.., S] written by the same write)."""
    if not kv_cache.is_quantized(cache):
        return {**cache, "k": write(cache["k"], k), "v": write(cache["v"], v)}
    (kq, ks), (vq, vs) = kv_cache.quantize(k), kv_cache.quantize(v)
    return {**cache, "k": write(cache["k"], kq), "v": write(cache["v"], vq),
            "k_scale": write(cache["k_scale"], ks), "v_scale": write(cache["v_scale"], vs)}


class Attention(nn.Module):
    hidden_size: int  # D
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    qkv_bias: bool = False
    o_bias: bool = False
    kernels: KernelPolicy = KernelPolicy()
    dtype: jnp.dtype = jnp.float32
    # Separate layouts: fused qkv checkpoints are split by the converter, not here; mmjax.load
    # fuses them again where one product is cheaper than three (mmjax.layers.fusion).
    FUSIONS = (("qkv", ("q", "k", "v")),)

    @nn.compact
    def __call__(self, x, mask: MaskSpec, rope=None, cache=None, write_index=None):
        """x [B, T, D]; rope = (cos, sin) [B, T, R] or None; cache = {"k","v": [B, K, S, H]} or None.

        Without a cache, attends over this call's own T keys and returns (y, {"k","v"}: [B, T, K, H]).
        With one, writes this call's keys at write_index [B] and attends over the cache.
        An int8 cache (mmjax.kernels.kv_cache) has "k_scale"/"v_scale" [B, K, S] beside; its
        writes quantize this call's keys per token and head.
        A paged cache (the serving engine's: {"k","v": pages [K, P, Z, H], "slots": [B, T],
        "block_tables": [B, L]}, mmjax.kernels.paged_attention) takes one decode token per row:
        its keys go to `slots`, and it attends to keys 0..mask.kv_lengths[b]-1 through the table.
        """
        D, N, K, H = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(kernels=self.kernels)
        if self.has_variable("params", "qkv"):  # fused at load
            q, k, v = fusion.project(x, "qkv", ((N, H), (K, H), (K, H)), self.qkv_bias, self.dtype, self.kernels)
        else:
            q = Einsum((D, N, H), "BTD,DNH->BTNH", (N, H) if self.qkv_bias else None, self.dtype, name="q", **kw)(x)
            k = Einsum((D, K, H), "BTD,DKH->BTKH", (K, H) if self.qkv_bias else None, self.dtype, name="k", **kw)(x)
            v = Einsum((D, K, H), "BTD,DKH->BTKH", (K, H) if self.qkv_bias else None, self.dtype, name="v", **kw)(x)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and "block_tables" in cache:
            new_cache = store_kv(cache, k, v, lambda buf, new: write_pages(buf, new, cache["slots"], self.kernels))
            out = paged_attention(q, new_cache["k"], new_cache["v"], cache["block_tables"], mask.kv_lengths,
                                  kernels=self.kernels, k_scales=new_cache.get("k_scale"),
                                  v_scales=new_cache.get("v_scale"))
        elif cache is None:
            new_cache = {"k": k, "v": v}
            out = attention(q, k, v, mask, kernels=self.kernels)  # [B, T, N, H]
        else:
            new_cache = store_kv(cache, k, v, lambda buf, new: write_cache(buf, new, write_index, self.kernels))
            out = attention(q, new_cache["k"], new_cache["v"], mask, kernels=self.kernels, kv_layout="BKSH",
                            k_scale=new_cache.get("k_scale"), v_scale=new_cache.get("v_scale"))
        y = Einsum((N, H, D), "BTNH,NHD->BTD", (D,) if self.o_bias else None, self.dtype, name="o",
                   flatten_contraction=True, **kw)(out)
        return y, new_cache
