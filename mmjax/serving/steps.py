"""The serving engine's jitted steps over the paged KV cache: encode, prefill, decode.

Axis legend: B rows (a batch bucket), T prompt tokens (a prompt bucket), V vocab, E stop-id
slots, L pages per row (a page bucket), K kv heads, P pages, Z page size, H head dim.

pools: one {"k", "v": [K, P, Z, H]} per decoder layer (int8 pools: + "k_scale", "v_scale" [K, P, Z]), donated to prefill and decode (updated in
place). Each row carries its own sampling arguments (RowArgs), so a batch mixes requests freely;
a row samples exactly as mmjax.generate samples that request alone (same key, same step index).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mmjax.generation.engine import PROMPT_COMPILER_OPTIONS
from mmjax.generation.sampling import select_token
from mmjax.kernels.attention import MaskSpec
from mmjax.kernels.paged_attention import write_pages
from mmjax.layers.attention import store_kv

__all__ = ["PagedSteps", "RowArgs"]


@flax.struct.dataclass
class RowArgs:
    """Per-row sampling arguments of one step (all traced)."""
    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    key: jax.Array  # [B, 2] uint32: jax.random.PRNGKey(seed) of the request
    step: jax.Array  # [B] int32: tokens the request has generated so far
    stop_ids: jax.Array  # [B, E] int32, -1 = unused
    min_new_tokens: jax.Array  # [B] int32


@flax.struct.dataclass
class _Scalars:  # select_token's view of one row's arguments
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def select_rows(logits, rows: RowArgs, greedy: bool):
    """logits [B, V] -> tokens [B]; each row as mmjax.generate's step picks for it alone."""
    B, V = logits.shape
    stop = rows.stop_ids
    hits = jnp.zeros((B, V), jnp.int32).at[jnp.arange(B)[:, None], jnp.maximum(stop, 0)].max(
        (stop >= 0).astype(jnp.int32))  # max: an unused slot (-1 -> token 0) never clears a real stop
    is_stop = hits > 0
    logits = jnp.where((rows.step < rows.min_new_tokens)[:, None] & is_stop, -jnp.inf, logits)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best

    def one(lg, key, step, t, k, p):
        args = _Scalars(jnp.maximum(t, 1e-6), k, p)
        return select_token(lg[None], jax.random.fold_in(key, step), args, False)[0]

    sampled = jax.vmap(one)(logits, rows.key, rows.step, rows.temperature, rows.top_k, rows.top_p)
    return jnp.where(rows.temperature == 0, best, sampled)


class PagedSteps:
    """The jitted programs of one module (one compile per bucket tuple; count them with
    `compiled()`)."""

    def __init__(self, module, pool_shardings=None):
        """pool_shardings: with a mesh, each layer's pool sharding, pinned on every step's output
        so the donated pools keep one layout."""
        self.module = module
        self.pool_shardings = pool_shardings
        # the prompt programs compile as mmjax.generate's do (PROMPT_COMPILER_OPTIONS: less compile RSS)
        self.encode = jax.jit(self._encode, compiler_options=PROMPT_COMPILER_OPTIONS)
        self.prefill = jax.jit(self._prefill, donate_argnums=(1,), static_argnames=("greedy",),
                               compiler_options=PROMPT_COMPILER_OPTIONS)
        self.decode = jax.jit(self._decode, donate_argnums=(1,), static_argnames=("greedy",))

    def compiled(self) -> dict[str, int]:
        return {n: getattr(self, n)._cache_size() for n in ("encode", "prefill", "decode")}

    def _encode(self, params, vision_batch):
        return self.module.apply({"params": params}, vision_batch, method="image_features")

    def _prefill(self, params, pools, batch, lengths, slots, rows: RowArgs, *, greedy: bool):
        """batch: one bucketed prompt ([B, T] ids, images or image_features); slots [B, T] where
        each token's keys go (null slot for padding). -> (pools, first tokens [B], pos_offset [B])."""
        def run(mod):
            x, positions, pos_offset = mod.embed(batch)
            h, kv = mod.decode(x, positions, MaskSpec(causal=True, kv_lengths=lengths))
            last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
            return mod.logits(last)[:, 0], kv, pos_offset

        logits, kv, pos_offset = self.module.apply({"params": params}, method=run)
        kernels = self.module.cfg.decoder.kernels  # the decoder's policy decides how its pools are written
        pools = [store_kv(p, c["k"], c["v"], lambda buf, new: write_pages(buf, new, slots, kernels))
                 for p, c in zip(pools, kv)]
        return self._pin(pools), select_rows(logits, rows, greedy), pos_offset.astype(jnp.int32)

    def _decode(self, params, pools, last, index, pos_offset, slots, block_tables, rows: RowArgs, *, greedy: bool):
        """One token per row: last [B] at cache slot index [B] (its keys go to slots [B]); rows
        see keys 0..index through block_tables [B, L]. -> (pools, next tokens [B])."""
        mask = MaskSpec(causal=True, kv_lengths=index + 1, q_offset=index)
        cache = [{**p, "slots": slots[:, None], "block_tables": block_tables} for p in pools]

        def run(mod):
            x = mod.embed_tokens(last[:, None])
            h, new = mod.decode(x, (index + pos_offset)[:, None], mask, cache, index)
            return mod.logits(h)[:, 0], new

        logits, new = self.module.apply({"params": params}, method=run)
        pools = [{n: a for n, a in c.items() if n not in ("slots", "block_tables")} for c in new]
        return self._pin(pools), select_rows(logits, rows, greedy)

    def _pin(self, pools):
        if self.pool_shardings is None:
            return pools
        return [{n: jax.lax.with_sharding_constraint(a, s[n]) for n, a in p.items()}
                for p, s in zip(pools, self.pool_shardings)]
