"""GPT-2 / GPT-NeoX-style decoder: LayerNorm, biases, learned absolute positions or (partial)
rotary, sequential or parallel residual. Same interface as LlamaDecoder.

Axis legend: B batch, T tokens, S cache length, D model dim, F MLP hidden, V vocab,
N query heads, K kv heads, H head dim, M max positions.

  sequential (GPT-2):          x = x + attn(norm1(x));  x = x + mlp(norm2(x))
  parallel (GPT-NeoX):         x = x + attn(norm1(x)) + mlp(norm2(x))
  parallel, shared_norm (GPT-J, Phi-2, Falcon-7B):  x = x + attn(norm1(x)) + mlp(norm1(x))

Rotary pairs are half-split (HF rotate_half); checkpoints with interleaved pairs (GPT-J, Meta)
are ported by permuting the q/k rows in the converter (permute_rotary_interleaved_to_half).

Param tree: embed/embedding [V, D]; pos_embed/embedding [M, D] (learned only);
layers_{i}/{norm1, attn/{q,k,v [D, N|K, H], o [N, H, D]}, norm2 (absent with shared_norm),
mlp/{fc1, fc2}};
final_norm/{scale, bias}; lm_head/{kernel [D, V], bias [V]} (absent when tied).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import ConfigBase, RopeConfig
from mmjax.kernels.attention import MaskSpec
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.attention import Attention
from mmjax.layers.linear import Einsum, Embed
from mmjax.layers.mlp import MLP
from mmjax.layers.norms import make_norm
from mmjax.layers.rope import rope_tables

__all__ = ["NeoXConfig", "NeoXBlock", "NeoXDecoder"]


@dataclasses.dataclass(frozen=True)
class NeoXConfig(ConfigBase):
    vocab_size: int  # V, token embeddings (and logits)
    hidden_size: int  # D, the model width
    intermediate_size: int  # F, MLP hidden width
    num_layers: int  # L, decoder blocks
    num_heads: int  # N, query heads
    num_kv_heads: int | None = None  # K, key/value heads (grouped-query attention); default N
    head_dim: int | None = None  # H, per-head width; default D // N
    position: str = "rotary"  # rotary | learned (a [M, D] table added to the input, GPT-2)
    rope: RopeConfig = RopeConfig()  # rotary settings; rope.partial_rotary_factor: the rotated fraction of H
    max_position_embeddings: int = 2048  # M, the context length (and the learned table's size)
    parallel_residual: bool = True  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX); False: sequential (GPT-2)
    shared_norm: bool = False  # one norm feeds both parallel branches (GPT-J, Phi-2, Falcon-7B); no norm2
    norm: str = "layernorm"  # layernorm | layernorm_nobias | rmsnorm
    layer_norm_eps: float = 1e-5  # epsilon of every norm
    hidden_act: str = "gelu"  # MLP activation (mmjax.layers.activations names, e.g. gelu_new for GPT-2/GPT-J)
    qkv_bias: bool = True  # biases on q, k, v
    o_bias: bool = True  # bias on the attention output projection
    mlp_bias: bool = True  # biases on fc1, fc2
    tie_word_embeddings: bool = False  # logits from the embedding table (no lm_head)
    lm_head_bias: bool = False  # bias on lm_head (GPT-J, Phi-2)
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")

    def __post_init__(self):
        if self.position not in ("rotary", "learned"):
            raise ValueError(f"NeoXConfig.position {self.position!r} is not 'rotary' or 'learned'")
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("NeoXConfig: shared_norm=True needs parallel_residual=True (a sequential block "
                             "normalises the attention's output for the MLP)")
        if self.tie_word_embeddings and self.lm_head_bias:
            raise ValueError("NeoXConfig: a tied head has no bias (lm_head_bias=True needs tie_word_embeddings=False)")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_hf_gpt_neox(cls, t: dict, **over) -> "NeoXConfig":
        """From a transformers GPTNeoXConfig dict (model_type "gpt_neox")."""
        partial = t.get("rotary_pct", t.get("partial_rotary_factor", 1.0))  # rope_parameters, if set, wins
        rope = RopeConfig.from_hf({**t, "partial_rotary_factor": partial})
        kw = dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                  num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"], position="rotary", rope=rope,
                  max_position_embeddings=t.get("max_position_embeddings", 2048),
                  parallel_residual=bool(t.get("use_parallel_residual", True)),
                  layer_norm_eps=t.get("layer_norm_eps", 1e-5), hidden_act=t.get("hidden_act", "gelu"),
                  qkv_bias=bool(t.get("attention_bias", True)), o_bias=bool(t.get("attention_bias", True)),
                  tie_word_embeddings=bool(t.get("tie_word_embeddings", False)))
        kw.update(over)
        return cls(**kw)

    @classmethod
    def from_hf_gpt2(cls, t: dict, **over) -> "NeoXConfig":
        """From a transformers GPT2Config dict (model_type "gpt2")."""
        D = t["n_embd"]
        kw = dict(vocab_size=t["vocab_size"], hidden_size=D, intermediate_size=t.get("n_inner") or 4 * D,
                  num_layers=t["n_layer"], num_heads=t["n_head"], position="learned",
                  max_position_embeddings=t["n_positions"], parallel_residual=False,
                  layer_norm_eps=t.get("layer_norm_epsilon", 1e-5),
                  hidden_act=t.get("activation_function", "gelu_new"),
                  tie_word_embeddings=bool(t.get("tie_word_embeddings", True)))
        kw.update(over)
        return cls(**kw)


    @classmethod
    def from_hf_gptj(cls, t: dict, **over) -> "NeoXConfig":
        """From a transformers GPTJConfig dict (model_type "gptj"). Its rotary pairs are interleaved:
        the converter permutes q/k (permute_rotary_interleaved_to_half on the first rotary_dim rows)."""
        D, N = t["n_embd"], t["n_head"]
        rotary_dim = t.get("rotary_dim") or D // N
        kw = dict(vocab_size=t["vocab_size"], hidden_size=D, intermediate_size=t.get("n_inner") or 4 * D,
                  num_layers=t["n_layer"], num_heads=N, position="rotary",
                  rope=RopeConfig(partial_rotary_factor=rotary_dim / (D // N)),
                  max_position_embeddings=t.get("n_positions", 2048), parallel_residual=True, shared_norm=True,
                  layer_norm_eps=t.get("layer_norm_epsilon", 1e-5),
                  hidden_act=t.get("activation_function", "gelu_new"), qkv_bias=False, o_bias=False,
                  tie_word_embeddings=bool(t.get("tie_word_embeddings", False)), lm_head_bias=True)
        kw.update(over)
        return cls(**kw)

    @classmethod
    def from_hf_phi(cls, t: dict, **over) -> "NeoXConfig":
        """From a transformers PhiConfig dict (model_type "phi", Phi-1/1.5/2)."""
        if t.get("qk_layernorm"):
            raise ValueError("phi: qk_layernorm=True (a norm on q and k) has no NeoXConfig field")
        kw = dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                  num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
                  num_kv_heads=t.get("num_key_value_heads"), position="rotary", rope=RopeConfig.from_hf(t),
                  max_position_embeddings=t.get("max_position_embeddings", 2048), parallel_residual=True,
                  shared_norm=True, layer_norm_eps=t.get("layer_norm_eps", 1e-5),
                  hidden_act=t.get("hidden_act", "gelu_new"), tie_word_embeddings=bool(t.get("tie_word_embeddings")),
                  lm_head_bias=True)
        kw.update(over)
        return cls(**kw)


class NeoXBlock(nn.Module):
    cfg: NeoXConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, rope=None, cache=None, write_index=None):  # x [B, T, D]
        c = self.cfg
        norm1 = make_norm(c.norm, c.layer_norm_eps, self.dtype, name="norm1")
        norm2 = norm1 if c.shared_norm else make_norm(c.norm, c.layer_norm_eps, self.dtype, name="norm2")
        attn = Attention(c.hidden_size, c.num_heads, c.kv_heads, c.dim_per_head, c.qkv_bias, c.o_bias,
                         c.kernels, self.dtype, name="attn")
        mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias, None, self.dtype, c.kernels,
                  name="mlp")
        a, new_cache = attn(norm1(x), mask, rope, cache, write_index)
        if c.parallel_residual:
            # Both branches read the block input; summing them before the residual is GPT-NeoX's order.
            return x + (mlp(norm2(x)) + a), new_cache
        x = x + a
        return x + mlp(norm2(x)), new_cache


class NeoXDecoder(nn.Module):
    cfg: NeoXConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        self.embed = Embed(c.vocab_size, c.hidden_size, self.dtype, c.kernels)
        if c.position == "learned":
            self.pos_embed = Embed(c.max_position_embeddings, c.hidden_size, self.dtype, c.kernels)
        self.layers = [NeoXBlock(c, self.dtype) for _ in range(c.num_layers)]
        self.final_norm = make_norm(c.norm, c.layer_norm_eps, self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Einsum((c.hidden_size, c.vocab_size), "BTD,DV->BTV",
                                  (c.vocab_size,) if c.lm_head_bias else None, self.dtype, kernels=c.kernels)

    def embed_tokens(self, ids):  # [B, T] -> [B, T, D]
        return self.embed(ids)

    def __call__(self, x, positions, mask: MaskSpec, cache=None, write_index=None):
        """x [B, T, D] input embeddings (positions are added here, so fused image features get
        them too); positions [B, T]; cache: list of per-layer {"k","v": [B, S, K, H]} or None.
        -> (hidden [B, T, D] after the final norm, cache)."""
        c = self.cfg
        rope = None
        if c.position == "learned":
            x = x + self.pos_embed(positions)
        else:
            rope = rope_tables(positions, c.rope, c.dim_per_head, self.dtype, kernels=c.kernels)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, lc = layer(x, mask, rope, None if cache is None else cache[i], write_index)
            self.sow("intermediates", "hidden_states", x)
            new_cache.append(lc)
        return self.final_norm(x), new_cache

    def logits(self, h):  # [B, T, D] -> [B, T, V], float32
        out = self.embed.attend(h) if self.cfg.tie_word_embeddings else self.lm_head(h)
        return out.astype(jnp.float32)
