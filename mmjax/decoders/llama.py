"""Llama-style decoder (also Qwen2 with qkv_bias, and M-RoPE when mrope_section is set).

Axis legend: B batch, T tokens, S cache length, D model dim, F MLP hidden, V vocab,
N query heads, K kv heads, H head dim.

Param tree: embed/embedding [V, D]; layers_{i}/{input_norm, attn/{q,k,v,o}, post_norm,
mlp/{gate,up,down}}; final_norm/scale [D]; lm_head/kernel [D, V] (absent when tied).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import LlamaConfig
from mmjax.kernels.attention import MaskSpec
from mmjax.layers.attention import Attention
from mmjax.layers.linear import Einsum, Embed
from mmjax.layers.mlp import GatedMLP
from mmjax.layers.norms import RMSNorm
from mmjax.layers.rope import rope_tables

__all__ = ["LlamaBlock", "LlamaDecoder"]


class LlamaBlock(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, rope, cache=None, write_index=None):  # x [B, T, D]
        c = self.cfg
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_norm")(x)
        a, new_cache = Attention(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.qkv_bias, c.o_bias,
            c.kernels, self.dtype, name="attn",
        )(h, mask, rope, cache, write_index)
        x = x + a
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_norm")(x)
        x = x + GatedMLP(c.hidden_size, c.intermediate_size, "silu", c.mlp_bias, self.dtype, c.kernels, name="mlp")(h)
        return x, new_cache


class LlamaDecoder(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        self.embed = Embed(c.vocab_size, c.hidden_size, self.dtype, c.kernels)
        self.layers = [LlamaBlock(c, self.dtype) for _ in range(c.num_layers)]
        self.final_norm = RMSNorm(c.rms_norm_eps, self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Einsum((c.hidden_size, c.vocab_size), "BTD,DV->BTV", None, self.dtype, kernels=c.kernels)

    def embed_tokens(self, ids):  # [B, T] -> [B, T, D]
        return self.embed(ids)

    def __call__(self, x, positions, mask: MaskSpec, cache=None, write_index=None):
        """x [B, T, D] embeddings; positions [B, T] (or [3, B, T] for M-RoPE);
        cache: list of per-layer {"k","v": [B, S, K, H]} or None. -> (hidden [B, T, D], cache)."""
        c = self.cfg
        rope = rope_tables(positions, c.rope, c.head_dim, self.dtype, c.mrope_section, kernels=c.kernels)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, lc = layer(x, mask, rope, None if cache is None else cache[i], write_index)
            self.sow("intermediates", "hidden_states", x)  # a tuple, one entry per block
            new_cache.append(lc)
        return self.final_norm(x), new_cache

    def logits(self, h):  # [B, T, D] -> [B, T, V], float32
        out = self.embed.attend(h) if self.cfg.tie_word_embeddings else self.lm_head(h)
        return out.astype(jnp.float32)
