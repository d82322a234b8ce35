"""BERT-style bidirectional text encoder: word + position + token-type embeddings, post-LN
blocks, GELU MLP, pooler (dense + tanh on [CLS]).

Axis legend: B batch, T tokens, D model dim, F MLP hidden, N heads, H head dim, V vocab,
P positions (max_position_embeddings), Y token types, E pooler output (= D).

Param tree: word_embed/embedding [V, D]; pos_embed/embedding [P, D]; type_embed/embedding [Y, D];
embed_norm; layers_{i}/{attn/{q,k,v,o}, attn_norm, mlp/{fc1,fc2}, mlp_norm};
pooler/{kernel [D, D], bias} (absent when cfg.has_pooler is False).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import ConfigBase
from mmjax.errors import InputError
from mmjax.kernels.attention import MaskSpec
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.attention import Attention
from mmjax.layers.linear import Einsum, Embed
from mmjax.layers.mlp import MLP
from mmjax.layers.norms import LayerNorm

__all__ = ["BertConfig", "BertBlock", "Bert", "POOLS", "NO_POOLER_ARCHITECTURES", "padding_mask"]


NO_POOLER_ARCHITECTURES = ("BertForMaskedLM", "BertForTokenClassification", "BertForQuestionAnswering")


@dataclasses.dataclass(frozen=True)
class BertConfig(ConfigBase):
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    max_position_embeddings: int = 512  # P
    type_vocab_size: int = 2  # Y
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    # HF builds these heads with add_pooling_layer=False: their checkpoints carry no pooler.
    has_pooler: bool = True
    kernels: KernelPolicy = KernelPolicy()  # mmjax/kernels/policy.py

    @classmethod
    def from_hf(cls, hf: dict) -> "BertConfig":
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("bert: decoder / cross-attention configs are not supported (encoder only)")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"bert: position_embedding_type {pos!r} is not supported (absolute)")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            has_pooler=not set(hf.get("architectures") or ()) & set(NO_POOLER_ARCHITECTURES),
        )


def padding_mask(attention_mask, causal: bool) -> MaskSpec:
    """attention_mask [B, T] (1 = token, 0 = padding) or None -> MaskSpec over keys.

    Segment ids rather than kv_lengths, so left, right or inner padding all work, as HF's
    additive mask does. Every query sits in segment 0, so a padded query still reads the real
    keys, exactly like HF (its output is garbage there in both, but the same garbage)."""
    if attention_mask is None:
        return MaskSpec(causal=causal)
    keep = jnp.asarray(attention_mask).astype(bool)
    return MaskSpec(causal=causal, q_segment_ids=jnp.zeros(keep.shape, jnp.int32),
                    kv_segment_ids=jnp.where(keep, 0, -1).astype(jnp.int32))


class BertBlock(nn.Module):
    """Post-LN: x = norm(x + attn(x)); x = norm(x + mlp(x))."""

    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask: MaskSpec):  # [B, T, D]
        c = self.cfg
        a, _ = Attention(c.hidden_size, c.num_heads, c.num_heads, c.hidden_size // c.num_heads, True, True,
                         c.kernels, self.dtype, name="attn")(x, mask)
        x = LayerNorm(c.layer_norm_eps, self.dtype, name="attn_norm")(x + a)
        h = MLP(c.hidden_size, c.intermediate_size, c.hidden_act, True, None, self.dtype, c.kernels, name="mlp")(x)
        return LayerNorm(c.layer_norm_eps, self.dtype, name="mlp_norm")(x + h)


def _mean(h, attention_mask):  # h [B, T, D] -> [B, D], over the real tokens only
    m = jnp.ones(h.shape[:2], h.dtype) if attention_mask is None else jnp.asarray(attention_mask).astype(h.dtype)
    return jnp.einsum("BTD,BT->BD", h, m) / jnp.maximum(m.sum(-1, keepdims=True), 1.0)


POOLS = ("pooler", "cls", "mean")  # HF's dense+tanh on [CLS] | raw [CLS] | masked mean (sentence-transformers)


class Bert(nn.Module):
    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        self.word_embed = Embed(c.vocab_size, c.hidden_size, self.dtype)
        self.pos_embed = Embed(c.max_position_embeddings, c.hidden_size, self.dtype)
        self.type_embed = Embed(c.type_vocab_size, c.hidden_size, self.dtype)
        self.embed_norm = LayerNorm(c.layer_norm_eps, self.dtype)
        self.layers = [BertBlock(c, self.dtype) for _ in range(c.num_layers)]  # named layers_{i}
        if c.has_pooler:
            self.pooler = Einsum((c.hidden_size, c.hidden_size), "BD,DE->BE", (c.hidden_size,), self.dtype,
                                 kernels=c.kernels)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, pool: str | None = None):
        """input_ids [B, T]; attention_mask, token_type_ids [B, T] or None (None = all ones / all
        type 0, as HF); pool one of POOLS, None = "pooler" when the checkpoint has one, else "cls".
        Returns (last_hidden_state [B, T, D], pooled [B, D])."""
        c = self.cfg
        if pool is None:
            pool = "pooler" if c.has_pooler else "cls"
        B, T = input_ids.shape
        if T > c.max_position_embeddings:
            raise InputError(f"input_ids: {T} tokens exceed max_position_embeddings={c.max_position_embeddings}")
        if pool not in POOLS:
            raise InputError(f"pool={pool!r} is not one of {', '.join(POOLS)}")
        if pool == "pooler" and not c.has_pooler:
            raise InputError("pool='pooler': this checkpoint has no pooler (its architecture is one of "
                             f"{', '.join(NO_POOLER_ARCHITECTURES)}); pass pool='cls' or pool='mean'")
        types = jnp.zeros((B, T), jnp.int32) if token_type_ids is None else token_type_ids
        x = self.word_embed(input_ids) + self.type_embed(types) + self.pos_embed.embedding[:T].astype(self.dtype)[None]
        x = self.embed_norm(x)
        mask = padding_mask(attention_mask, causal=False)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            self.sow("intermediates", "hidden_states", x)  # a tuple, one entry per block
        # The pooler always runs when there is one (XLA drops it if unused), so the param tree
        # never depends on `pool`.
        pools = {"cls": x[:, 0], "mean": _mean(x, attention_mask)}
        if c.has_pooler:
            pools["pooler"] = jnp.tanh(self.pooler(x[:, 0]))
        pooled = pools[pool]
        return x, pooled
