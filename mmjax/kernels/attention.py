"""The one place that chooses how attention is computed.

Axis legend: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.

`attention(q, k, v, mask, kernels=...)` takes the model's layouts (q [B, T, N, H], k/v
[B, S, K, H], or the KV cache's [B, K, S, H] with kv_layout="BKSH") and a MaskSpec. What runs
is the KernelPolicy's choice for the platform the program is *lowered* for (policy.dispatch,
a jax.lax.platform_dependent), each branch checking in Python what its kernel can take:
  * cpu  "cpu":    one query against the cache (a decode step) -> cpu.decode_attention, a
                   prompt against its own keys (prefill) -> cpu.prefill_attention, when float32
                   without segment ids (their `eligible`); anything else the XLA path.
  * any  "xla":    xla_attention below: einsum softmax, exact against HF eager attention; with
                   contiguous segments per query block over its key window (segment_attention).
  * cpu / cuda / rocm "pallas": the Triton kernels, decode_attention for one query without
                   segments, flash_attention otherwise; compiled on GPU, interpret=True on CPU.
  * tpu  "pallas": JAX's TPU kernels (tpu_attention: paged decode, splash prefill) for the
                   masks they express exactly, the XLA path for the rest.
"""
from __future__ import annotations

import functools

import jax

from mmjax.errors import InputError
from mmjax.kernels import kv_cache, tpu_attention
from mmjax.kernels.cpu import decode_attention as cpu_decode
from mmjax.kernels.cpu import prefill_attention as cpu_prefill
from mmjax.kernels.decode_attention import decode_attention
from mmjax.kernels.flash_attention import check_qkv, flash_attention
from mmjax.kernels.mask import MaskSpec, decode_range, make_mask, query_ranges
from mmjax.kernels.policy import KernelPolicy, dispatch
from mmjax.kernels.reference import softmax_attention
from mmjax.kernels.segment_attention import segment_attention

__all__ = ["MaskSpec", "attention", "decode_range", "make_mask", "query_ranges", "xla_attention"]

DEFAULT = KernelPolicy()


def xla_attention(q, k, v, mask: MaskSpec, scale: float | None = None, kv_layout: str = "BSKH"):
    """Einsum attention with the mask built from MaskSpec; softmax in float32.

    kv_layout "BKSH" takes k/v as [B, K, S, H] (the KV cache's layout): the contractions then
    have their batch axes (B, K) leading, so XLA needs no per-step transpose of the cache.
    Numerics follow HF eager attention (reference.softmax_attention); masked logits are -inf and
    a row with no visible key gives 0, so padded rows stay 0 and never NaN.

    Contiguous segments (packed images, windows) never build the [T, S] mask: each block of
    queries attends to its own key window (segment_attention.py: cost T x window, not T x S)."""
    if mask.contiguous_segments and kv_layout == "BSKH":
        return segment_attention(q, k, v, mask, scale)
    kv_len = k.shape[1] if kv_layout == "BSKH" else k.shape[2]
    ok = None if mask.is_trivial else make_mask(mask, q.shape[1], kv_len)[:, :, None]  # [B|1, 1, 1, T, S]
    return softmax_attention(q, k, v, ok, scale, kv_layout=kv_layout)


def _bskh(x):
    """The [B, S, K, H] view of a BKSH array, as a shape only (check_qkv reads shapes)."""
    return jax.ShapeDtypeStruct((x.shape[0], x.shape[2], x.shape[1], x.shape[3]), x.dtype)


def attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H] (kv_layout "BSKH") or [B, K, S, H] ("BKSH", the KV cache)
    v: jax.Array,  # like k
    mask: MaskSpec,
    *,
    kernels: KernelPolicy = DEFAULT,
    scale: float | None = None,
    kv_layout: str = "BSKH",
    k_scale: jax.Array | None = None,  # an int8 cache's scales [B, K, S] (mmjax.kernels.kv_cache)
    v_scale: jax.Array | None = None,
) -> jax.Array:  # [B, T, N, H] in q's dtype
    if (k_scale is None) != (v_scale is None) or (k_scale is not None and kv_layout != "BKSH"):
        raise InputError("attention: k_scale and v_scale come together, with an int8 BKSH cache")
    if kv_layout not in ("BSKH", "BKSH"):
        raise InputError(f"attention: kv_layout={kv_layout!r} is not 'BSKH' or 'BKSH'")
    if not isinstance(kernels, KernelPolicy):
        raise InputError(f"attention: kernels={kernels!r} is not a KernelPolicy")
    kb, vb = (k, v) if kv_layout == "BSKH" else (_bskh(k), _bskh(v))
    narrow = k_scale is not None or k.dtype != q.dtype  # a cache stored as int8 / narrower than the model
    # shapes as the float kernels see them (a narrow cache is widened to q's dtype for them)
    widened = [jax.ShapeDtypeStruct(x.shape, q.dtype) for x in (kb, vb)] if narrow else (kb, vb)
    check_qkv(q, *widened)
    mask.check(q.shape[0], q.shape[1], kb.shape[1])
    plan = functools.partial(_plan, kernels, q, kb, mask, scale, kv_layout, narrow, k_scale, v_scale)
    return dispatch(kernels, plan, q, k, v, mask, k_scale, v_scale)


