"""CLIP vision transformer (pre-LN ViT with class token and learned positions).

Axis legend: B images, C channels, P patches (+1 with the class token), D model dim,
F MLP hidden, N heads, H head dim; y/x patch grid rows/cols, h/w pixels inside a patch.

Param tree: patch_embed/kernel [h, w, C, D] (HWIO); class_embedding [D];
pos_embedding/embedding [P+1, D]; pre_norm; layers_{i}/{norm1, attn/{q,k,v,o}, norm2, mlp/{fc1,fc2}}.
Only the layers up to the deepest requested feature layer are built (and converted):
the rest never influence the features the projector reads.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import ClipVisionConfig
from mmjax.kernels.attention import MaskSpec
from mmjax.layers.attention import Attention
from mmjax.layers.linear import Embed
from mmjax.layers.mlp import MLP
from mmjax.layers.norms import LayerNorm

__all__ = ["ClipVisionBlock", "ClipVision"]


class ClipVisionBlock(nn.Module):
    cfg: ClipVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):  # [B, P, D]
        c = self.cfg
        hd = c.hidden_size // c.num_heads
        h = LayerNorm(c.layer_norm_eps, self.dtype, name="norm1")(x)
        a, _ = Attention(c.hidden_size, c.num_heads, c.num_heads, hd, True, True, c.kernels,
                         self.dtype, name="attn")(h, mask)
        x = x + a
        h = LayerNorm(c.layer_norm_eps, self.dtype, name="norm2")(x)
        return x + MLP(c.hidden_size, c.intermediate_size, c.hidden_act, True, None, self.dtype, c.kernels,
                       name="mlp")(h)


class ClipVision(nn.Module):
    cfg: ClipVisionConfig
    num_layers_used: int  # blocks actually run (deepest feature layer)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, C, Hi, Wi] (HF layout) -> hidden states list, entry k = after k blocks
        (entry 0 = after the pre-norm), each [B, P+1, D]."""
        c = self.cfg
        ps, D = c.patch_size, c.hidden_size
        B, C, Hi, Wi = pixel_values.shape
        if Hi != c.image_size or Wi != c.image_size:
            raise ValueError(f"pixel_values: expected {c.image_size}x{c.image_size} images, got {Hi}x{Wi}")
        kernel = self.param("patch_embed", nn.initializers.normal(0.02), (ps, ps, C, D), self.dtype)
        x = pixel_values.astype(self.dtype).reshape(B, C, Hi // ps, ps, Wi // ps, ps)
        x = jnp.einsum("BCyhxw,hwCD->ByxD", x, kernel).reshape(B, -1, D)  # conv stride=kernel as einsum
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (D,), self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (B, 1, D)), x], axis=1)
        pos = Embed(c.num_patches + 1, D, self.dtype, name="pos_embedding")
        x = x + pos.embedding.astype(self.dtype)[None]
        x = LayerNorm(c.layer_norm_eps, self.dtype, name="pre_norm")(x)
        hidden = [x]
        mask = MaskSpec(causal=False)
        for i in range(self.num_layers_used):
            x = ClipVisionBlock(c, self.dtype, name=f"layers_{i}")(x, mask)
            self.sow("intermediates", "hidden_states", x)  # a tuple, one entry per block
            hidden.append(x)
        return hidden
