"""Rotary position embeddings: default / linear / llama3 frequencies, M-RoPE (Qwen2-VL's
three position axes), partial rotary (GPT-NeoX), half-split layout (HF `rotate_half`).

Axis legend: B batch, T tokens, N heads, H head dim; R = rotated dims (H * partial)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import RopeConfig
from mmjax.kernels.policy import KernelPolicy, dispatch

__all__ = ["inv_frequencies", "rope_tables", "apply_rope"]


def inv_frequencies(rope: RopeConfig, rot_dim: int) -> np.ndarray:
    """[R/2] float32, computed the way HF's rope init functions do (float32 arithmetic)."""
    exps = np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rot_dim)
    inv = (np.float32(1.0) / (np.float32(rope.theta) ** exps)).astype(np.float32)
    if rope.rope_type == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        lo, hi, f = rope.low_freq_factor, rope.high_freq_factor, rope.factor
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope.rope_type != "default":
        raise ValueError(f"rope_type {rope.rope_type!r} is not supported")
    return inv


def rope_tables(positions, rope: RopeConfig, head_dim: int, dtype, mrope_section=None, *,
                kernels: KernelPolicy = KernelPolicy()):
    """positions [B, T] (or [3, B, T] with mrope_section) -> (cos, sin) each [B, T, R]."""
    rot_dim = int(head_dim * rope.partial_rotary_factor)
    inv = jnp.asarray(inv_frequencies(rope, rot_dim))  # [R/2]
    pos = positions.astype(jnp.float32)
    if mrope_section is not None and pos.ndim == 3:
        freqs = pos[..., None] * inv  # [3, B, T, R/2]
        # Frequency j takes its angle from position axis axis_of[j] (t, h, w sections).
        axis_of = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
        if axis_of.shape[0] != rot_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {rot_dim // 2}")
        onehot = jnp.asarray(np.eye(3, dtype=np.float32)[axis_of].T)  # [3, R/2]
        freqs = jnp.sum(freqs * onehot[:, None, None, :], axis=0)  # [B, T, R/2] (exact: one term is nonzero)
    else:
        # [B, T] positions under M-RoPE mean all three axes are equal, which is plain RoPE
        # (decode of text tokens).
        if pos.ndim == 3:
            raise ValueError(f"positions {positions.shape}: [3, B, T] needs mrope_section")
        freqs = pos[..., None] * inv  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, R]
    cos, sin = jnp.cos(emb), jnp.sin(emb)

    def plan(platform):
        if platform == "cpu" and kernels.rope_cpu == "once":
            return ("once",), _materialised
        return ("plain",), lambda cos, sin: (cos, sin)

    cos, sin = dispatch(kernels, plan, cos, sin)
    return cos.astype(dtype), sin.astype(dtype)


def _materialised(cos, sin):
    """XLA:CPU fuses the tables' cos/sin into every consumer and recomputes them for each head
    of each layer (24 copies, ~20 ms of thread time in the benchmark's prefill). An identity
    product, exact in float32, makes it compute them once; an optimization_barrier does not
    survive XLA:CPU's pipeline."""
    eye = jnp.eye(cos.shape[-1], dtype=jnp.float32)
    return tuple(jnp.dot(t, eye, precision=jax.lax.Precision.HIGHEST) for t in (cos, sin))


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin):
    """x [B, T, N, H]; cos/sin [B, T, R] with R <= H (the first R dims rotate)."""
    r = cos.shape[-1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if r == x.shape[-1]:
        return x * c + _rotate_half(x) * s
    xr, xp = x[..., :r], x[..., r:]
    return jnp.concatenate([xr * c + _rotate_half(xr) * s, xp], axis=-1)
