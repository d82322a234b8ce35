"""Lowerings of ATen's network ops: matmuls and einsum, convolution, pooling, norms, softmax,
scaled_dot_product_attention (through mmjax.kernels.attention), interpolation.

Axis legend: B batch, C channels, N query heads, K kv heads, L query length, S key length,
E head dim, G groups.

Numerics follow torch's CPU kernels where they choose: float32 matmuls at full precision (a GPU
would otherwise use TF32), norms and softmax computed in float32 and cast back, interpolation
indices computed in float32 as ATen's UpSample.h does.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmjax.kernels.policy import KernelPolicy
from mmjax.errors import AutoportError
from mmjax.kernels.attention import MaskSpec, attention

F32 = jnp.float32


def _prec(*xs):
    """Full precision for float32 products (torch's CPU default); bf16 keeps the default."""
    return lax.Precision.HIGHEST if all(jnp.result_type(x) == F32 for x in xs) else None


def _up(x):
    """float32 for the inside of a norm or softmax when x is a narrower float."""
    return x.astype(F32) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4 else x


# ------------------------------------------------------------------ products


def linear(x, weight, bias=None):  # x [.., I], weight [O, I] -> [.., O]
    y = jnp.einsum("...i,oi->...o", x, weight, precision=_prec(x, weight))
    return y if bias is None else y + bias


def matmul(a, b):
    return jnp.matmul(a, b, precision=_prec(a, b))


def addmm(bias, a, b, beta=1, alpha=1):
    prod = jnp.matmul(a, b, precision=_prec(a, b))
    return (beta * bias if beta != 1 else bias) + (alpha * prod if alpha != 1 else prod)


def einsum(equation, tensors, path=None):
    return jnp.einsum(equation, *tensors, precision=_prec(*tensors))


def cdist(x1, x2, p=2.0, compute_mode=None):  # [.., P, M], [.., R, M] -> [.., P, R]
    diff = jnp.abs(x1[..., :, None, :] - x2[..., None, :, :])
    if p == float("inf"):
        return jnp.max(diff, axis=-1)
    return jnp.sum(diff ** p, axis=-1) ** (1.0 / p) if p != 2 else jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))


# ------------------------------------------------------------------ convolution and pooling


def _spatial(n: int) -> str:
    return "DHW"[-n:] if n <= 3 else "".join(chr(ord("a") + i) for i in range(n))


def _per_dim(v, n):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


def convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """x [B, Cin, *sp], weight [Cout, Cin/G, *k] (transposed: [Cin, Cout/G, *k])."""
    n = x.ndim - 2
    sp = _spatial(n)
    stride, padding, dilation = (_per_dim(v, n) for v in (stride, padding, dilation))
    dtype = jnp.result_type(x, weight)
    x, weight = x.astype(dtype), weight.astype(dtype)
    dn = lax.conv_dimension_numbers(x.shape, weight.shape, ("NC" + sp, "OI" + sp, "NC" + sp))
    if not transposed:
        y = lax.conv_general_dilated(x, weight, stride, [(p, p) for p in padding], rhs_dilation=dilation,
                                     dimension_numbers=dn, feature_group_count=groups, precision=_prec(x, weight))
    else:
        # A transposed conv is the conv of the stride-dilated input with the flipped kernel,
        # its in/out channels swapped within each group.
        cin, cout_g, k = weight.shape[0], weight.shape[1], weight.shape[2:]
        w = weight.reshape((groups, cin // groups, cout_g) + k).swapaxes(1, 2)
        w = w.reshape((groups * cout_g, cin // groups) + k)
        w = jnp.flip(w, axis=tuple(range(2, 2 + n)))
        out_pad = _per_dim(output_padding, n)
        pads = [(d * (kk - 1) - p, d * (kk - 1) - p + op) for kk, p, d, op in zip(k, padding, dilation, out_pad)]
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NC" + sp, "OI" + sp, "NC" + sp))
        y = lax.conv_general_dilated(x, w, (1,) * n, pads, lhs_dilation=stride, rhs_dilation=dilation,
                                     dimension_numbers=dn, feature_group_count=groups, precision=_prec(x, w))
    return y if bias is None else y + bias.astype(y.dtype).reshape((1, -1) + (1,) * n)


def _window(x, kernel_size, stride, padding):
    n = len(kernel_size)
    stride = _per_dim(stride or kernel_size, n)
    padding = _per_dim(padding, n)
    lead = x.ndim - n
    return ((1,) * lead + tuple(kernel_size), (1,) * lead + tuple(stride),
            [(0, 0)] * lead + [(p, p) for p in padding])


def avg_pool(x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    if ceil_mode:
        raise AutoportError("avg_pool2d(ceil_mode=True) has no lowering (pad the input instead)")
    kernel_size = _per_dim(kernel_size, 2)
    win, strides, pads = _window(x, kernel_size, stride, padding)
    total = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, win, strides, pads)
    if divisor_override:
        return total / divisor_override
    if count_include_pad:
        return total / math.prod(kernel_size)
    count = lax.reduce_window(jnp.ones(x.shape[-2:], x.dtype), jnp.zeros((), x.dtype), lax.add,
                              win[-2:], strides[-2:], pads[-2:])
    return total / count


def max_pool_with_indices(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """Returns (values, None): the indices output has no lowering and fails only if it is read."""
    if any(d != 1 for d in _per_dim(dilation, 2)):
        raise AutoportError("max_pool2d with dilation > 1 has no lowering")
    kernel_size = _per_dim(kernel_size, 2)
    win, strides, pads = _window(x, kernel_size, stride, padding)
    if ceil_mode:  # ATen's pooling_output_shape: one more window if it starts inside the (left-padded) input
        for i, (k, s_, (p, _)) in enumerate(zip(win[-2:], strides[-2:], pads[-2:])):
            size = x.shape[x.ndim - 2 + i]
            out = -(-(size + 2 * p - k) // s_) + 1
            out -= (out - 1) * s_ >= size + p
            pads[x.ndim - 2 + i] = (p, max(p, (out - 1) * s_ + k - size - p))
    return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, win, strides, pads), None


def adaptive_avg_pool2d(x, output_size):
    """Bin i of an axis averages input [floor(i * I / O), ceil((i + 1) * I / O))."""
    for axis, out in zip((-2, -1), output_size):
        size = x.shape[axis]
        bins = [jnp.mean(lax.slice_in_dim(x, (i * size) // out, -(-(i + 1) * size // out), axis=axis % x.ndim),
                         axis=axis, keepdims=True) for i in range(out)]
        x = jnp.concatenate(bins, axis=axis)
    return x


# ------------------------------------------------------------------ norms and softmax


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    xf = _up(x)
    mu = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=axes, keepdims=True)
    y = (xf - mu) * lax.rsqrt(var + eps)
    if weight is not None:
        y = y * _up(weight)
    if bias is not None:
        y = y + _up(bias)
    return y.astype(x.dtype)


def native_layer_norm(x, normalized_shape, weight, bias, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    xf = _up(x)
    mu = jnp.mean(xf, axis=axes, keepdims=True)
    rstd = lax.rsqrt(jnp.mean(jnp.square(xf - mu), axis=axes, keepdims=True) + eps)
    return layer_norm(x, normalized_shape, weight, bias, eps), mu, rstd


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enable=True):  # x [B, C, *sp]
    B, C = x.shape[:2]
    xf = _up(x).reshape(B, num_groups, -1)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = ((xf - mu) * lax.rsqrt(var + eps)).reshape(x.shape)
    per_channel = (1, C) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * _up(weight).reshape(per_channel)
    if bias is not None:
        y = y + _up(bias).reshape(per_channel)
    return y.astype(x.dtype)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """As torch's composite: normalize in float32, cast back, then scale in x's dtype."""
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    xf = _up(x)
    eps = float(jnp.finfo(xf.dtype).eps) if eps is None else eps
    y = (xf * lax.rsqrt(jnp.mean(jnp.square(xf), axis=axes, keepdims=True) + eps)).astype(x.dtype)
    return y if weight is None else y * weight


def batch_norm_inference(x, weight, bias, running_mean, running_var, momentum, eps):
    """_native_batch_norm_legit_no_training: (out, empty, empty), statistics from the buffers."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (_up(x) - running_mean.reshape(shape)) * lax.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    empty = jnp.zeros((0,), F32)
    return y.astype(x.dtype), empty, empty


def batch_norm_batch_stats(x, weight, bias, training, momentum, eps):
    """_native_batch_norm_legit.no_stats: statistics of this batch (what instance_norm and a
    BatchNorm without running stats compute in eval mode) -> (out, mean, rstd)."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    xf = _up(x)
    mu = jnp.mean(xf, axis=axes, keepdims=True)
    rstd = lax.rsqrt(jnp.mean(jnp.square(xf - mu), axis=axes, keepdims=True) + eps)
    y = (xf - mu) * rstd
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.astype(x.dtype), mu.reshape(-1), rstd.reshape(-1)


def _softmax_dtype(x, dtype):
    """softmax.int's dtype argument, or _softmax's half_to_float flag."""
    if dtype is True:
        return F32
    return x.dtype if dtype is None or dtype is False else jnp.dtype(dtype)


def softmax(x, dim, dtype=None):
    out = _softmax_dtype(x, dtype)
    return jax.nn.softmax(_up(x.astype(out)), axis=dim).astype(out)


def log_softmax(x, dim, dtype=None):
    out = _softmax_dtype(x, dtype)
    return jax.nn.log_softmax(_up(x.astype(out)), axis=dim).astype(out)


# ------------------------------------------------------------------ attention


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, kernels=KernelPolicy()):
    """q [.., N, L, E], k [.., K, S, E], v [.., K, S, Ev] -> [.., N, L, Ev] (torch's layout).

    Without an attn_mask (what a ViT block or a resampler passes) this is mmjax's own
    attention (mmjax.kernels.attention: a MaskSpec, the module's kernel policy); a mask tensor,
    different q/v head dims or broadcast batch dims take the einsum reference below."""
    if dropout_p:
        raise AutoportError(f"scaled_dot_product_attention(dropout_p={dropout_p}): a port runs inference; call "
                            "module.eval() (or pass dropout_p=0.0 when not training) before porting")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    same_batch = q.shape[:-3] == k.shape[:-3] == v.shape[:-3]
    heads_ok = q.ndim >= 3 and (q.shape[-3] == k.shape[-3] or (enable_gqa and q.shape[-3] % k.shape[-3] == 0))
    if attn_mask is None and q.ndim >= 4 and same_batch and heads_ok and v.shape[-1] == q.shape[-1]:
        dtype = q.dtype
        if jax.default_backend() == "cpu" and dtype != F32:
            # XLA:CPU has no bf16 x bf16 -> f32 dot for some operand layouts (q from a transposed
            # einsum: "Unsupported element type for DotThunk"); torch's CPU kernel computes a
            # bf16 attention in float32 too, so upcast here and round the output once.
            q, k, v = (t.astype(F32) for t in (q, k, v))
        to_blne = lambda t: t.reshape((-1,) + t.shape[-3:]).swapaxes(1, 2)  # [.., N, L, E] -> [B, L, N, E]
        out = attention(to_blne(q), to_blne(k), to_blne(v), MaskSpec(causal=is_causal), kernels=kernels,
                        scale=scale)  # [B, L, N, E]
        return out.swapaxes(1, 2).reshape(q.shape).astype(dtype)
    return sdpa_reference(q, k, v, attn_mask, is_causal, scale, enable_gqa)


def sdpa_reference(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    if enable_gqa and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        g = q.shape[-3] // k.shape[-3]  # query head n reads kv head n // g (torch's repeat_interleave)
        k, v = jnp.repeat(k, g, axis=-3), jnp.repeat(v, g, axis=-3)
    logits = jnp.einsum("...le,...se->...ls", q, k, precision=_prec(q, k), preferred_element_type=F32) * scale
    L, S = logits.shape[-2:]
    if is_causal:
        logits = jnp.where(jnp.tril(jnp.ones((L, S), bool)), logits, -jnp.inf)
    if attn_mask is not None:
        logits = jnp.where(attn_mask, logits, -jnp.inf) if attn_mask.dtype == jnp.bool_ else logits + attn_mask
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...ls,...sv->...lv", probs, v, precision=_prec(probs, v)).astype(q.dtype)


# ------------------------------------------------------------------ interpolation
# Index arithmetic of ATen's UpSample.h, in float32 as its CPU kernels do; the indices and
# weights are host constants (the sizes are static), the gathers run on device.


def _out_sizes(x, output_size, scale_factors):
    if output_size is not None:
        return list(output_size), [None] * len(output_size)
    sizes = [int(math.floor(s * f)) for s, f in zip(x.shape[2:], scale_factors)]
    return sizes, list(scale_factors)


def _scale(in_size, out_size, factor):
    """compute_scales_value: 1/factor when a factor was given, else in/out."""
    return np.float32(1.0 / factor) if factor else np.float32(in_size) / np.float32(out_size)


def _nearest_index(in_size, out_size, factor):
    dst = np.arange(out_size, dtype=np.float32)
    return np.minimum(np.floor(dst * _scale(in_size, out_size, factor)).astype(np.int64), in_size - 1)


def upsample_nearest(x, output_size, scale_factors=None):
    """upsample_nearest{1,2,3}d.vec(x, output_size, scale_factors)."""
    sizes, factors = _out_sizes(x, output_size, scale_factors)
    for i, (out, f) in enumerate(zip(sizes, factors)):
        x = jnp.take(x, jnp.asarray(_nearest_index(x.shape[2 + i], out, f)), axis=2 + i)
    return x


def _linear_weights(in_size, out_size, align_corners, factor):
    dst = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
        src = dst * scale
    else:
        src = np.maximum(_scale(in_size, out_size, factor) * (dst + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0, 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def upsample_linear(x, output_size, align_corners, scale_factors=None):
    """upsample_{bilinear2d,linear1d,trilinear3d}.vec, one axis at a time."""
    sizes, factors = _out_sizes(x, output_size, scale_factors)
    for i, (out, f) in enumerate(zip(sizes, factors)):
        axis = 2 + i
        i0, i1, w0, w1 = _linear_weights(x.shape[axis], out, align_corners, f)
        shape = [1] * x.ndim
        shape[axis] = out
        w0, w1 = (jnp.asarray(w, x.dtype).reshape(shape) for w in (w0, w1))
        x = jnp.take(x, jnp.asarray(i0), axis=axis) * w0 + jnp.take(x, jnp.asarray(i1), axis=axis) * w1
    return x
