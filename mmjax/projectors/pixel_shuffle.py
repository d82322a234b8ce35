"""Pixel-shuffle projector (Idefics3 / InternVL style): fold each r x r block of patch tokens
into one token of r*r times the width, then an MLP to the decoder width. A VLM spends r*r
fewer decoder tokens per image.

Axis legend: B images, P = Y*r * X*r patch tokens in raster order, Y/X output grid rows/cols,
h/w position inside an r x r block, E vision dim, F MLP hidden, D decoder dim.

The folded channel order is (h, w, E) row-major, which is Idefics3's. Any other order (InternVL's
transposes) is only a permutation of the MLP's input rows, so a checkpoint with another order
is ported by permuting the rows of fc1's kernel in the converter rule, not with a new module.

Param tree: norm (optional, on r*r*E); mlp/{fc1 [r*r*E, F], fc2 [F, D]}, or proj [r*r*E, D]
when hidden_size is None.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import ConfigBase
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.linear import Einsum
from mmjax.layers.mlp import MLP
from mmjax.layers.norms import make_norm

__all__ = ["PixelShuffleConfig", "PixelShuffleProjector", "pixel_shuffle"]


@dataclasses.dataclass(frozen=True)
class PixelShuffleConfig(ConfigBase):
    in_features: int  # E, the vision features' width
    out_features: int  # D, the decoder width
    scale: int = 2  # r, each r x r block of patches folds into one token of width r*r*E
    hidden_size: int | None = None  # F, MLP hidden width; None = a single linear map
    hidden_act: str = "gelu"  # MLP activation (mmjax.layers.activations names)
    norm: str | None = None  # e.g. "layernorm" on the folded tokens (InternVL)
    norm_eps: float = 1e-5  # epsilon of the norm
    use_bias: bool = True  # biases on the Linears
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")

    @property
    def folded_features(self) -> int:
        return self.in_features * self.scale ** 2

    def num_tokens(self, num_features: int) -> int:
        return num_features // self.scale ** 2


def pixel_shuffle(x, scale: int):
    """[B, P, E] (P a square grid, side divisible by scale) -> [B, P / r^2, r^2 * E]."""
    B, P, E = x.shape
    side = math.isqrt(P)
    if side * side != P or side % scale:
        raise ValueError(f"pixel_shuffle: {P} tokens are not a square grid with a side divisible by {scale} "
                         "(drop the class token before this projector)")
    Y = side // scale
    x = x.reshape(B, Y, scale, Y, scale, E)  # [B, Y, h, X, w, E]
    return jnp.einsum("BYhXwE->BYXhwE", x).reshape(B, Y * Y, scale * scale * E)


class PixelShuffleProjector(nn.Module):
    cfg: PixelShuffleConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, P, E] -> [B, P / r^2, D]
        c = self.cfg
        x = pixel_shuffle(x, c.scale)
        if c.norm is not None:
            x = make_norm(c.norm, c.norm_eps, self.dtype, name="norm")(x)
        if c.hidden_size is None:
            return Einsum((c.folded_features, c.out_features), "BPE,ED->BPD",
                          (c.out_features,) if c.use_bias else None, self.dtype, name="proj", kernels=c.kernels)(x)
        return MLP(c.folded_features, c.hidden_size, c.hidden_act, c.use_bias, c.out_features, self.dtype,
                   c.kernels, name="mlp")(x)
