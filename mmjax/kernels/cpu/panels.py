"""Projection kernels stored in column panels for the CPU matmul (panels.cc), with its reference.

Axis legend: M rows (one per sequence of a decode step, or prompt tokens), K contracted, N output,
P panels (ceil(N / 64)), C the 64 columns of one panel.

A [K, N] kernel packed is [P, K, C]: panel p holds columns 64p .. 64p + 63, row after row (the
last one zero-padded past N), so every panel is one contiguous block. The C++ kernel gives each
thread a contiguous range of panels: one sequential stream per thread, which the hardware
prefetcher follows (row-major [K, N] split by columns is K short runs a row apart; docs/cpu_kernels.md,
"Weight panels"). It is the same idea as llama.cpp's repacking of weights at load.

`pack(w2)` / `unpack(panels, n)` convert one kernel; `pack_params(params, contractions)` /
`unpack_params(params, shapes)` a whole tree: a packed kernel is stored as `kernel_panels` in place of
`kernel` (mmjax.layers.linear.Einsum reads either), int8 keeps its `kernel_scale` [output axes].
`gemv_panels(x, panels, n, scale=None)` = x [M, K] @ unpack(panels, n) (* scale) in float32, for
any M (up to 8 rows in one tile per panel; more in 6-row tiles).
"""
from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.cpu import ffi

__all__ = ["COLUMNS", "PACKED", "TARGETS", "gemv_panels", "gemv_panels_reference", "pack", "pack_params", "unpack",
           "unpack_params"]

COLUMNS = 64  # columns per panel (panels.cc kPanel)
PACKED = "kernel_panels"  # the param name of a packed kernel, beside (in place of) `kernel`
TARGETS = {"float32": "mmjax_gemv_panels_f32", "bfloat16": "mmjax_gemv_panels_bf16", "int8": "mmjax_gemv_panels_s8"}


