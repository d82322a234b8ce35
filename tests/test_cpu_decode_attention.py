"""The CPU decode attention kernels (mmjax/kernels/cpu/decode_attention.cc) against
decode_attention_reference, and the one place that routes to them (kernels/attention.py).
Tolerance float32 1e-5, as for the other attention kernels (the sums run in another order).
bfloat16 and int8 caches are checked against decode_attention_cpu_reference, which dequantizes
the same cache: both sides then multiply the same float32 numbers, so 1e-5 holds for them too
(quantization error is not in it). A bfloat16 query's output is that float32 result rounded to
bfloat16 on both sides; a sum that lands near a rounding boundary may round the other way, so
the bound there is one bfloat16 ulp at |out| < 2 (2^-7, written 1e-2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels import attention as attention_module
from mmjax.kernels.attention import MaskSpec, xla_attention
from mmjax.kernels.cpu import decode_attention as cda
from mmjax.kernels.cpu import ffi
from mmjax.kernels.decode_attention import decode_attention_reference
from mmjax.kernels.policy import KernelPolicy

TOL = 1e-5
TOL_BF16_OUT = 1e-2


def rand(*shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


def max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def quantize(x):
    """x [B, K, S, H] -> int8 [B, K, S, H], scale [B, K, S]: symmetric, one scale per token and
    kv head (the layout decode_attention_cpu takes)."""
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), 1e-8) / 127.0
    return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


def jitted_kernel():
    """decode_attention_cpu jitted, called (q, k, v, start, end, k_scale, v_scale); a new trace each
    time, so it reads cda.SPLIT_ROWS as it is then."""
    return jax.jit(lambda *a: cda.decode_attention_cpu(*a[:5], None, *a[5:]))


def cache(x, dtype):
    """x as a cache of `dtype`: (values, scale or None)."""
    return quantize(x) if dtype == "int8" else (x.astype(dtype), None)


def test_builds_here():
    assert ffi.available(), ffi.error()


# Head dims 64/80/128 (the unrolled kernels) and one that is not a multiple of the 16-lane
# vector (7, the generic loops); G 1..7 (7 at head dim 128 runs in chunks of 2 heads); cache
# lengths below, at and not at multiples of 16 (keys are summed 16 at a time, then one by
# one); rows with a start, a short range, an empty range (output 0) and the whole cache; rows
# of more than 1024 keys, which run in parts merged afterwards (S 1100 and 1500: 2 parts).
@pytest.mark.parametrize("B,K,G,S,H", [(1, 4, 3, 416, 64), (4, 2, 1, 37, 80), (2, 3, 2, 16, 128),
                                       (3, 1, 4, 100, 7), (8, 4, 3, 64, 64), (2, 1, 7, 50, 128),
                                       (2, 2, 3, 9, 64), (3, 1, 4, 1500, 64), (2, 2, 3, 1100, 7)])
def test_matches_reference(B, K, G, S, H):
    q = rand(B, 1, K * G, H, seed=1, scale=2.0)  # large logits: the max subtraction matters
    k, v = rand(B, K, S, H, seed=2), rand(B, K, S, H, seed=3)
    rng = np.random.default_rng(4)
    start = rng.integers(0, 3, B).astype(np.int32)
    end = rng.integers(S // 2, S + 1, B).astype(np.int32)
    if B > 1:
        end[0] = start[0]  # nothing visible
        end[-1], start[-1] = S, 0
    out = jax.jit(cda.decode_attention_cpu)(q, k, v, jnp.asarray(start), jnp.asarray(end))
    ref = decode_attention_reference(q, k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.asarray(end),
                                     kv_starts=jnp.asarray(start))
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert max_err(out, ref) <= TOL
    if B > 1:
        assert float(jnp.max(jnp.abs(out[0]))) == 0.0


def masks(B, S):
    pos = jnp.arange(B, dtype=jnp.int32) * 7 + 20
    return {
        "causal": MaskSpec(causal=True, q_offset=pos, kv_lengths=pos + 1),
        "window": MaskSpec(causal=True, q_offset=pos, kv_lengths=pos + 1, sliding_window=9),
        "prefix": MaskSpec(causal=True, q_offset=pos, prefix_lengths=jnp.full((B,), 25, jnp.int32)),
        "bidirectional": MaskSpec(causal=False, kv_lengths=pos),
        "trivial": MaskSpec(causal=False),
    }


def lowered(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("name", ["causal", "window", "prefix", "bidirectional", "trivial"])
def test_attention_routes_decode_steps_here(name):
    B, S, K, G, H = 3, 48, 2, 2, 64
    mask = masks(B, S)[name]
    q, k, v = rand(B, 1, K * G, H, seed=5), rand(B, K, S, H, seed=6), rand(B, K, S, H, seed=7)
    run = lambda q, k, v, m: attention_module.attention(q, k, v, m, kv_layout="BKSH")  # the default policy
    assert cda.TARGET in lowered(run, q, k, v, mask)
    out = jax.jit(run)(q, k, v, mask)
    ref = jax.jit(lambda q, k, v, m: xla_attention(q, k, v, m, kv_layout="BKSH"))(q, k, v, mask)
    assert max_err(out, ref) <= TOL


def test_what_stays_on_xla_ops(monkeypatch):
    B, S, K, G, H = 2, 32, 2, 2, 64
    q, k, v = rand(B, 1, K * G, H, seed=8), rand(B, K, S, H, seed=9), rand(B, K, S, H, seed=10)
    mask = MaskSpec(causal=True, q_offset=jnp.array([5, 9]))
    run = lambda q, k, v, m: attention_module.attention(q, k, v, m, kv_layout="BKSH")
    assert cda.TARGET not in lowered(run, q.astype(jnp.float16), k.astype(jnp.float16),
                                     v.astype(jnp.float16), mask)  # bfloat16 has its own kernel
    q2 = rand(B, 2, K * G, H, seed=11)  # two query tokens
    assert cda.TARGET not in lowered(run, q2, k, v, mask)
    seg = MaskSpec(causal=False, q_segment_ids=jnp.zeros((B, 1), jnp.int32),
                   kv_segment_ids=jnp.zeros((B, S), jnp.int32))
    assert cda.TARGET not in lowered(run, q, k, v, seg)
    mesh = KernelPolicy().without_cpu_custom_calls()  # what mmjax.load does under a mesh
    with_policy = lambda kernels: lambda q, k, v, m: attention_module.attention(q, k, v, m, kernels=kernels,
                                                                                kv_layout="BKSH")
    assert cda.TARGET not in lowered(with_policy(mesh), q, k, v, mask)
    monkeypatch.setenv("MMJAX_CPU_ATTENTION", "0")  # read by from_env (mmjax.load), not while tracing
    assert cda.TARGET not in lowered(with_policy(KernelPolicy.from_env()), q, k, v, mask)
    assert cda.TARGET in lowered(run, q, k, v, mask)


def test_under_vmap():
    q, k, v = rand(3, 2, 1, 4, 64, seed=12), rand(3, 2, 2, 20, 64, seed=13), rand(3, 2, 2, 20, 64, seed=14)
    start, end = jnp.zeros((3, 2), jnp.int32), jnp.array([[20, 5], [1, 20], [0, 7]], jnp.int32)
    out = jax.jit(jax.vmap(cda.decode_attention_cpu))(q, k, v, start, end)
    for i in range(3):
        ref = decode_attention_reference(q[i], k[i].swapaxes(1, 2), v[i].swapaxes(1, 2), end[i], kv_starts=start[i])
        assert max_err(out[i], ref) <= TOL


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="q \\[B, 1, N, H\\]"):
        cda.decode_attention_cpu(rand(1, 2, 4, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8), jnp.zeros(1, jnp.int32),
                                 jnp.ones(1, jnp.int32))


def test_grad_matches_xla():
    # The custom call has no derivative of its own; jax.grad takes the reference's.
    B, S, K, G, H = 2, 30, 2, 2, 64
    q, k, v = rand(B, 1, K * G, H, seed=15), rand(B, K, S, H, seed=16), rand(B, K, S, H, seed=17)
    mask = MaskSpec(causal=True, q_offset=jnp.array([12, 29]))
    loss = lambda q, k, v, kernels: jnp.sum(jnp.sin(attention_module.attention(q, k, v, mask, kernels=kernels,
                                                                               kv_layout="BKSH")))
    grad = lambda kernels: jax.jit(jax.grad(lambda *a: loss(*a, kernels), argnums=(0, 1, 2)))(q, k, v)
    assert cda.TARGET in lowered(lambda *a: loss(*a, KernelPolicy()), q, k, v)
    got = grad(KernelPolicy())
    want = grad(KernelPolicy(attention_cpu="xla"))
    for a, b in zip(got, want):
        assert max_err(a, b) <= TOL


# bfloat16 and int8 caches: GQA ratios 1/4/8, head dims 64/80/128 (whole native vectors: the
# unrolled kernels) and 7 (plain loops), cache lengths not multiples of the 8- or 16-lane vector,
# rows with a start, an empty range and the whole cache; q float32 and bfloat16.
NARROW_SHAPES = [(2, 4, 1, 37, 64), (3, 2, 4, 100, 80), (2, 1, 8, 203, 128), (4, 2, 4, 9, 64),
                 (2, 1, 8, 50, 7), (1, 4, 4, 416, 128), (3, 1, 3, 1300, 64)]


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,K,G,S,H", NARROW_SHAPES)
def test_narrow_cache_matches_reference(B, K, G, S, H, cache_dtype, q_dtype):
    q = rand(B, 1, K * G, H, seed=1, scale=2.0).astype(q_dtype)
    (k, ks), (v, vs) = cache(rand(B, K, S, H, seed=2), cache_dtype), cache(rand(B, K, S, H, seed=3), cache_dtype)
    rng = np.random.default_rng(4)
    start = rng.integers(0, 3, B).astype(np.int32)
    end = rng.integers(S // 2, S + 1, B).astype(np.int32)
    if B > 1:
        end[0] = start[0]  # nothing visible
        end[-1], start[-1] = S, 0
    start, end = jnp.asarray(start), jnp.asarray(end)
    run = jitted_kernel()
    out = run(q, k, v, start, end, ks, vs)
    assert cda.TARGETS[cache_dtype] in lowered(run, q, k, v, start, end, ks, vs)
    ref = cda.decode_attention_cpu_reference(q, k, v, start, end, None, ks, vs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert max_err(out, ref) <= (TOL if q_dtype == "float32" else TOL_BF16_OUT)
    if B > 1:
        assert float(jnp.max(jnp.abs(out[0].astype(jnp.float32)))) == 0.0


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "int8"])
def test_a_rows_result_does_not_depend_on_its_batch(cache_dtype):
    """Rows of more than 1024 keys run in parts (flash-decoding) split by their own length only:
    each row gives the same bits alone as in any batch, long or short rows beside it (so the
    serving engine's answers stay mmjax.generate's whatever else is running)."""
    B, K, G, S, H = 4, 1, 4, 2100, 64
    q = rand(B, 1, K * G, H, seed=1, scale=2.0)
    (k, ks), (v, vs) = cache(rand(B, K, S, H, seed=2), cache_dtype), cache(rand(B, K, S, H, seed=3), cache_dtype)
    start = jnp.asarray([0, 5, 0, 0], jnp.int32)
    end = jnp.asarray([2100, 1033, 300, 1025], jnp.int32)  # 3, 2, 1 and 2 parts
    run = jitted_kernel()
    together = np.asarray(run(q, k, v, start, end, ks, vs))
    for b in range(B):
        one = lambda x: None if x is None else x[b:b + 1]
        alone = np.asarray(run(q[b:b + 1], k[b:b + 1], v[b:b + 1], start[b:b + 1], end[b:b + 1], one(ks), one(vs)))
        np.testing.assert_array_equal(alone, together[b:b + 1])
    ref = cda.decode_attention_cpu_reference(q, k, v, start, end, None, ks, vs)
    assert max_err(jnp.asarray(together), ref) <= TOL


@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_split_rows_runs_the_split(cache_dtype, monkeypatch):
    """With split_rows small, rows of 300 keys run in parts: other sums (the bits differ from
    the unsplit call, so the split path ran), the same result within TOL."""
    B, K, G, S, H = 3, 2, 3, 300, 64
    q = rand(B, 1, K * G, H, seed=1, scale=2.0)
    (k, ks), (v, vs) = cache(rand(B, K, S, H, seed=2), cache_dtype), cache(rand(B, K, S, H, seed=3), cache_dtype)
    start, end = jnp.asarray([0, 7, 0], jnp.int32), jnp.asarray([300, 250, 17], jnp.int32)
    run = lambda: np.asarray(jitted_kernel()(q, k, v, start, end, ks, vs))  # traced anew: reads SPLIT_ROWS
    whole = run()
    monkeypatch.setattr(cda, "SPLIT_ROWS", 40)  # 8, 7 and 1 parts
    parts = run()
    assert not np.array_equal(parts[:2], whole[:2])
    np.testing.assert_array_equal(parts[2], whole[2])  # 17 keys: one part, the same code
    ref = cda.decode_attention_cpu_reference(q, k, v, start, end, None, ks, vs)
    assert max_err(jnp.asarray(parts), ref) <= TOL and max_err(jnp.asarray(whole), ref) <= TOL


def test_int8_scales_are_per_token_and_head():
    # Scales far from 1 and different per (b, k, s): a kernel applying one row's scale to another
    # would be off by far more than 1e-5.
    B, K, G, S, H = 2, 2, 4, 40, 64
    q = rand(B, 1, K * G, H, seed=20)
    k = jnp.asarray(np.random.default_rng(23).integers(-127, 128, (B, K, S, H)), jnp.int8)
    v = jnp.asarray(np.random.default_rng(24).integers(-127, 128, (B, K, S, H)), jnp.int8)
    ks = jnp.asarray(np.random.default_rng(25).uniform(1e-4, 2e-2, (B, K, S)), jnp.float32)
    vs = jnp.asarray(np.random.default_rng(26).uniform(1e-3, 1.0, (B, K, S)), jnp.float32)
    start, end = jnp.array([0, 3], jnp.int32), jnp.array([S, 31], jnp.int32)
    out = jax.jit(cda.decode_attention_cpu)(q, k, v, start, end, None, ks, vs)
    ref = cda.decode_attention_cpu_reference(q, k, v, start, end, None, ks, vs)
    assert max_err(out, ref) <= TOL * float(jnp.max(jnp.abs(ref)))


def test_eligible_by_dtype():
    B, K, G, S, H = 2, 2, 2, 16, 64
    mask = MaskSpec(causal=True, q_offset=jnp.array([5, 9]))
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    q = spec((B, 1, K * G, H), jnp.float32)
    kv = lambda dtype: spec((B, S, K, H), dtype)  # attention() passes k in [B, S, K, H] shape
    scale = spec((B, K, S), jnp.float32)
    assert cda.eligible(q, kv(jnp.float32), kv(jnp.float32), mask)
    assert cda.eligible(q, kv(jnp.bfloat16), kv(jnp.bfloat16), mask)
    assert cda.eligible(spec(q.shape, jnp.bfloat16), kv(jnp.bfloat16), kv(jnp.bfloat16), mask)
    assert cda.eligible(q, kv(jnp.int8), kv(jnp.int8), mask, k_scale=scale, v_scale=scale)
    assert not cda.eligible(q, kv(jnp.int8), kv(jnp.int8), mask)  # int8 needs its scales
    assert not cda.eligible(q, kv(jnp.int8), kv(jnp.int8), mask, k_scale=scale)
    assert not cda.eligible(q, kv(jnp.int8), kv(jnp.int8), mask, k_scale=scale,
                            v_scale=spec((B, K, S), jnp.bfloat16))
    assert not cda.eligible(q, kv(jnp.bfloat16), kv(jnp.bfloat16), mask, k_scale=scale, v_scale=scale)
    assert not cda.eligible(q, kv(jnp.bfloat16), kv(jnp.float32), mask)  # k and v of one dtype
    assert not cda.eligible(q, kv(jnp.float16), kv(jnp.float16), mask)
    assert not cda.eligible(spec(q.shape, jnp.float16), kv(jnp.float32), kv(jnp.float32), mask)


def test_rejects_narrow_caches_it_cannot_do():
    q, start, end = rand(1, 1, 4, 8), jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32)
    k8, ks = quantize(rand(1, 2, 5, 8))
    with pytest.raises(ValueError, match="int8 cache needs k_scale and v_scale"):
        cda.decode_attention_cpu(q, k8, k8, start, end)
    with pytest.raises(ValueError, match="int8 cache needs k_scale and v_scale"):
        cda.decode_attention_cpu(q, k8, k8, start, end, None, ks, ks[:, :, :4])
    with pytest.raises(ValueError, match="with an int8 cache only"):
        cda.decode_attention_cpu(q, k8.astype(jnp.bfloat16), k8.astype(jnp.bfloat16), start, end, None, ks, ks)
    with pytest.raises(ValueError, match="both one of"):
        cda.decode_attention_cpu(q, k8.astype(jnp.bfloat16), k8.astype(jnp.float32), start, end)


def test_attention_routes_bf16_decode_steps_here():
    # A bfloat16 model's decode step (q, k, v all bfloat16) now takes the bfloat16 kernel.
    B, S, K, G, H = 3, 48, 2, 2, 64
    mask = masks(B, S)["causal"]
    q, k, v = (rand(B, 1, K * G, H, seed=30).astype(jnp.bfloat16), rand(B, K, S, H, seed=31).astype(jnp.bfloat16),
               rand(B, K, S, H, seed=32).astype(jnp.bfloat16))
    run = lambda q, k, v, m: attention_module.attention(q, k, v, m, kv_layout="BKSH")
    assert cda.TARGETS["bfloat16"] in lowered(run, q, k, v, mask)
    out = jax.jit(run)(q, k, v, mask)
    ref = jax.jit(lambda q, k, v, m: xla_attention(q, k, v, m, kv_layout="BKSH"))(q.astype(jnp.float32),
                                                                               k, v, mask)
    assert out.dtype == jnp.bfloat16 and max_err(out, ref) <= TOL_BF16_OUT


def test_narrow_caches_under_vmap():
    q = rand(3, 2, 1, 8, 64, seed=40)
    k8, ks = quantize(rand(3, 2, 2, 20, 64, seed=41))
    v8, vs = quantize(rand(3, 2, 2, 20, 64, seed=42))
    start, end = jnp.zeros((3, 2), jnp.int32), jnp.array([[20, 5], [1, 20], [0, 7]], jnp.int32)
    out = jax.jit(jax.vmap(lambda *a: cda.decode_attention_cpu(*a[:5], None, *a[5:])))(q, k8, v8, start, end, ks, vs)
    for i in range(3):
        ref = cda.decode_attention_cpu_reference(q[i], k8[i], v8[i], start[i], end[i], None, ks[i], vs[i])
        assert max_err(out[i], ref) <= TOL


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "int8"])
def test_narrow_cache_grad_is_the_references(cache_dtype):
    # bfloat16: gradients for q, k and v (the reference's, through the dequantizing cast).
    # int8: for q and the scales; the int8 values get none (zero).
    B, S, K, G, H = 2, 30, 2, 2, 64
    q = rand(B, 1, K * G, H, seed=50)
    (k, ks), (v, vs) = cache(rand(B, K, S, H, seed=51), cache_dtype), cache(rand(B, K, S, H, seed=52), cache_dtype)
    start, end = jnp.array([0, 4], jnp.int32), jnp.array([13, 30], jnp.int32)
    loss = lambda f: lambda q, k, v, ks, vs: jnp.sum(jnp.sin(f(q, k, v, start, end, None, ks, vs)))
    argnums = (0, 3, 4) if cache_dtype == "int8" else (0, 1, 2)  # q, k_scale, v_scale | q, k, v
    got = jax.jit(jax.grad(loss(cda.decode_attention_cpu), argnums=argnums))(q, k, v, ks, vs)
    want = jax.grad(loss(cda.decode_attention_cpu_reference), argnums=argnums)(q, k, v, ks, vs)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and max_err(a, b) <= TOL * max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
    if cache_dtype == "int8":
        dk = jax.grad(loss(cda.decode_attention_cpu), argnums=1, allow_int=True)(q, k, v, ks, vs)
        assert dk.dtype == jax.dtypes.float0
