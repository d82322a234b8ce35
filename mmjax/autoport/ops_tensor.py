"""Lowerings of ATen's tensor ops: elementwise math, creation, casts, views, indexing, reductions.

Each function takes the op's ATen arguments in schema order, already resolved: tensors are jax
arrays, symbolic sizes are Python ints (shapes are static under jit), dtypes are jnp dtypes.
Semantics follow torch where jnp differs: `squeeze` of a dim that is not 1 is a no-op, `expand`
keeps -1 dims, `gather` reads an index smaller than the input, `sum(dim=[])` reduces everything,
a factory without a dtype infers it from its fill value. torch's int64 is JAX's default int
(int32 unless jax_enable_x64), so indices and sizes stay ints, only narrower.
mmjax.autoport.table names which ATen op each function lowers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmjax.errors import AutoportError

INT = jax.dtypes.canonicalize_dtype(np.int64)  # torch's int64: int32 unless jax_enable_x64

# ------------------------------------------------------------------ helpers


def _axis(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _axes(dims, ndim: int):
    """ATen's optional dim list -> a tuple of axes; None or [] means every axis."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None
    if isinstance(dims, int):
        dims = [dims]
    return tuple(_axis(d, ndim) for d in dims)


def _default_dtype(value, dtype):
    """torch's factory rule: an explicit dtype wins; else bool, int64 (JAX's int) or float32."""
    if dtype is not None:
        return dtype
    if isinstance(value, bool):
        return jnp.bool_
    if isinstance(value, int):
        return INT
    return jnp.float32


# ------------------------------------------------------------------ elementwise


def add(a, b, alpha=1):
    return a + (b if alpha == 1 else alpha * b)


def sub(a, b, alpha=1):
    return a - (b if alpha == 1 else alpha * b)


def rsub(a, b, alpha=1):
    return b - (a if alpha == 1 else alpha * a)


def mul(a, b):
    return jnp.multiply(a, b)


def div(a, b, rounding_mode=None):
    if rounding_mode is None:
        return jnp.true_divide(a, b)
    if rounding_mode == "floor":
        return jnp.floor_divide(a, b)
    if rounding_mode == "trunc":
        q = jnp.true_divide(a, b)
        both_int = all(jnp.issubdtype(jnp.result_type(x), jnp.integer) for x in (a, b))
        return jnp.trunc(q).astype(jnp.result_type(a, b)) if both_int else jnp.trunc(q)
    raise AutoportError(f"div: rounding_mode={rounding_mode!r} is not None, 'floor' or 'trunc'")


def pow_(a, b):
    return jnp.power(a, b)


def where(cond, a, b):
    return jnp.where(cond, a, b)


def clamp(x, min=None, max=None):  # noqa: A002 (ATen's argument names)
    if min is not None:
        x = jnp.maximum(x, min)
    if max is not None:
        x = jnp.minimum(x, max)
    return x


def rsqrt(x):
    return lax.rsqrt(x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32))


def relu(x):
    return jax.nn.relu(x)


def gelu(x, approximate="none"):
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def silu(x):
    return jax.nn.silu(x)


def hardtanh(x, min_val=-1.0, max_val=1.0):
    return jnp.clip(x, min_val, max_val)


def leaky_relu(x, negative_slope=0.01):
    return jnp.where(x > 0, x, x * negative_slope)


def elu(x, alpha=1.0, scale=1.0, input_scale=1.0):
    return scale * jnp.where(x > 0, x, alpha * jnp.expm1(x * input_scale))


def bitwise_not(x):
    return jnp.logical_not(x) if x.dtype == jnp.bool_ else jnp.invert(x)


# ------------------------------------------------------------------ creation and casts


def arange(*args, dtype=None, **_):
    """arange.default(end) / .start(start, end) / .start_step(start, end, step)."""
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) > 2 else 1)
    if dtype is None:
        dtype = INT if all(isinstance(v, int) for v in (start, end, step)) else jnp.float32
    return jnp.arange(start, end, step, dtype=dtype)


