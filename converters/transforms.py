"""Named layout transforms: torch tensor(s) -> flax parameter(s).

Calling convention (what the rule engine does, and what a user-written transform follows):

    transform(*inputs, shape=target_shape) -> array            one target
    transform(*inputs, shape=(shape_a, shape_b)) -> (a, b)      a tuple of targets

* `inputs` holds one array per source pattern of the rule, in the rule's order. In a stacking
  rule (a source placeholder such as {i} that the target does not have) each input is instead
  the list of that pattern's tensors ordered by the index, 0..L-1.
* `shape` is the target's shape, which is how reshapes learn N and H without being told.
  A function without a `shape` parameter (e.g. `lambda x: x.T`) is simply called without it.
* The same code runs on numpy arrays (conversion) and on jax tracers (jax.eval_shape, which is
  how build_plan checks every output shape before any data is read), so transforms use array
  methods (.T, .reshape, .transpose) or `_xp(...)` to pick numpy or jax.numpy.
* Nothing here reshapes silently: only the *_heads transforms and `reshape` change the number
  of dimensions, and each checks that the dims it keeps really match.

Axis letters: D model dim, N heads, K kv heads, H head dim, F MLP hidden, C channels, L layers.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "apply", "transform_name", "compose", "stacked",
    "identity", "norm_scale", "embedding", "transpose_linear", "linear_to_heads",
    "heads_to_linear_out", "bias_to_heads", "conv_oihw_to_hwio", "conv3d_oidhw_to_dhwio",
    "conv1d_oiw_to_wio", "split_rows", "split_qkv", "split_kv", "split_gate_up", "concat",
    "permute_rotary_interleaved_to_half", "permute_rotary_half_to_interleaved", "stack",
    "reshape", "permute", "cast",
]

Shape = tuple[int, ...]


# ---------------------------------------------------------------- plumbing

def _xp(*xs):
    """numpy for numpy inputs, jax.numpy when tracing under jax.eval_shape (or for jax arrays)."""
    return jnp if any(isinstance(x, jax.Array) for x in jax.tree.leaves(xs)) else np


def _is_multi(shape) -> bool:
    return isinstance(shape, tuple) and len(shape) > 0 and isinstance(shape[0], tuple)


def _wants_shape(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "shape" or p.kind is p.VAR_KEYWORD for p in params)


def apply(fn: Callable, inputs: Sequence, shape):
    """Call a transform the way the rule engine does (passing shape= only if it takes it)."""
    return fn(*inputs, shape=shape) if _wants_shape(fn) else fn(*inputs)


def transform_name(fn: Callable) -> str:
    if hasattr(fn, "func") and hasattr(fn, "keywords"):  # functools.partial
        kw = ", ".join(f"{k}={v!r}" for k, v in fn.keywords.items())
        return f"{transform_name(fn.func)}({kw})" if kw else transform_name(fn.func)
    return getattr(fn, "__name__", type(fn).__name__)


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    return fn


def compose(*fns: Callable) -> Callable:
    """Left to right: compose(split_qkv, linear_to_heads) splits, then head-reshapes each part.

    When a step returns a tuple (one part per target), the next step is applied to each part
    with that part's target shape."""
    def composed(*xs, shape):
        y = apply(fns[0], xs, shape)
        for f in fns[1:]:
            if isinstance(y, tuple):
                if not _is_multi(shape) or len(shape) != len(y):
                    raise ValueError(f"{transform_name(fns[0])} returned {len(y)} parts for target shape {shape}")
                y = tuple(apply(f, (yi,), si) for yi, si in zip(y, shape))
            else:
                y = apply(f, (y,), shape)
        return y
    return _named(composed, f"compose({', '.join(transform_name(f) for f in fns)})")


def stacked(fn: Callable, axis: int = 0) -> Callable:
    """For scanned layers: apply `fn` to each layer's tensors, stack the results on `axis`.

    The target shape has the layer axis L; `fn` sees the per-layer shape (L removed)."""
    def per_layer_then_stack(*lists, shape):
        n = len(lists[0])
        if any(len(lst) != n for lst in lists):
            raise ValueError(f"stacked inputs have different layer counts {[len(lst) for lst in lists]}")
        per = tuple(_drop_axis(s, axis) for s in shape) if _is_multi(shape) else _drop_axis(shape, axis)
        outs = [apply(fn, [lst[k] for lst in lists], per) for k in range(n)]
        xp = _xp(outs)
        if _is_multi(shape):
            return tuple(xp.stack([o[j] for o in outs], axis=axis) for j in range(len(shape)))
        return xp.stack(outs, axis=axis)
    return _named(per_layer_then_stack, f"stacked({transform_name(fn)})")