def pack(w2) -> np.ndarray:
    """[K, N] -> [ceil(N / 64), K, 64] (numpy, contiguous; the tail panel zero-padded)."""
    w2 = np.asarray(w2)
    if w2.ndim != 2:
        raise ValueError(f"pack: expects a [K, N] kernel, got shape {w2.shape}")
    k, n = w2.shape
    p = -(-n // COLUMNS)
    if p * COLUMNS != n:
        w2 = np.concatenate([w2, np.zeros((k, p * COLUMNS - n), w2.dtype)], axis=1)
    return np.ascontiguousarray(w2.reshape(k, p, COLUMNS).transpose(1, 0, 2))


def unpack(panels, n: int):
    """[P, K, 64] -> [K, n] (jnp; traced inside a program it is one transpose)."""
    p, k, c = panels.shape
    if c != COLUMNS or not (p - 1) * COLUMNS < n <= p * COLUMNS:
        raise ValueError(f"unpack: panels {panels.shape} do not hold {n} columns")
    return jnp.transpose(panels, (1, 0, 2)).reshape(k, p * COLUMNS)[:, :n]


def pack_params(params: dict, contractions: Mapping[str, int], select=lambda path, array: True) -> dict:
    """Packs, in place, every Einsum kernel of `params` that `select(path, array)` accepts ("a/b/kernel" ->
    contracted leading axes, mmjax.quantization.einsum_contractions): its `kernel` is replaced
    by `kernel_panels`, one at a time, so that memory holds at most one kernel twice (the
    unpacked array is released as its packed copy is stored, unless the caller holds it).
    Returns `params`."""
    def walk(tree, prefix):
        for name in list(tree):
            path = f"{prefix}{name}"
            if isinstance(tree[name], dict):
                walk(tree[name], path + "/")
            elif name == "kernel" and path in contractions and select(path, tree[name]):
                w = tree.pop("kernel")
                k = math.prod(w.shape[: contractions[path]])
                tree[PACKED] = jax.device_put(pack(np.asarray(w).reshape(k, -1)), _device(w))
                del w
    walk(params, "")
    return params


def unpack_params(params: Mapping, shapes: Mapping[str, tuple]) -> dict:
    """The checkpoint layout back: every `kernel_panels` as `kernel` of shape `shapes["a/b/kernel"]`
    (mmjax.models.base.param_shapes), a new array; everything else as it is."""
    def walk(tree, prefix):
        out = {}
        for name, v in tree.items():
            if isinstance(v, Mapping):
                out[name] = walk(v, f"{prefix}{name}/")
            elif name == PACKED:
                shape = tuple(shapes[f"{prefix}kernel"])
                out["kernel"] = unpack(jnp.asarray(v), math.prod(shape) // v.shape[1]).reshape(shape)
            else:
                out[name] = v
        return out
    return walk(params, "")


def _device(a):
    devices = getattr(a, "devices", None)
    return next(iter(devices())) if callable(devices) else None


def gemv_panels_reference(x, panels, n: int, scale=None):
    """float32 reference: x [M, K] @ unpack(panels, n) (* scale [n]) at full precision."""
    w = unpack(panels, n).astype(jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y if scale is None else y * scale.astype(jnp.float32)


def gemv_panels(x, panels, n: int, scale=None):
    """x [M, K] float32 @ panels [P, K, 64] (float32 | bfloat16 | int8 with scale [n] float32),
    the first n columns -> [M, n] float32."""
    if x.ndim != 2 or panels.ndim != 3 or x.shape[0] < 1 or panels.shape[1] != x.shape[1] \
            or panels.shape[2] != COLUMNS or panels.shape[0] != -(-n // COLUMNS):
        raise ValueError(f"gemv_panels: expects x [M, K] and panels [ceil({n} / 64), K, 64], got {x.shape} "
                         f"and {panels.shape}")
    wt = jnp.dtype(panels.dtype).name
    if x.dtype != jnp.float32 or wt not in TARGETS:
        raise ValueError(f"gemv_panels: x float32 and panels one of {', '.join(TARGETS)}, got {x.dtype} and "
                         f"{panels.dtype}")
    if (wt == "int8") != (scale is not None):
        raise ValueError(f"gemv_panels: int8 panels need their scale [N], and only they take one (panels {wt}, "
                         f"scale {'given' if scale is not None else 'missing'})")
    if scale is not None and (scale.shape != (n,) or scale.dtype != jnp.float32):
        raise ValueError(f"gemv_panels: scale must be float32 [{n}], got {scale.dtype} {scale.shape}")
    if ffi.load() is None:
        raise RuntimeError(f"gemv_panels: kernel unavailable ({ffi.error()})")
    return _product(x, panels, scale, n)


def _call(x, panels, scale, n):
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    args = (x, panels) if scale is None else (x, panels, scale)
    return jax.ffi.ffi_call(TARGETS[jnp.dtype(panels.dtype).name], out, vmap_method="sequential")(*args)


# No derivative of its own: jax.grad takes the reference's products.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _product(x, panels, scale, n):
    return _call(x, panels, scale, n)


def _fwd(x, panels, scale, n):
    return _call(x, panels, scale, n), (x, panels, scale)


def _bwd(n, res, g):
    x, panels, scale = res
    w = unpack(panels, n).astype(jnp.float32)
    gs = g if scale is None else g * scale
    dx = gs @ w.T
    if panels.dtype == jnp.int8:  # int8 weights have no (float) gradient: a zero of their float0 type
        dp = np.zeros(panels.shape, jax.dtypes.float0)
    else:  # d/dw of x @ w, packed like the panels (zero in the padding)
        dw = x.T @ gs
        dw = jnp.pad(dw, ((0, 0), (0, panels.shape[0] * COLUMNS - n)))
        dp = jnp.transpose(dw.reshape(dw.shape[0], panels.shape[0], COLUMNS), (1, 0, 2)).astype(panels.dtype)
    ds = None if scale is None else jnp.sum(g * (x @ w), axis=0)
    return dx, dp, ds


_product.defvjp(_fwd, _bwd)
