"""The CPU decode attention kernel (mmjax/kernels/cpu/decode_attention.cc) against
decode_attention_reference, and the one place that routes to it (kernels/attention.py).
Tolerance float32 1e-5, as for the other attention kernels (the sums run in another order)."""
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


def rand(*shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


def max_err(a, b):
    return float(jnp.max(jnp.abs(a - b)))


def test_builds_here():
    assert ffi.available(), ffi.error()


# Head dims 64/80/128 (the unrolled kernels) and one that is not a multiple of the 16-lane
# vector (7, the generic loops); G 1..7 (7 at head dim 128 runs in chunks of 2 heads); cache
# lengths below, at and not at multiples of 16 (keys are summed 16 at a time, then one by
# one); rows with a start, a short range, an empty range (output 0) and the whole cache.
@pytest.mark.parametrize("B,K,G,S,H", [(1, 4, 3, 416, 64), (4, 2, 1, 37, 80), (2, 3, 2, 16, 128),
                                       (3, 1, 4, 100, 7), (8, 4, 3, 64, 64), (2, 1, 7, 50, 128),
                                       (2, 2, 3, 9, 64)])
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
    assert cda.TARGET not in lowered(run, q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                     v.astype(jnp.bfloat16), mask)
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