def _drop_axis(shape: Shape, axis: int) -> Shape:
    if not shape:
        raise ValueError("a stacked target needs a layer axis, the target is a scalar")
    a = axis % len(shape)
    return shape[:a] + shape[a + 1:]


# ---------------------------------------------------------------- one tensor -> one parameter

def identity(x, shape=None):
    """Same layout in torch and flax."""
    return x


def norm_scale(x, shape=None):
    """LayerNorm/RMSNorm `weight` [D] -> flax `scale` [D] (same layout; named for the table)."""
    return x


def embedding(x, shape=None):
    """nn.Embedding `weight` [V, D] -> flax Embed `embedding` [V, D] (same layout)."""
    return x


def transpose_linear(x, shape=None):
    """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
    if x.ndim != 2:
        raise ValueError(f"transpose_linear needs a 2-D Linear weight, got shape {tuple(x.shape)}")
    return x.T


def linear_to_heads(x, shape):
    """torch q/k/v Linear weight [N*H, D] -> flax DenseGeneral kernel [D, N, H] (`shape`)."""
    if x.ndim != 2 or shape[0] != x.shape[1] or math.prod(shape[1:]) != x.shape[0]:
        raise ValueError(f"cannot turn a [N*H, D] weight of shape {tuple(x.shape)} into [D, N, H] {shape}")
    return x.T.reshape(shape)


def heads_to_linear_out(x, shape):
    """torch o_proj weight [D, N*H] -> flax DenseGeneral kernel [N, H, D] (`shape`)."""
    if x.ndim != 2 or shape[-1] != x.shape[0] or math.prod(shape[:-1]) != x.shape[1]:
        raise ValueError(f"cannot turn a [D, N*H] weight of shape {tuple(x.shape)} into [N, H, D] {shape}")
    return x.T.reshape(shape)


def bias_to_heads(x, shape):
    """torch q/k/v bias [N*H] -> flax bias [N, H] (`shape`)."""
    if x.ndim != 1 or math.prod(shape) != x.shape[0]:
        raise ValueError(f"cannot turn a [N*H] bias of shape {tuple(x.shape)} into [N, H] {shape}")
    return x.reshape(shape)


def conv_oihw_to_hwio(x, shape=None):
    """torch Conv2d weight [O, I, kH, kW] -> flax Conv kernel [kH, kW, I, O]."""
    if x.ndim != 4:
        raise ValueError(f"conv_oihw_to_hwio needs a 4-D Conv2d weight, got shape {tuple(x.shape)}")
    return x.transpose(2, 3, 1, 0)


def conv3d_oidhw_to_dhwio(x, shape=None):
    """torch Conv3d weight [O, I, kD, kH, kW] -> flax Conv kernel [kD, kH, kW, I, O]."""
    if x.ndim != 5:
        raise ValueError(f"conv3d_oidhw_to_dhwio needs a 5-D Conv3d weight, got shape {tuple(x.shape)}")
    return x.transpose(2, 3, 4, 1, 0)


def conv1d_oiw_to_wio(x, shape=None):
    """torch Conv1d weight [O, I, kW] -> flax Conv kernel [kW, I, O]."""
    if x.ndim != 3:
        raise ValueError(f"conv1d_oiw_to_wio needs a 3-D Conv1d weight, got shape {tuple(x.shape)}")
    return x.transpose(2, 1, 0)


def reshape(x, shape):
    """Same memory order, new dims (e.g. a [1, P, D] position embedding -> [P, D])."""
    if math.prod(x.shape) != math.prod(shape):
        raise ValueError(f"cannot reshape {tuple(x.shape)} into {shape}")
    return x.reshape(shape)


def permute(*axes: int) -> Callable:
    """permute(2, 3, 1, 0): a transpose for layouts no named transform covers."""
    return _named(lambda x, shape=None: x.transpose(axes), f"permute{axes}")


def cast(dtype) -> Callable:
    """cast(np.float32): change the dtype. Note Plan.execute(dtype=...) casts every floating
    output afterwards, so this matters only for dtype=None conversions or integer targets."""
    return _named(lambda x, shape=None: x.astype(dtype), f"cast({np.dtype(dtype).name})")


# ---------------------------------------------------------------- fused tensors

def split_rows(x, shape=None, n: int | None = None):
    """Split a fused torch tensor along its output axis (rows, axis 0) into one part per target.

    The part sizes follow the targets (each part keeps its element count), so unequal parts work:
    GQA fused qkv [(N+2K)*H, D] with targets [D,N,H], [D,K,H], [D,K,H] splits N*H, K*H, K*H rows.
    Without target shapes it splits into `n` equal parts. Parts stay in torch layout."""
    rest = math.prod(x.shape[1:])
    if _is_multi(shape):
        sizes = []
        for s in shape:
            if math.prod(s) % rest:
                raise ValueError(f"target {s} is not a whole number of rows of {tuple(x.shape)}")
            sizes.append(math.prod(s) // rest)
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"targets {shape} need {sum(sizes)} rows, tensor {tuple(x.shape)} has {x.shape[0]}")
    else:
        if n is None or x.shape[0] % n:
            raise ValueError(f"cannot split {tuple(x.shape)} into {n} equal parts along axis 0")
        sizes = [x.shape[0] // n] * n
    edges = [int(e) for e in np.cumsum([0] + sizes)]
    return tuple(x[a:b] for a, b in zip(edges[:-1], edges[1:]))


def _split_n(n: int, name: str, doc: str) -> Callable:
    def split(x, shape=None):
        if _is_multi(shape) and len(shape) != n:
            raise ValueError(f"{name} makes {n} parts, the rule has {len(shape)} targets")
        return split_rows(x, shape, n=n)
    split.__doc__ = doc
    return _named(split, name)


split_qkv = _split_n(3, "split_qkv", "fused qkv [(N+2K)*H, ...] -> (q [N*H, ...], k [K*H, ...], v [K*H, ...]), torch layout.")
split_kv = _split_n(2, "split_kv", "fused kv [2*K*H, ...] -> (k [K*H, ...], v [K*H, ...]), torch layout.")
split_gate_up = _split_n(2, "split_gate_up", "fused gate_up [2*F, D] -> (gate [F, D], up [F, D]), torch layout.")


def concat(*xs, shape=None):
    """Several torch tensors -> one, joined along the output axis (rows, axis 0): q, k, v -> qkv."""
    return _xp(*xs).concatenate(xs, axis=0)


def stack(*lists, shape=None):
    """Per-layer tensors [..] x L (one list, ordered 0..L-1) -> one scanned parameter [L, ..]."""
    if len(lists) != 1:
        raise ValueError(f"stack takes one source pattern, got {len(lists)}; use stacked(fn) to combine several")
    return _xp(lists[0]).stack(lists[0], axis=0)


# ---------------------------------------------------------------- rotary layouts

def _rotary_head_dim(x, shape, head_dim):
    h = head_dim if head_dim is not None else (shape[-1] if shape else None)
    if h is None or h % 2 or x.shape[0] % h:
        raise ValueError(f"rotary permutation: head dim {h} does not divide the {x.shape[0]} rows "
                         "(pass head_dim= with functools.partial when the target is not [.., N, H])")
    return h


def permute_rotary_interleaved_to_half(x, shape=None, *, head_dim: int | None = None):
    """q/k rows [N*H, ...] with rotary pairs interleaved (x0,x1),(x2,x3).. (Meta/GPT-J layout)
    -> pairs split in halves (x0..x_{H/2-1} | x_{H/2}..) (HF LLaMA layout). Still torch layout.

    head_dim defaults to the target's last dim (the H of a [D, N, H] or [N, H] target)."""
    h = _rotary_head_dim(x, shape, head_dim)
    rest = tuple(x.shape[1:])
    return x.reshape((x.shape[0] // h, h // 2, 2) + rest).swapaxes(1, 2).reshape(x.shape)


def permute_rotary_half_to_interleaved(x, shape=None, *, head_dim: int | None = None):
    """Inverse of permute_rotary_interleaved_to_half: half-split rotary rows -> interleaved pairs."""
    h = _rotary_head_dim(x, shape, head_dim)
    rest = tuple(x.shape[1:])
    return x.reshape((x.shape[0] // h, 2, h // 2) + rest).swapaxes(1, 2).reshape(x.shape)