def full(size, fill_value, dtype=None, **_):
    return jnp.full(tuple(size), fill_value, _default_dtype(fill_value, dtype))


def full_like(x, fill_value, dtype=None, **_):
    return jnp.full(x.shape, fill_value, dtype or x.dtype)


def zeros(size, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype or jnp.float32)


def ones(size, dtype=None, **_):
    return jnp.ones(tuple(size), dtype or jnp.float32)


def zeros_like(x, dtype=None, **_):
    return jnp.zeros(x.shape, dtype or x.dtype)


def ones_like(x, dtype=None, **_):
    return jnp.ones(x.shape, dtype or x.dtype)


def new_full(x, size, fill_value, dtype=None, **_):
    return jnp.full(tuple(size), fill_value, dtype or x.dtype)


def new_zeros(x, size, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype or x.dtype)


def new_ones(x, size, dtype=None, **_):
    return jnp.ones(tuple(size), dtype or x.dtype)


def scalar_tensor(value, dtype=None, **_):
    # A 0-dim tensor of torch's default dtype does not promote a tensor of the same kind
    # (bf16 * fp32-scalar is bf16); a weakly typed JAX scalar behaves the same way.
    dtype = jnp.dtype(_default_dtype(value, dtype))
    if dtype == jnp.float32:
        return jnp.asarray(float(value))
    if dtype == INT:
        return jnp.asarray(int(value))
    return jnp.asarray(value, dtype)


def linspace(start, end, steps, dtype=None, **_):
    return jnp.linspace(start, end, steps, dtype=dtype or jnp.float32)


def to_copy(x, dtype=None, **_):
    return x if dtype is None else jnp.asarray(x).astype(dtype)


def copy(x, src, non_blocking=False):
    """The functional form of x.copy_(src) (an in-place write into a slice): src in x's shape and dtype."""
    return jnp.broadcast_to(src, x.shape).astype(x.dtype)


def identity(x, *_, **__):
    return x


def no_op(*_, **__):
    """Runtime asserts of the exported graph (shapes are checked by the interpreter instead)."""
    return None


def dropout(x, p=0.5, train=False):
    if train and p > 0:
        raise AutoportError(f"dropout(p={p}, train=True): a port runs inference; call module.eval() before porting")
    return x


# ------------------------------------------------------------------ views and shapes


def view(x, size):
    return jnp.reshape(x, tuple(size))


def permute(x, dims):
    return jnp.transpose(x, tuple(dims))


def transpose(x, a, b):
    return jnp.swapaxes(x, a, b)


def expand(x, size, implicit=False):
    lead = len(size) - x.ndim
    shape = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(size)]
    return jnp.broadcast_to(x, tuple(shape))


def unsqueeze(x, dim):
    return jnp.expand_dims(x, dim)


def squeeze(x, dim=None):
    """squeeze.default / .dim / .dims: dims that are not 1 are left alone (torch), not an error."""
    axes = range(x.ndim) if dim is None else _axes(dim, x.ndim) or ()
    return jnp.squeeze(x, tuple(a for a in axes if x.shape[a] == 1))


def slice_(x, dim=0, start=None, end=None, step=1):
    idx = [slice(None)] * x.ndim
    idx[_axis(dim, x.ndim)] = slice(start, end, step)
    return x[tuple(idx)]


def select(x, dim, index):
    idx = [slice(None)] * x.ndim
    idx[_axis(dim, x.ndim)] = index
    return x[tuple(idx)]


def cat(tensors, dim=0):
    # torch skips legacy empty 1-D tensors in cat
    tensors = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)] or tensors[:1]
    return jnp.concatenate(tensors, axis=_axis(dim, tensors[0].ndim))


def split_with_sizes(x, split_sizes, dim=0):
    ends = np.cumsum(split_sizes)[:-1].tolist()
    return jnp.split(x, ends, axis=_axis(dim, x.ndim))


