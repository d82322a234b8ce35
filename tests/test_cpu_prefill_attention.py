"""The CPU prefill attention kernel (mmjax/kernels/cpu/prefill_attention.cc) against
attention_reference for every mask kind a prompt uses, and the one place that routes to it
(kernels/attention.py). Tolerance float32 1e-5, as for the other attention kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels import attention as attention_module
from mmjax.kernels.attention import MaskSpec, query_ranges, xla_attention
from mmjax.kernels.cpu import ffi
from mmjax.kernels.cpu import prefill_attention as cpa
from mmjax.kernels.flash_attention import attention_reference, make_mask
from mmjax.kernels.policy import KernelPolicy

TOL = 1e-5


def rand(*shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


def max_err(a, b):
    return float(jnp.max(jnp.abs(a - b)))


def test_builds_here():
    assert ffi.available(), ffi.error()


def masks(B, T, S):
    lengths = jnp.array([S, S - 7, 3, 1][:B], jnp.int32)
    return {
        "causal": MaskSpec(causal=True),
        "causal+padding": MaskSpec(causal=True, kv_lengths=lengths),
        "causal+offset": MaskSpec(causal=True, q_offset=jnp.array([S - T, 0, 2, 5][:B], jnp.int32)),
        "window": MaskSpec(causal=True, sliding_window=19),
        "prefix": MaskSpec(causal=True, prefix_lengths=jnp.array([40, 0, 5, 70][:B], jnp.int32)),
        "bidirectional": MaskSpec(causal=False, kv_lengths=lengths),
        "bidirectional+window": MaskSpec(causal=False, sliding_window=9),
    }


# T and S not multiples of the 16-token query block, the 32-key vectors or the 128-key
# softmax step, and longer than one step; G 1..4; head dims 64/80/128 (80: a last half
# register tile); rows that see nothing (kv_lengths 1 and 3 with an offset); large logits.
@pytest.mark.parametrize("name", list(masks(1, 1, 1)))
@pytest.mark.parametrize("B,T,S,N,K,H", [(2, 150, 150, 6, 2, 64), (3, 37, 37, 4, 4, 80), (1, 20, 20, 4, 1, 128)])
def test_matches_reference(name, B, T, S, N, K, H):
    mask = masks(B, T, S)[name]
    q, k, v = rand(B, T, N, H, seed=1, scale=2.0), rand(B, S, K, H, seed=2), rand(B, S, K, H, seed=3)
    start, end = jax.jit(query_ranges, static_argnums=(1, 2, 3))(mask, B, T, S)
    # the intervals are the mask: same visible set as make_mask
    ok = np.broadcast_to(np.asarray(make_mask(mask, T, S))[:, 0], (B, T, S))  # [B|1, T, S]
    s = np.arange(S)[None, None, :]
    np.testing.assert_array_equal(ok, (s >= np.asarray(start)[..., None]) & (s < np.asarray(end)[..., None]))
    out = jax.jit(cpa.prefill_attention_cpu)(q, k, v, start, end)
    ref = attention_reference(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert max_err(out, ref) <= TOL


def lowered(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def test_attention_routes_prompts_here(monkeypatch):
    B, T, N, K, H = 2, 24, 4, 2, 64
    q, k, v = rand(B, T, N, H, seed=4), rand(B, T, K, H, seed=5), rand(B, T, K, H, seed=6)
    mask = MaskSpec(causal=True, kv_lengths=jnp.array([24, 10]))
    run = lambda q, k, v, m: attention_module.attention(q, k, v, m)  # the default KernelPolicy
    assert cpa.TARGET in lowered(run, q, k, v, mask)
    out = jax.jit(run)(q, k, v, mask)
    ref = jax.jit(lambda q, k, v, m: xla_attention(q, k, v, m))(q, k, v, mask)
    assert max_err(out, ref) <= TOL
    # what stays on XLA's ops: bf16, head dims not a multiple of 16, segments, a policy without it
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    assert cpa.TARGET not in lowered(run, *bf, mask)
    q8, k8, v8 = rand(B, T, N, 8, seed=7), rand(B, T, K, 8, seed=8), rand(B, T, K, 8, seed=9)
    assert cpa.TARGET not in lowered(run, q8, k8, v8, mask)
    seg = MaskSpec(causal=False, q_segment_ids=jnp.zeros((B, T), jnp.int32))
    assert cpa.TARGET not in lowered(run, q, k, v, seg)
    mesh = KernelPolicy().without_cpu_custom_calls()  # what mmjax.load does under a mesh
    assert cpa.TARGET not in lowered(lambda *a: attention_module.attention(*a, kernels=mesh), q, k, v, mask)
    monkeypatch.setenv("MMJAX_CPU_ATTENTION", "0")  # read by from_env (mmjax.load), not while tracing
    off = KernelPolicy.from_env()
    assert off.attention_cpu == "xla"
    assert cpa.TARGET not in lowered(lambda *a: attention_module.attention(*a, kernels=off), q, k, v, mask)
    assert cpa.TARGET in lowered(run, q, k, v, mask)


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="16 \\| H"):
        cpa.prefill_attention_cpu(rand(1, 4, 2, 8), rand(1, 4, 2, 8), rand(1, 4, 2, 8),
                                  jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))


def test_out_of_range_intervals_are_clamped():
    # A direct caller may pass any ints: start < 0 and end > S mean the whole range, as for
    # the decode kernel (query_ranges itself always clips). S = 37 leaves zero-padded key
    # slots in the kernel's 32-key vectors, which must never count.
    B, T, S, N, K, H = 2, 20, 37, 4, 2, 64
    q, k, v = rand(B, T, N, H, seed=10), rand(B, S, K, H, seed=11), rand(B, S, K, H, seed=12)
    rng = np.random.default_rng(13)
    start = rng.integers(-5, 10, (B, T)).astype(np.int32)
    end = rng.integers(20, S + 30, (B, T)).astype(np.int32)
    run = jax.jit(cpa.prefill_attention_cpu)
    raw = run(q, k, v, jnp.asarray(start), jnp.asarray(end))
    clipped = run(q, k, v, jnp.asarray(np.clip(start, 0, S)), jnp.asarray(np.clip(end, 0, S)))
    assert float(jnp.max(jnp.abs(raw - clipped))) == 0.0


def test_grad_matches_xla():
    # The custom call has no derivative of its own; jax.grad takes the reference's.
    B, T, N, K, H = 2, 21, 4, 2, 64
    q, k, v = rand(B, T, N, H, seed=20), rand(B, T, K, H, seed=21), rand(B, T, K, H, seed=22)
    mask = MaskSpec(causal=True, kv_lengths=jnp.array([21, 9]))
    loss = lambda q, k, v, kernels: jnp.sum(jnp.sin(attention_module.attention(q, k, v, mask, kernels=kernels)))
    grad = lambda kernels: jax.jit(jax.grad(lambda *a: loss(*a, kernels), argnums=(0, 1, 2)))(q, k, v)
    assert cpa.TARGET in lowered(lambda *a: loss(*a, KernelPolicy()), q, k, v)
    got = grad(KernelPolicy())
    want = grad(KernelPolicy(attention_cpu="xla"))
    for a, b in zip(got, want):
        assert max_err(a, b) <= TOL
