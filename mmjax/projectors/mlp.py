"""LLaVA's projector: Linear -> act -> Linear from vision width to decoder width."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.mlp import MLP

__all__ = ["MLPProjector"]


class MLPProjector(nn.Module):
    in_features: int  # vision D (x number of feature layers)
    out_features: int  # decoder D
    act: str = "gelu"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernels: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x):  # [B, P, Dv] -> [B, P, D]
        return MLP(self.in_features, self.out_features, self.act, self.use_bias, self.out_features,
                   self.dtype, self.kernels, name="mlp")(x)
