"""Prefill and decode as pure jitted functions over a preallocated KV cache.

State (a plain pytree, donated to every step so the cache is updated in place):
  cache      list of per-layer {"k","v": [B, K, S, H]}
  last       [B]     token fed to the next step
  index      [B]     cache slot of that token (= prompt length + tokens so far)
  pos_offset [B]     rope position = cache index + pos_offset (M-RoPE's rope delta)
  tokens     [B, M]  generated tokens (M = new-token bucket)
  done       [B]     row finished (stop token or max_new_tokens)
  step       []      tokens generated so far
Rows are right-padded: each row's prompt sits at cache slots 0..len-1, so a row in a batch
sees exactly the positions and keys it would see alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.generation.sampling import select_token
from mmjax.kernels.attention import MaskSpec

__all__ = ["Engine"]


def _gather_last(h, lengths):  # h [B, T, D], lengths [B] -> [B, 1, D]
    return jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)


class Engine:
    """Holds the jitted prefill / decode_step of one module (one compile per shape bucket)."""

    def __init__(self, module, state_sharding=None):
        """state_sharding: None on one device; with a mesh, state -> matching tree of shardings
        (mmjax.sharding.state_shardings), pinned on every step's output so the donated state
        keeps one layout from step to step and the partitioner never gathers the cache."""
        self.module = module
        self.state_sharding = state_sharding
        # With a mesh the module's KernelPolicy has no CPU custom calls (a custom call has no
        # sharding rule): mmjax.load builds it with KernelPolicy.without_cpu_custom_calls.
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len", "max_new", "greedy"))
        self.decode_step = jax.jit(self._decode_step, static_argnames=("greedy",), donate_argnums=(1,))
        self.forward = jax.jit(self._forward)

    # --- pure functions ---------------------------------------------------------------------
    def _forward(self, params, batch):
        return self.module.apply({"params": params}, batch)

    def _prefill(self, params, batch, lengths, sp, stop_ids, min_new, max_new_tokens, key, *,
                 cache_len, max_new, greedy):
        m = self.module

        def run(mod):
            x, positions, pos_offset = mod.embed(batch)
            h, kv = mod.decode(x, positions, MaskSpec(causal=True, kv_lengths=lengths))
            return mod.logits(_gather_last(h, lengths))[:, 0], kv, pos_offset

        logits, kv, pos_offset = m.apply({"params": params}, method=run)
        B, T = batch["input_ids"].shape
        # prefill's keys come as [B, T, K, H]; the cache is [B, K, S, H] (mmjax.layers.attention)
        pad = ((0, 0), (0, 0), (0, cache_len - T), (0, 0))
        cache = [{n: jnp.pad(c[n].swapaxes(1, 2), pad) for n in ("k", "v")} for c in kv]
        state = {
            "cache": cache,
            "last": jnp.zeros((B,), jnp.int32),
            "index": lengths.astype(jnp.int32),
            "pos_offset": pos_offset.astype(jnp.int32),
            "tokens": jnp.zeros((B, max_new), jnp.int32),
            "done": jnp.zeros((B,), bool),
            "step": jnp.int32(0),
        }
        return self._pin(self._emit(state, logits, sp, stop_ids, min_new, max_new_tokens, key, greedy))

    def _decode_step(self, params, state, sp, stop_ids, min_new, max_new_tokens, key, *, greedy):
        index = state["index"]
        mask = MaskSpec(causal=True, kv_lengths=index + 1, q_offset=index)

        def run(mod):
            x = mod.embed_tokens(state["last"][:, None])
            positions = (index + state["pos_offset"])[:, None]
            h, cache = mod.decode(x, positions, mask, state["cache"], index)
            return mod.logits(h)[:, 0], cache

        logits, cache = self.module.apply({"params": params}, method=run)
        state = {**state, "cache": cache, "index": index + 1}
        return self._pin(self._emit(state, logits, sp, stop_ids, min_new, max_new_tokens, key, greedy))

    def _pin(self, state):
        if self.state_sharding is None:
            return state
        return jax.lax.with_sharding_constraint(state, self.state_sharding(state))

    @staticmethod
    def _emit(state, logits, sp, stop_ids, min_new, max_new_tokens, key, greedy):
        """Pick this step's token, record it, update done. stop_ids [E] (-1 = unused slot)."""
        step = state["step"]
        is_stop = jnp.zeros(logits.shape[-1], bool).at[jnp.maximum(stop_ids, 0)].set(stop_ids >= 0)
        # min_new_tokens: stop tokens are not eligible yet (HF MinNewTokensLengthLogitsProcessor)
        logits = jnp.where((step < min_new) & is_stop[None, :], -jnp.inf, logits)
        tok = select_token(logits, jax.random.fold_in(key, step), sp, greedy)
        tok = jnp.where(state["done"], 0, tok)
        tokens = jax.lax.dynamic_update_slice(state["tokens"], tok[:, None], (0, step))
        done = state["done"] | is_stop[tok] | (step + 1 >= max_new_tokens)
        return {**state, "last": tok, "tokens": tokens, "done": done, "step": step + 1}