def _widen(fn):
    """fn(q, k, v, mask) of a float kernel -> fn(q, k, v, mask, k_scale, v_scale) over a narrow
    cache (int8 + scales, or a dtype narrower than q's), widened to q's dtype first."""
    def run(q, k, v, mask, k_scale, v_scale):
        if k_scale is not None:
            k, v = kv_cache.dequantize(k, k_scale, q.dtype), kv_cache.dequantize(v, v_scale, q.dtype)
        return fn(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    return run


def _plan(kernels: KernelPolicy, q, kb, mask: MaskSpec, scale, kv_layout: str, narrow: bool, k_scale, v_scale,
          platform: str | None):
    """(key, fn(q, k, v, mask, k_scale, v_scale)) for one lowering platform. The C++ decode kernel
    reads float32, bfloat16 and int8(+scales) caches itself; every other kernel gets floats."""
    if platform is not None and kernels.attention(platform) == "cpu" and kv_layout == "BKSH" \
            and cpu_decode.eligible(q, kb, kb, mask, k_scale, v_scale):
        return ("cpu_decode",), functools.partial(_cpu_decode, scale=scale)
    if narrow:
        key, fn = _plan_float(kernels, jax.ShapeDtypeStruct(q.shape, q.dtype),
                              jax.ShapeDtypeStruct(kb.shape, q.dtype), mask, scale, kv_layout, platform)
        return key, _widen(fn)
    key, fn = _plan_float(kernels, q, kb, mask, scale, kv_layout, platform)
    return key, (lambda q, k, v, m, ks, vs: fn(q, k, v, m))


def _plan_float(kernels: KernelPolicy, q, kb, mask: MaskSpec, scale, kv_layout: str, platform: str | None):
    """(key, fn(q, k, v, mask)) for one lowering platform (None: any platform not traced).
    q, kb ([B, S, K, H] shape) and mask are this call's, for the static eligibility checks."""
    xla = ("xla",), lambda q, k, v, m: xla_attention(q, k, v, m, scale, kv_layout)
    choice = "xla" if platform is None else kernels.attention(platform)
    cache = kv_layout == "BKSH"
    if choice == "xla":
        return xla
    if choice == "cpu":
        if cache and cpu_decode.eligible(q, kb, kb, mask):  # one token against the cache
            return ("cpu_decode",), functools.partial(_cpu_decode, scale=scale)
        if not cache and cpu_prefill.eligible(q, kb, kb, mask):  # a prompt's own keys
            return ("cpu_prefill",), functools.partial(_cpu_prefill, scale=scale)
        return xla
    # The Pallas kernels have no derivative of their own: jax.grad takes the XLA path's (a
    # platform_dependent differentiates every branch, whichever platform it runs on).
    differentiable = functools.partial(_with_xla_vjp, scale=scale, kv_layout=kv_layout)
    if platform == "tpu":
        if cache and tpu_attention.paged_eligible(q, _bskh(kb), mask):
            return ("tpu_paged",), differentiable(functools.partial(_tpu_paged, scale=scale))
        if tpu_attention.splash_eligible(q, kb, mask):
            return ("tpu_splash",), differentiable(functools.partial(_tpu_splash, scale=scale, kv_layout=kv_layout))
        return xla
    interpret = platform == "cpu"  # "pallas" on CPU: the Triton kernels in interpret mode
    triton = functools.partial(_triton, scale=scale, kv_layout=kv_layout, interpret=interpret)
    return ("triton", interpret), differentiable(triton)


def _with_xla_vjp(kernel, *, scale, kv_layout):
    """kernel(q, k, v, mask) as a custom_vjp whose backward pass is xla_attention's."""
    f = jax.custom_vjp(kernel)

    def bwd(res, g):
        q, k, v, mask = res
        dq, dk, dv = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask, scale, kv_layout), q, k, v)[1](g)
        return dq, dk, dv, None  # the mask's integer arrays have no cotangent

    f.defvjp(lambda q, k, v, mask: (f(q, k, v, mask), (q, k, v, mask)), bwd)
    return f


def _cpu_decode(q, k, v, mask, k_scale=None, v_scale=None, *, scale):  # k/v [B, K, S, H]
    start, end = decode_range(mask, q.shape[0], k.shape[2])
    return cpu_decode.decode_attention_cpu(q, k, v, start, end, scale, k_scale, v_scale)


def _cpu_prefill(q, k, v, mask, *, scale):  # k/v [B, S, K, H]
    start, end = query_ranges(mask, q.shape[0], q.shape[1], k.shape[1])
    return cpu_prefill.prefill_attention_cpu(q, k, v, start, end, scale)


def _tpu_paged(q, k, v, mask, *, scale):  # k/v [B, K, S, H]
    _, end = decode_range(mask, q.shape[0], k.shape[2])
    return tpu_attention.paged_decode(q, k, v, end, scale)


def _tpu_splash(q, k, v, mask, *, scale, kv_layout):
    if kv_layout == "BKSH":
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    return tpu_attention.splash_attention(q, k, v, mask, scale)


def _triton(q, k, v, mask, *, scale, kv_layout, interpret):
    if kv_layout == "BKSH":  # the Triton kernels read [B, S, K, H]
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    if q.shape[1] == 1 and mask.q_segment_ids is None:
        start, end = decode_range(mask, q.shape[0], k.shape[1])
        return decode_attention(q, k, v, end, kv_starts=start, scale=scale, interpret=interpret)
    return flash_attention(q, k, v, mask=mask, scale=scale, interpret=interpret)
