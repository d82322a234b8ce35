"""Normalisations, computed in float32 and cast back (as HF does for bf16 weights)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["RMSNorm", "LayerNorm", "make_norm"]


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    # Gemma-style `(1 + w)` scaling is a variant some custom models use.
    add_unit_offset: bool = False

    @nn.compact
    def __call__(self, x):  # [..., D]
        init = nn.initializers.zeros if self.add_unit_offset else nn.initializers.ones
        w = self.param("scale", init, (x.shape[-1],), self.dtype)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        # Llama casts the normalised activations back to the input dtype *before* the weight.
        h = h.astype(x.dtype)
        scale = (1.0 + w.astype(jnp.float32)).astype(self.dtype) if self.add_unit_offset else w.astype(self.dtype)
        return (scale * h).astype(self.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):  # [..., D]
        d = x.shape[-1]
        w = self.param("scale", nn.initializers.ones, (d,), self.dtype)
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps) * w.astype(jnp.float32)
        if self.use_bias:
            h = h + self.param("bias", nn.initializers.zeros, (d,), self.dtype).astype(jnp.float32)
        return h.astype(self.dtype)


def make_norm(kind: str, eps: float, dtype, name: str | None = None):
    """'layernorm' | 'layernorm_nobias' | 'rmsnorm' -> module (exact names, no fuzzy matching)."""
    if kind == "layernorm":
        return LayerNorm(eps=eps, dtype=dtype, name=name)
    if kind == "layernorm_nobias":
        return LayerNorm(eps=eps, dtype=dtype, use_bias=False, name=name)
    if kind == "rmsnorm":
        return RMSNorm(eps=eps, dtype=dtype, name=name)
    raise ValueError(f"norm {kind!r} is not one of layernorm, layernorm_nobias, rmsnorm")
