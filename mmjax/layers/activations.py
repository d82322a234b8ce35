"""Activation functions by their HF names (exact match only)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["get_activation"]


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def get_activation(name: str):
    try:
        return _ACTS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; known: {', '.join(sorted(_ACTS))}") from None