def split(x, split_size, dim=0):
    n = x.shape[_axis(dim, x.ndim)]
    sizes = [split_size] * (n // split_size) + ([n % split_size] if n % split_size else [])
    return split_with_sizes(x, sizes, dim)


def flip(x, dims):
    return jnp.flip(x, _axes(dims, x.ndim))


def roll(x, shifts, dims=()):
    if not dims:
        return jnp.roll(x.reshape(-1), shifts).reshape(x.shape)
    return jnp.roll(x, tuple(shifts), tuple(dims))


def repeat(x, repeats):
    return jnp.tile(x, tuple(repeats))


def tril(x, diagonal=0):
    return jnp.tril(x, diagonal)


def triu(x, diagonal=0):
    return jnp.triu(x, diagonal)


def constant_pad_nd(x, pad, value=0):
    """pad lists (before, after) pairs from the last dim backwards; negative pads crop."""
    cfg = [(0, 0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        cfg[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(x, jnp.asarray(value, x.dtype), cfg)


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad(x, pad, mode="constant", value=None):
    if mode == "constant":
        return constant_pad_nd(x, pad, 0 if value is None else value)
    if mode not in _PAD_MODES:
        raise AutoportError(f"pad: mode {mode!r} is not one of constant, {', '.join(_PAD_MODES)}")
    widths = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return jnp.pad(x, widths, mode=_PAD_MODES[mode])


# ------------------------------------------------------------------ indexing


def diagonal(x, offset=0, dim1=0, dim2=1):
    return jnp.diagonal(x, offset, dim1, dim2)  # the diagonal becomes the last axis, as in torch


def bucketize(x, boundaries, out_int32=False, right=False):
    """right=False: boundaries[i-1] < x <= boundaries[i] -> i (torch's convention)."""
    return jnp.searchsorted(boundaries, x, side="right" if right else "left")


def searchsorted(sorted_sequence, x, out_int32=False, right=False, side=None, sorter=None):
    if sorted_sequence.ndim != 1 or sorter is not None:
        raise AutoportError("searchsorted: only a 1-D sorted_sequence without a sorter has a lowering")
    return jnp.searchsorted(sorted_sequence, x, side="right" if right or side == "right" else "left")


def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return jnp.take(weight, indices, axis=0)


def index(x, indices):
    """x[i0, i1, ...] with None for a full slice: numpy's advanced indexing, as torch's."""
    return x[tuple(slice(None) if i is None else i for i in indices)]


def index_put(x, indices, values, accumulate=False):
    at = x.at[tuple(slice(None) if i is None else i for i in indices)]
    return at.add(values) if accumulate else at.set(values)


def index_select(x, dim, index_):
    return jnp.take(x, index_, axis=_axis(dim, x.ndim))


def _along(x, dim, index_):
    """Full index tuple addressing x[..., index_[...], ...] along dim, index_'s shape elsewhere."""
    dim = _axis(dim, x.ndim)
    grid = list(jnp.indices(index_.shape, sparse=True))
    grid[dim] = index_
    return tuple(grid)


def gather(x, dim, index_, sparse_grad=False):
    return x[_along(x, dim, index_)]


def scatter(x, dim, index_, src=None, value=None, reduce=None):
    """scatter.src / scatter.value: out[.., index[i], ..] = src[i] along dim."""
    if reduce is not None:
        raise AutoportError(f"scatter: reduce={reduce!r} has no lowering (scatter_add / index_put do)")
    upd = jnp.broadcast_to(value, index_.shape) if src is None else slice_to(src, index_.shape)
    return x.at[_along(x, dim, index_)].set(upd.astype(x.dtype))


def scatter_value(x, dim, index_, value):
    return scatter(x, dim, index_, value=value)


def scatter_add(x, dim, index_, src):
    return x.at[_along(x, dim, index_)].add(slice_to(src, index_.shape).astype(x.dtype))


def slice_to(x, shape):
    return x[tuple(slice(0, s) for s in shape)]


def slice_scatter(x, src, dim=0, start=None, end=None, step=1):
    idx = [slice(None)] * x.ndim
    idx[_axis(dim, x.ndim)] = slice(start, end, step)
    return x.at[tuple(idx)].set(src.astype(x.dtype))


def select_scatter(x, src, dim, index_):
    idx = [slice(None)] * x.ndim
    idx[_axis(dim, x.ndim)] = index_
    return x.at[tuple(idx)].set(src.astype(x.dtype))


# ------------------------------------------------------------------ reductions


def sum_(x, dim=None, keepdim=False, dtype=None):
    return jnp.sum(x, axis=_axes(dim, x.ndim), keepdims=keepdim, dtype=dtype)


def mean(x, dim=None, keepdim=False, dtype=None):
    return jnp.mean(x, axis=_axes(dim, x.ndim), keepdims=keepdim, dtype=dtype)


def prod(x, dim=None, keepdim=False, dtype=None):
    return jnp.prod(x, axis=_axes(dim, x.ndim), keepdims=keepdim, dtype=dtype)


def amax(x, dim=(), keepdim=False):
    return jnp.max(x, axis=_axes(dim, x.ndim), keepdims=keepdim)


def amin(x, dim=(), keepdim=False):
    return jnp.min(x, axis=_axes(dim, x.ndim), keepdims=keepdim)


def max_dim(x, dim, keepdim=False):
    return jnp.max(x, axis=dim, keepdims=keepdim), jnp.argmax(x, axis=dim, keepdims=keepdim)


def min_dim(x, dim, keepdim=False):
    return jnp.min(x, axis=dim, keepdims=keepdim), jnp.argmin(x, axis=dim, keepdims=keepdim)


def argmax(x, dim=None, keepdim=False):
    return jnp.argmax(x, axis=dim, keepdims=keepdim)


def argmin(x, dim=None, keepdim=False):
    return jnp.argmin(x, axis=dim, keepdims=keepdim)


def var(x, dim=None, correction=None, keepdim=False):
    return jnp.var(x, axis=_axes(dim, x.ndim), ddof=1 if correction is None else correction, keepdims=keepdim)


def std(x, dim=None, correction=None, keepdim=False):
    return jnp.std(x, axis=_axes(dim, x.ndim), ddof=1 if correction is None else correction, keepdims=keepdim)


def any_(x, dim=None, keepdim=False):
    return jnp.any(x, axis=_axes(dim, x.ndim), keepdims=keepdim)


def all_(x, dim=None, keepdim=False):
    return jnp.all(x, axis=_axes(dim, x.ndim), keepdims=keepdim)


def logsumexp(x, dim, keepdim=False):
    return jax.nn.logsumexp(x, axis=_axes(dim, x.ndim), keepdims=keepdim)


def var_mean(x, dim=None, correction=None, keepdim=False):
    return var(x, dim, correction, keepdim), mean(x, dim, keepdim)


def cumsum(x, dim, dtype=None):
    return jnp.cumsum(x, axis=_axis(dim, x.ndim), dtype=dtype)


def cumprod(x, dim, dtype=None):
    return jnp.cumprod(x, axis=_axis(dim, x.ndim), dtype=dtype)


def vector_norm(x, ord=2, dim=None, keepdim=False, dtype=None):  # noqa: A002
    x = jnp.abs(x if dtype is None else x.astype(dtype))
    axes = _axes(dim, x.ndim)
    if ord == float("inf"):
        return jnp.max(x, axis=axes, keepdims=keepdim)
    if ord == float("-inf"):
        return jnp.min(x, axis=axes, keepdims=keepdim)
    if ord == 0:
        return jnp.sum(x != 0, axis=axes, keepdims=keepdim).astype(x.dtype)
    return jnp.sum(x ** ord, axis=axes, keepdims=keepdim) ** (1.0 / ord)


def sort(x, dim=-1, descending=False, stable=None):
    idx = jnp.argsort(-x if descending else x, axis=dim, stable=True)
    return jnp.take_along_axis(x, idx, axis=dim), idx


def topk(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002
    xt = jnp.moveaxis(x, dim, -1)
    vals, idx = lax.top_k(xt if largest else -xt, k)
    vals = vals if largest else -vals
    return jnp.moveaxis(vals, -1, dim), jnp.moveaxis(idx, -1, dim)
