"""The simplest projector: one linear map from vision width to decoder width, per token.

Axis legend: B images, P tokens per image, Dv vision dim (E in einsums), D decoder dim.
Param tree: proj/{kernel [Dv, D], bias [D]}.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import ConfigBase
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.linear import Einsum

__all__ = ["LinearProjectorConfig", "LinearProjector"]


@dataclasses.dataclass(frozen=True)
class LinearProjectorConfig(ConfigBase):
    in_features: int  # Dv, the vision features' width
    out_features: int  # D, the decoder width
    use_bias: bool = True  # bias on the projection
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")

    def num_tokens(self, num_features: int) -> int:
        return num_features


class LinearProjector(nn.Module):
    cfg: LinearProjectorConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, P, Dv] -> [B, P, D]
        c = self.cfg
        return Einsum((c.in_features, c.out_features), "BPE,ED->BPD", (c.out_features,) if c.use_bias else None,
                      self.dtype, name="proj", kernels=c.kernels)(x)
