"""A configurable pre-LN vision transformer: the variants of ViT that custom VLMs use, as data.

Axis legend: B images, C channels, P patches (+1 with a class token), D model dim, F MLP hidden,
N heads, H head dim; y/x patch-grid rows/cols, h/w pixels inside a patch.

What varies is a field of ViTConfig, never a subclass: fused or separate qkv, learned or 2-D
sin-cos positions (or none), a class token or not, LayerNorm or RMSNorm, the MLP activation
(exact GELU "gelu", tanh GELU "gelu_pytorch_tanh", "quick_gelu", ...), an optional norm after the
embeddings (CLIP's pre-LN) and after the last block.

Param tree: patch_embed/{kernel [h, w, C, D], bias [D]}; class_embedding [D];
pos_embedding/embedding [P(+1), D] (learned only); pre_norm; layers_{i}/{norm1, attn/{q,k,v,o}
(or attn/{qkv [D, 3, N, H], o}), norm2, mlp/{fc1, fc2}}; final_norm.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigBase
from mmjax.kernels.attention import MaskSpec, attention
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.attention import Attention
from mmjax.layers.linear import Einsum, Embed
from mmjax.layers.mlp import MLP
from mmjax.layers.norms import make_norm

__all__ = ["ViTConfig", "ViT", "ViTBlock", "PatchEmbed", "posemb_sincos_2d"]

POSITIONS = ("learned", "sincos2d", "none")


@dataclasses.dataclass(frozen=True)
class ViTConfig(ConfigBase):
    hidden_size: int  # D, the tower width (its features' width)
    intermediate_size: int  # F, MLP hidden width
    num_layers: int  # L, transformer blocks
    num_heads: int  # N, attention heads
    image_size: int  # input side in pixels (square images)
    patch_size: int  # patch side in pixels (the conv stem's kernel and stride)
    num_channels: int = 3  # C, input channels
    class_token: bool = False  # prepend a learned class token
    position: str = "learned"  # learned | sincos2d | none
    sincos_temperature: float = 10000.0  # frequency base of position="sincos2d"
    pre_norm: bool = False  # norm right after the embeddings (CLIP's pre_layrnorm)
    final_norm: bool = True  # norm after the last block (SigLIP's post_layernorm)
    norm: str = "layernorm"  # layernorm | layernorm_nobias | rmsnorm
    norm_eps: float = 1e-6  # epsilon of every norm
    hidden_act: str = "gelu"  # MLP activation (mmjax.layers.activations names)
    fused_qkv: bool = False  # one [D, 3, N, H] kernel; False: q, k, v kernels [D, N, H]
    patch_bias: bool = True  # bias on the patch conv
    qkv_bias: bool = True  # biases on q, k, v
    o_bias: bool = True  # bias on the attention output projection
    mlp_bias: bool = True  # biases on fc1, fc2
    output_class_token: bool = False  # keep the class token in the output features
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"ViTConfig.position {self.position!r} is not one of {', '.join(POSITIONS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.position == "sincos2d" and self.hidden_size % 4:
            raise ValueError(f"ViTConfig: sincos2d positions need hidden_size % 4 == 0, got {self.hidden_size}")
        if self.output_class_token and not self.class_token:
            raise ValueError("ViTConfig: output_class_token=True needs class_token=True")

    @property
    def grid(self) -> int:  # patches per side
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:  # P, without the class token
        return self.grid ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.class_token)

    @property
    def num_features(self) -> int:
        """Tokens per image in the output: patches, plus the class token if it is kept."""
        return self.num_patches + int(self.output_class_token)

    @property
    def width(self) -> int:  # output feature dim, what a projector reads
        return self.hidden_size


def posemb_sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sin-cos positions [grid*grid, D], rows in raster order (y major).

    Layout of D (the big_vision / "simple ViT" convention, arXiv 2205.01580):
    [sin(x w), cos(x w), sin(y w), cos(y w)] with w_j = temperature^(-j / (D/4 - 1)). Other
    codebases order the quarters differently; a checkpoint that stores its table can always
    be ported with position="learned" instead."""
    y, x = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    q = dim // 4
    omega = 1.0 / temperature ** (np.arange(q, dtype=np.float64) / max(q - 1, 1))
    ang_y, ang_x = y.reshape(-1)[:, None] * omega, x.reshape(-1)[:, None] * omega  # [P, D/4]
    return np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    """Conv with stride = kernel = patch, written as one einsum over the patch grid."""

    patch_size: int
    features: int  # D
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):  # [B, C, Hi, Wi] (torch layout) -> [B, P, D]
        ps, D = self.patch_size, self.features
        B, C, Hi, Wi = pixel_values.shape
        kernel = self.param("kernel", nn.initializers.normal(0.02), (ps, ps, C, D), self.dtype)
        x = pixel_values.astype(self.dtype).reshape(B, C, Hi // ps, ps, Wi // ps, ps)
        x = jnp.einsum("BCyhxw,hwCD->ByxD", x, kernel).reshape(B, -1, D)
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (D,), self.dtype)
        return x


