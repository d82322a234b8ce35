"""Parameterised einsum: the one projection layer. Parameter shapes use the axis legend
(e.g. q projection kernel "DNH"), so converter transforms and sharding rules can name axes."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["Einsum", "Embed"]


class Einsum(nn.Module):
    """y = einsum(eqn, x, kernel) (+ bias). `shape` is the kernel shape, `bias_shape` the
    bias's (None = no bias). Compute happens in `dtype` (the params' dtype, as in torch)."""

    shape: tuple[int, ...]
    eqn: str
    bias_shape: tuple[int, ...] | None = None
    dtype: jnp.dtype = jnp.float32
    # Contract the kernel's leading axes as one flat axis (x [..., n1, n2] . w [n1, n2, D]).
    # Same math; it pins the row-major order of the contraction, which stops XLA on CPU from
    # transposing the o-projection kernel ([N, H, D] -> [H, N, D]) on every decode step.
    flatten_contraction: bool = False

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.normal(0.02), self.shape, self.dtype)
        if self.flatten_contraction:
            n = len(self.shape) - 1
            lead = x.shape[: x.ndim - n]
            y = jnp.einsum("...E,ED->...D", x.astype(self.dtype).reshape(*lead, -1),
                           w.astype(self.dtype).reshape(-1, self.shape[-1]))
        else:
            y = jnp.einsum(self.eqn, x.astype(self.dtype), w.astype(self.dtype))
        if self.bias_shape is not None:
            b = self.param("bias", nn.initializers.zeros, self.bias_shape, self.dtype)
            y = y + b.astype(self.dtype)
        return y


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` is the tied LM head."""

    num_embeddings: int  # V
    features: int  # D
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features), self.dtype
        )

    def __call__(self, ids):  # [B, T] -> [B, T, D]
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x):  # [B, T, D] -> [B, T, V]
        return jnp.einsum("BTD,VD->BTV", x, self.embedding.astype(self.dtype))
