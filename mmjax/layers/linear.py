"""Parameterised einsum: the one projection layer. Parameter shapes use the axis legend
(e.g. q projection kernel "DNH"), so converter transforms and sharding rules can name axes.

A product of a few rows against the whole kernel (a decode step) goes, in the CPU branch of
a platform_dependent and when the KernelPolicy's matmul_cpu is "cpu", through the streaming
C++ kernel mmjax.kernels.cpu.gemv; every other platform and shape is a plain einsum. A kernel
that mmjax.load packed into column panels (`kernel_panels`, mmjax.kernels.cpu.panels) goes
through the panel kernel on CPU, and is unpacked in the program everywhere else."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.kernels.cpu import ffi as cpu_ffi
from mmjax.kernels.cpu import gemv as cpu_gemv
from mmjax.kernels.cpu import panels as cpu_panels
from mmjax.kernels.cpu import write_rows as cpu_rows
from mmjax.kernels.policy import KernelPolicy, dispatch
from mmjax.quantization import SCALE, contracted_axes

__all__ = ["Einsum", "Embed", "take_rows"]


class Einsum(nn.Module):
    """y = einsum(eqn, x, kernel) (+ bias). `shape` is the kernel shape, `bias_shape` the
    bias's (None = no bias). Compute happens in `dtype` (the params' dtype, as in torch).

    A quantized kernel (mmjax/quantization.py) is the same `kernel`, int8, with `kernel_scale`
    [output axes] float32 beside it; which layers are quantized is decided by the params the
    model was converted with (the config's rule table made them), so the module needs no field
    for it: y = (x . q) * scale, the scale factored out of the contraction.

    A packed kernel (`kernel_panels` [P, K, 64] in place of `kernel`, as mmjax.load stores the
    decoder's kernels for the CPU; mmjax.kernels.cpu.panels) is the same math: on CPU the panel
    kernel reads it, for any number of rows; elsewhere the program unpacks it."""

    shape: tuple[int, ...]
    eqn: str
    bias_shape: tuple[int, ...] | None = None
    dtype: jnp.dtype = jnp.float32
    # Contract the kernel's leading axes as one flat axis (x [..., n1, n2] . w [n1, n2, D]).
    # Same math; it pins the row-major order of the contraction, which stops XLA on CPU from
    # transposing the o-projection kernel ([N, H, D] -> [H, N, D]) on every decode step.
    flatten_contraction: bool = False
    kernels: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        if self.has_variable("params", cpu_panels.PACKED):  # packed at load (mmjax.kernels.cpu.panels)
            y = self._packed(x, self.get_variable("params", cpu_panels.PACKED))
        else:
            w = self.param("kernel", nn.initializers.normal(0.02), self.shape, self.dtype)
            if self.has_variable("params", SCALE):  # int8 kernel: keep it narrow until the dot
                y = dispatch(self.kernels, self._plan(x, w.dtype), x, w, self.get_variable("params", SCALE))
            else:
                w = w.astype(self.dtype)
                y = dispatch(self.kernels, self._plan(x, w.dtype), x, w)
        if self.bias_shape is not None:
            b = self.param("bias", nn.initializers.zeros, self.bias_shape, self.dtype)
            y = y + b.astype(self.dtype)
        return y

    def _plan(self, x, w_dtype):
        """plan(platform) for policy.dispatch: (key, fn(x, w[, scale]))."""
        c = _row_matmul_split(self.eqn, x.ndim, self.flatten_contraction)
        gemv = (self.kernels.matmul_cpu == "cpu" and "cpu" in self.kernels.platforms and c is not None
                and cpu_gemv.eligible(math.prod(x.shape[: x.ndim - c]), w_dtype))

        def plan(platform):
            if platform == "cpu" and gemv:
                return ("gemv",), functools.partial(_gemv, c=c, shape=self.shape)
            return ("einsum",), functools.partial(_einsum, eqn=self.eqn, shape=self.shape,
                                                  flatten_contraction=self.flatten_contraction)
        return plan

    def _packed(self, x, panels):
        c = contracted_axes(self.eqn)
        k_in, n = math.prod(self.shape[:c]), math.prod(self.shape[c:])
        scale = self.get_variable("params", SCALE) if self.has_variable("params", SCALE) else None
        split = _row_matmul_split(self.eqn, x.ndim, self.flatten_contraction)
        kernel = (split is not None and self.kernels.matmul_cpu == "cpu" and "cpu" in self.kernels.platforms
                  and cpu_ffi.available())
        einsum = functools.partial(_einsum, eqn=self.eqn, shape=self.shape, flatten_contraction=self.flatten_contraction)

        def unpacked(x, p, *s):
            return einsum(x, cpu_panels.unpack(p, n).reshape(self.shape).astype(x.dtype), *s)

        def plan(platform):
            if platform == "cpu" and kernel:
                return ("panels",), functools.partial(_panels, c=split, k_in=k_in, out=self.shape[c:])
            return ("unpacked",), unpacked
        args = (x, panels) if scale is None else (x, panels, scale)
        return dispatch(self.kernels, plan, *args)


def _panels(x, panels, scale=None, *, c, k_in, out):
    """Rows against a packed kernel on CPU: the panel kernel, float32 accumulation."""
    lead = x.shape[: x.ndim - c]
    n = math.prod(out)
    s = None if scale is None else scale.reshape(-1).astype(jnp.float32)
    y = cpu_panels.gemv_panels(x.reshape(-1, k_in).astype(jnp.float32), panels, n, s)
    return y.astype(x.dtype).reshape(*lead, *out)


def _gemv(x, w, scale=None, *, c, shape):
    """A few rows against the whole kernel (a decode step): the streaming CPU kernel, which reads
    float32, bfloat16 or int8 (+ scale) weights and accumulates in float32."""
    lead = x.shape[: x.ndim - c]
    k_in = math.prod(shape[:c])
    s = None if scale is None else scale.reshape(-1)
    y = cpu_gemv.gemv(x.reshape(-1, k_in).astype(jnp.float32), w.reshape(k_in, -1), s)
    return y.astype(x.dtype).reshape(*lead, *shape[c:])


def _einsum(x, w, scale=None, *, eqn, shape, flatten_contraction):
    """The XLA path on every platform. An int8 kernel is converted to x's dtype as the dot's
    operand (exact: |q| <= 127 fits bfloat16's 8 bits), and the per-channel scale multiplies
    the output, where XLA fuses it into the dot's epilogue."""
    w = w.astype(x.dtype)
    if flatten_contraction:
        lead = x.shape[: x.ndim - (len(shape) - 1)]
        y = jnp.einsum("...E,ED->...D", x.reshape(*lead, -1), w.reshape(-1, shape[-1]))
    else:
        y = jnp.einsum(eqn, x, w)
    return y if scale is None else y * scale.astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _row_matmul_split(eqn: str, x_ndim: int, flatten_contraction: bool) -> int | None:
    """c when `eqn` is x[..., c contracted axes] . w[same c axes, out axes] -> [..., out axes]
    (so x and w reshape, without a copy, to [rows, K] and [K, N]); None otherwise."""
    ins, out = eqn.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    if flatten_contraction:
        return len(ws) - 1
    contracted = [a for a in ws if a in xs and a not in out]
    c = len(contracted)
    if c == 0 or xs.startswith("...") or len(xs) != x_ndim:
        return None
    ok = xs[-c:] == ws[:c] and out == xs[:-c] + ws[c:]
    return c if ok else None


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` is the tied LM head."""

    num_embeddings: int  # V
    features: int  # D
    dtype: jnp.dtype = jnp.float32
    # The decoder's policy (its embedding gather may take a CPU kernel, take_rows); None: XLA's
    # gather, as the vision and text towers' position and token tables use.
    kernels: KernelPolicy | None = None

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features), self.dtype
        )

    def __call__(self, ids):  # [B, T] -> [B, T, D]
        return take_rows(self.embedding, ids, self.kernels).astype(self.dtype)

    def attend(self, x):  # [B, T, D] -> [B, T, V]
        return jnp.einsum("BTD,VD->BTV", x, self.embedding.astype(self.dtype))


def take_rows(table, ids, kernels: KernelPolicy | None = None):
    """table [V, D] rows at ids [...] -> [..., D], as jnp.take. With a policy and a 16-bit float
    table, the CPU branch the policy allows reads the rows with
    mmjax.kernels.cpu.write_rows.read_rows (bytes copied; ids clipped to [0, V), in both branches):
    XLA:CPU gathers bfloat16 in float32, converting the whole table, and hoists that convert out
    of the decode loop (Engine.decode_steps), 98 MB written per call on the bfloat16 benchmark
    model (~4 ms a token)."""
    if kernels is None or not (jnp.dtype(table.dtype).itemsize == 2 and jnp.issubdtype(table.dtype, jnp.floating)):
        return jnp.take(table, ids, axis=0)
    return _take_rows_16(table, ids, kernels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _take_rows_16(table, ids, kernels: KernelPolicy):
    def xla(table, ids):
        return jnp.take(table, ids, axis=0, mode="clip")

    def rows(table, ids):
        return cpu_rows.read_rows(table, ids.reshape(-1)).reshape(*ids.shape, table.shape[1])

    return cpu_rows.dispatch_rows(kernels, rows, xla, table, ids)


def _take_rows_fwd(table, ids, kernels):
    return _take_rows_16(table, ids, kernels), (table, ids)


def _take_rows_bwd(kernels, res, g):  # take's (clip mode): each row's cotangent added into a zero table
    table, ids = res
    ids = jnp.clip(ids, 0, table.shape[0] - 1)
    return jnp.zeros(table.shape, g.dtype).at[ids].add(g).astype(table.dtype), None


_take_rows_16.defvjp(_take_rows_fwd, _take_rows_bwd)
