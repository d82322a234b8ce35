"""Small-batch matrix product for decode on XLA:CPU (gemv.cc), with its reference.

Axis legend: M rows (one per sequence of a decode batch, 1..8), K contracted, N output.

`gemv(x, w)` = x [M, K] @ w [K, N] in float32 through an XLA FFI custom call that streams w
once with the columns split over XLA's intra-op thread pool (docs/kernels.md, "CPU decode
matmul"). ffi.py builds and registers it.

`eligible(rows, dtype)` says whether a product can go through it: 1 to MAX_ROWS rows, float32,
and the library built (no compiler: mmjax warns once and keeps XLA's dot, slower, same math).
Whether it should is the KernelPolicy's `matmul_cpu` (mmjax.layers.linear.Einsum asks both,
in the CPU branch of its platform_dependent).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.kernels.cpu import ffi

__all__ = ["MAX_ROWS", "TARGET", "eligible", "gemv", "gemv_reference"]

TARGET = "mmjax_gemv_f32"
# Rows up to which the kernel beats XLA:CPU's dot (measured at 1, 2, 4 and 8; docs/kernels.md).
# Above it (prefill, large batches) XLA's GEMM reuses each weight across enough rows.
MAX_ROWS = 8


def gemv_reference(x, w):
    """float32 reference: x [M, K] @ w [K, N] at full precision."""
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def eligible(rows: int, dtype) -> bool:
    """Whether a [rows, K] @ [K, N] product of `dtype` can go through this kernel."""
    return 1 <= rows <= MAX_ROWS and jnp.dtype(dtype) == jnp.float32 and ffi.available()


def gemv(x, w):
    """x [M, K] float32 @ w [K, N] float32 -> [M, N] float32 (any M >= 1; w streams once per 8
    rows, so Einsum sends only M <= MAX_ROWS here)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[0] < 1 or x.shape[1] != w.shape[0]:
        raise ValueError(f"gemv: expects x [M, K] and w [K, N], got {x.shape} and {w.shape}")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"gemv: float32 only, got {x.dtype} and {w.dtype}")
    if ffi.load() is None:
        raise RuntimeError(f"gemv: kernel unavailable ({ffi.error()})")
    return _gemv(x, w)


@jax.custom_vjp
def _gemv(x, w):
    # Under vmap (a user's own composition) the call runs once per batch element.
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)


# The custom call has no derivative of its own: jax.grad through it takes XLA's products.
_gemv.defvjp(lambda x, w: (_gemv(x, w), (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
