"""Small-batch matrix product for decode on XLA:CPU (gemv.cc), with its reference.

Axis legend: M rows (one per sequence of a decode batch, 1..8), K contracted, N output.

`gemv(x, w, scale=None)` = x [M, K] @ w [K, N] (* scale [N]) in float32 through an XLA FFI custom
call that streams w once with the columns split over XLA's intra-op thread pool (docs/cpu_kernels.md,
"CPU decode matmul"). w is float32, bfloat16, or int8 with its per-column float32 scale (an int8
kernel of mmjax.quantization); narrow weights widen to float32 in registers, so a step reads
2 or 1 bytes a weight. x and the result are float32 (a bfloat16 model casts around the call:
M x K values, nothing next to the weights). ffi.py builds and registers it.

`eligible(rows, dtype)` says whether a product can go through it: 1 to MAX_ROWS rows, weights
of one of WEIGHT_DTYPES, and the library built (no compiler: mmjax warns once and keeps XLA's
dot, slower, same math). Whether it should is the KernelPolicy's `matmul_cpu`
(mmjax.layers.linear.Einsum asks both, in the CPU branch of its platform_dependent).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.kernels.cpu import ffi

__all__ = ["MAX_ROWS", "TARGET", "TARGETS", "WEIGHT_DTYPES", "eligible", "gemv", "gemv_reference"]

# The weight dtype's custom call (gemv.cc: one template, three handlers).
TARGETS = {"float32": "mmjax_gemv_f32", "bfloat16": "mmjax_gemv_bf16", "int8": "mmjax_gemv_s8"}
TARGET = TARGETS["float32"]
WEIGHT_DTYPES = tuple(TARGETS)
# Rows up to which the kernel beats XLA:CPU's dot (measured at 1, 2, 4 and 8; docs/cpu_kernels.md).
# Above it (prefill, large batches) XLA's GEMM reuses each weight across enough rows.
MAX_ROWS = 8


def gemv_reference(x, w, scale=None):
    """float32 reference: x [M, K] @ w [K, N] (* scale [N]) at full precision."""
    y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y if scale is None else y * scale.astype(jnp.float32)


def eligible(rows: int, dtype) -> bool:
    """Whether a [rows, K] @ [K, N] product with weights of `dtype` can go through this kernel."""
    return 1 <= rows <= MAX_ROWS and jnp.dtype(dtype).name in TARGETS and ffi.available()


def gemv(x, w, scale=None):
    """x [M, K] float32 @ w [K, N] (float32 | bfloat16 | int8 with scale [N] float32) -> [M, N]
    float32 (any M >= 1; w streams once per 8 rows, so Einsum sends only M <= MAX_ROWS here)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[0] < 1 or x.shape[1] != w.shape[0]:
        raise ValueError(f"gemv: expects x [M, K] and w [K, N], got {x.shape} and {w.shape}")
    wt = jnp.dtype(w.dtype).name
    if x.dtype != jnp.float32 or wt not in TARGETS:
        raise ValueError(f"gemv: x float32 and w one of {', '.join(WEIGHT_DTYPES)}, got {x.dtype} and {w.dtype}")
    if (wt == "int8") != (scale is not None):
        raise ValueError(f"gemv: int8 weights need their scale [N], and only they take one (w {wt}, "
                         f"scale {'given' if scale is not None else 'missing'})")
    if scale is not None and (scale.shape != (w.shape[1],) or scale.dtype != jnp.float32):
        raise ValueError(f"gemv: scale must be float32 [{w.shape[1]}], got {scale.dtype} {scale.shape}")
    if ffi.load() is None:
        raise RuntimeError(f"gemv: kernel unavailable ({ffi.error()})")
    return _gemv(x, w) if scale is None else _gemv_scaled(x, w, scale)


def _call(*args):
    x, w = args[0], args[1]
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    # Under vmap (a user's own composition) the call runs once per batch element.
    return jax.ffi.ffi_call(TARGETS[jnp.dtype(w.dtype).name], out, vmap_method="sequential")(*args)


# The custom calls have no derivative of their own: jax.grad through them takes XLA's products
# (with respect to x; the weights of a decode step are not trained through this path).
@jax.custom_vjp
def _gemv(x, w):
    return _call(x, w)


def _gemv_bwd(res, g):
    x, w = res
    return (g @ w.astype(jnp.float32).T).astype(x.dtype), (x.T @ g).astype(w.dtype)


_gemv.defvjp(lambda x, w: (_gemv(x, w), (x, w)), _gemv_bwd)


@jax.custom_vjp
def _gemv_scaled(x, w, scale):
    return _call(x, w, scale)


def _gemv_scaled_bwd(res, g):
    x, w, scale = res
    gs = g * scale
    dscale = jnp.sum(g * (x @ w.astype(jnp.float32)), axis=0)
    # int8 weights have no (float) gradient: a zero cotangent of their float0 type
    return gs @ w.astype(jnp.float32).T, jnp.zeros(w.shape, jax.dtypes.float0), dscale


_gemv_scaled.defvjp(lambda x, w, s: (_gemv_scaled(x, w, s), (x, w, s)), _gemv_scaled_bwd)
