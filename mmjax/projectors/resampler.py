"""Perceiver resampler (Flamingo, arXiv 2204.14198 sec. 2.1): Q learned queries cross-attend to
the vision features, so every image becomes exactly Q tokens whatever its patch count.

Axis legend: B images, P vision tokens, Q queries (latents), R resampler width, Dv vision dim
(E in einsums), D decoder dim, N heads, H head dim, F MLP hidden.

Each layer: latents += attn(q = norm_latents(latents), kv = [norm_media(x); norm_latents(latents)])
then latents += mlp(norm_mlp(latents)); with intermediate_size=None the layer stops after the
attention (no feed-forward, no norm_mlp). With kv_includes_latents=False (BLIP-2 style) the keys
are the media tokens only. Param tree: latents [Q, R]; in_proj (optional) [Dv, R];
layers_{i}/{norm_media, norm_latents, attn/{q,k,v [R, N, H], o [N, H, R]}, norm_mlp,
mlp/{fc1, fc2} | mlp/{gate, up, down} (both absent without a feed-forward)}; final_norm;
out_proj (optional) [R, D].
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import ConfigBase
from mmjax.kernels.attention import MaskSpec, attention
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.linear import Einsum
from mmjax.layers.mlp import MLP, GatedMLP
from mmjax.layers.norms import make_norm

__all__ = ["ResamplerConfig", "PerceiverResampler"]


@dataclasses.dataclass(frozen=True)
class ResamplerConfig(ConfigBase):
    in_features: int  # Dv, the vision features' width
    out_features: int  # D, the decoder width
    dim: int  # R, the latents' width
    num_queries: int  # Q, learned latents = output tokens per image
    num_layers: int  # cross-attention layers
    num_heads: int  # N, attention heads
    intermediate_size: int | None  # F, feed-forward hidden width; None: layers without a feed-forward
    head_dim: int | None = None  # H, per-head width; default R // N
    hidden_act: str = "gelu"  # feed-forward activation (mmjax.layers.activations names)
    gated_mlp: bool = False  # SwiGLU-style gate/up/down instead of fc1/fc2
    norm: str = "layernorm"  # layernorm | layernorm_nobias | rmsnorm
    norm_eps: float = 1e-5  # epsilon of every norm
    kv_includes_latents: bool = True  # keys/values are [media; latents] (Flamingo); False: media only (BLIP-2)
    qkv_bias: bool = False  # biases on q, k, v
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # biases in the feed-forward
    in_proj: bool = False  # project Dv -> R first (needed when Dv != R)
    in_proj_bias: bool = True  # bias on in_proj
    final_norm: bool = True  # norm after the last layer
    out_proj: bool = True  # project R -> D last (needed when R != D)
    out_proj_bias: bool = True  # bias on out_proj
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")

    def __post_init__(self):
        if self.gated_mlp and self.intermediate_size is None:
            raise ValueError("ResamplerConfig: gated_mlp=True needs a feed-forward (intermediate_size is None)")
        if not self.in_proj and self.in_features != self.dim:
            raise ValueError(f"ResamplerConfig: in_features {self.in_features} != dim {self.dim} needs in_proj=True")
        if not self.out_proj and self.out_features != self.dim:
            raise ValueError(f"ResamplerConfig: out_features {self.out_features} != dim {self.dim} needs out_proj=True")

    @property
    def heads_dim(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    def num_tokens(self, num_features: int) -> int:
        return self.num_queries


class CrossAttention(nn.Module):
    """Queries from the latents, keys/values from kv_in; bidirectional (every query sees every key)."""

    cfg: ResamplerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, lat, kv_in):  # lat [B, Q, R], kv_in [B, S, R] -> [B, Q, R]
        c = self.cfg
        R, N, H = c.dim, c.num_heads, c.heads_dim
        bias, kw = (N, H) if c.qkv_bias else None, dict(kernels=c.kernels)
        q = Einsum((R, N, H), "BQR,RNH->BQNH", bias, self.dtype, name="q", **kw)(lat)
        k = Einsum((R, N, H), "BSR,RNH->BSNH", bias, self.dtype, name="k", **kw)(kv_in)
        v = Einsum((R, N, H), "BSR,RNH->BSNH", bias, self.dtype, name="v", **kw)(kv_in)
        out = attention(q, k, v, MaskSpec(causal=False), **kw)  # [B, Q, N, H]
        return Einsum((N, H, R), "BQNH,NHR->BQR", (R,) if c.o_bias else None, self.dtype, name="o", **kw)(out)


class ResamplerLayer(nn.Module):
    cfg: ResamplerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, latents, media):  # latents [B, Q, R], media [B, P, R] -> [B, Q, R]
        c = self.cfg
        m = make_norm(c.norm, c.norm_eps, self.dtype, name="norm_media")(media)
        lat = make_norm(c.norm, c.norm_eps, self.dtype, name="norm_latents")(latents)
        kv_in = jnp.concatenate([m, lat], axis=1) if c.kv_includes_latents else m  # [B, S, R]
        latents = latents + CrossAttention(c, self.dtype, name="attn")(lat, kv_in)
        if c.intermediate_size is None:  # attention-only layers: the latents carry the residual alone
            return latents
        h = make_norm(c.norm, c.norm_eps, self.dtype, name="norm_mlp")(latents)
        if c.gated_mlp:
            h = GatedMLP(c.dim, c.intermediate_size, c.hidden_act, c.mlp_bias, self.dtype, c.kernels, name="mlp")(h)
        else:
            h = MLP(c.dim, c.intermediate_size, c.hidden_act, c.mlp_bias, None, self.dtype, c.kernels, name="mlp")(h)
        return latents + h


class PerceiverResampler(nn.Module):
    cfg: ResamplerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, P, Dv] -> [B, Q, D]
        c = self.cfg
        B = x.shape[0]
        if c.in_proj:
            x = Einsum((c.in_features, c.dim), "BPE,ER->BPR", (c.dim,) if c.in_proj_bias else None, self.dtype,
                       name="in_proj", kernels=c.kernels)(x)
        latents = self.param("latents", nn.initializers.normal(0.02), (c.num_queries, c.dim), self.dtype)
        lat = jnp.broadcast_to(latents.astype(self.dtype), (B, c.num_queries, c.dim))
        for i in range(c.num_layers):
            lat = ResamplerLayer(c, self.dtype, name=f"layers_{i}")(lat, x)
            self.sow("intermediates", "hidden_states", lat)
        if c.final_norm:
            lat = make_norm(c.norm, c.norm_eps, self.dtype, name="final_norm")(lat)
        if c.out_proj:
            lat = Einsum((c.dim, c.out_features), "BQR,RD->BQD", (c.out_features,) if c.out_proj_bias else None,
                         self.dtype, name="out_proj", kernels=c.kernels)(lat)
        return lat