class FusedSelfAttention(nn.Module):
    """Bidirectional self-attention with one qkv kernel [D, 3, N, H] (bias [3, N, H])."""

    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask: MaskSpec):  # [B, P, D]
        c = self.cfg
        D, N = c.hidden_size, c.num_heads
        H = D // N
        kw = dict(kernels=c.kernels)
        qkv = Einsum((D, 3, N, H), "BPD,DCNH->BPCNH", (3, N, H) if c.qkv_bias else None, self.dtype, name="qkv",
                     **kw)(x)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, **kw)  # [B, P, N, H]
        return Einsum((N, H, D), "BPNH,NHD->BPD", (D,) if c.o_bias else None, self.dtype, name="o", **kw)(out)


class ViTBlock(nn.Module):
    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask: MaskSpec):  # [B, P, D]
        c = self.cfg
        D, N = c.hidden_size, c.num_heads
        h = make_norm(c.norm, c.norm_eps, self.dtype, name="norm1")(x)
        if c.fused_qkv:
            a = FusedSelfAttention(c, self.dtype, name="attn")(h, mask)
        else:
            # qkv_bias covers q, k and v; the layer has one flag for the three.
            a, _ = Attention(D, N, N, D // N, c.qkv_bias, c.o_bias, c.kernels, self.dtype, name="attn")(h, mask)
        x = x + a
        h = make_norm(c.norm, c.norm_eps, self.dtype, name="norm2")(x)
        return x + MLP(D, c.intermediate_size, c.hidden_act, c.mlp_bias, None, self.dtype, c.kernels, name="mlp")(h)


class ViT(nn.Module):
    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, C, Hi, Wi] -> features [B, P(+1), D] (sows "hidden_states": the
        embeddings, then each block's output, like HF's output_hidden_states)."""
        c = self.cfg
        B, C, Hi, Wi = pixel_values.shape
        if (C, Hi, Wi) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"pixel_values: expected [B, {c.num_channels}, {c.image_size}, {c.image_size}], "
                             f"got {list(pixel_values.shape)}")
        D = c.hidden_size
        x = PatchEmbed(c.patch_size, D, c.patch_bias, self.dtype, name="patch_embed")(pixel_values)  # [B, P, D]
        if c.class_token:
            cls = self.param("class_embedding", nn.initializers.normal(0.02), (D,), self.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (B, 1, D)), x], axis=1)
        if c.position == "learned":
            x = x + Embed(c.num_positions, D, self.dtype, name="pos_embedding").embedding.astype(self.dtype)[None]
        elif c.position == "sincos2d":
            pe = posemb_sincos_2d(c.grid, D, c.sincos_temperature)
            if c.class_token:  # the class token gets no position (MAE's zero row)
                pe = np.concatenate([np.zeros((1, D), np.float32), pe])
            x = x + jnp.asarray(pe, self.dtype)[None]
        if c.pre_norm:
            x = make_norm(c.norm, c.norm_eps, self.dtype, name="pre_norm")(x)
        self.sow("intermediates", "hidden_states", x)
        mask = MaskSpec(causal=False)
        for i in range(c.num_layers):
            x = ViTBlock(c, self.dtype, name=f"layers_{i}")(x, mask)
            self.sow("intermediates", "hidden_states", x)
        if c.final_norm:
            x = make_norm(c.norm, c.norm_eps, self.dtype, name="final_norm")(x)
        if c.class_token and not c.output_class_token:
            x = x[:, 1:]
        return x
