"""The CPU prefill attention kernel (mmjax/kernels/cpu/prefill_attention.cc) against
attention_reference for every mask kind a prompt uses, and for contiguous segment masks (packed
images, Qwen2.5-VL windows, padding -1), and the one place that routes to it
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


def runs(sizes, pad, length):
    """Segment ids [length]: consecutive runs of the given sizes (a size < 0 is a run of -1
    padding of that many positions), then `pad` x -1."""
    parts, i = [], 0
    for n in sizes:
        parts.append(np.full(-n, -1) if n < 0 else np.full(n, i))
        i += n > 0
    row = np.concatenate(parts + [np.full(pad, -1)])
    assert row.size == length, row.size
    return row


def segment_masks(B, T):
    """Contiguous segment masks (T == S, T = 150): rows differ, so per-row intervals are exercised."""
    seg = lambda rows: jnp.asarray(np.stack(rows[:B]), jnp.int32)
    # packed images of uneven lengths (1 .. 50, one longer than a 128-key step), trailing bucket padding
    packed = seg([runs([1, 7, 33, 2, 50, 19], 38, T), runs([61, 3, 70, 1, 5], 10, T), runs([150], 0, T)])
    # Qwen2.5-VL-like windows: 16-long windows and partial ones (4, 8) after the reorder, then padding
    windows = seg([runs([16] * 5 + [8, 4, 16, 16, 8], 18, T), runs([4, 16, 16, 8] * 2 + [16, 16, 8], 22, T),
                   runs([16] * 9, 6, T)])
    # padding runs in the middle, a segment of one, a segment that crosses 32-key chunks
    holes = seg([runs([20, -3, 1, -9, 40, -1, 30], 46, T), runs([-5, 70, -20, 55], 0, T), runs([-150], 0, T)])
    lengths = jnp.array([150, 100, 64][:B], jnp.int32)
    return {
        "packed": MaskSpec(causal=False, q_segment_ids=packed, contiguous_segments=True),
        "windows": MaskSpec(causal=False, q_segment_ids=windows, contiguous_segments=True, max_segment_length=16),
        "holes": MaskSpec(causal=False, q_segment_ids=holes, contiguous_segments=True),
        "packed+causal+padding": MaskSpec(causal=True, kv_lengths=lengths, q_segment_ids=packed,
                                          contiguous_segments=True),
        "windows+bidir_window": MaskSpec(causal=False, sliding_window=7, q_segment_ids=windows,
                                         contiguous_segments=True),
    }


def check_intervals(mask, B, T, S):
    """query_ranges states the mask: same visible set as make_mask. Returns (start, end)."""
    start, end = jax.jit(query_ranges, static_argnums=(1, 2, 3))(mask, B, T, S)
    ok = np.broadcast_to(np.asarray(make_mask(mask, T, S))[:, 0], (B, T, S))  # [B|1, T, S]
    s = np.arange(S)[None, None, :]
    np.testing.assert_array_equal(ok, (s >= np.asarray(start)[..., None]) & (s < np.asarray(end)[..., None]))
    return start, end


# T and S not multiples of the 16-token query block, the 32-key vectors or the 128-key
# softmax step, and longer than one step; G 1..4; head dims 64/80/128 (80: a last half
# register tile) and 8/40 (not whole 16-lane vectors: V goes through a padded copy); rows that
# see nothing (kv_lengths 1 and 3 with an offset); large logits.
@pytest.mark.parametrize("name", list(masks(1, 1, 1)))
@pytest.mark.parametrize("B,T,S,N,K,H", [(2, 150, 150, 6, 2, 64), (3, 37, 37, 4, 4, 80), (1, 20, 20, 4, 1, 128),
                                         (2, 45, 45, 4, 2, 8), (1, 33, 33, 2, 1, 40)])
def test_matches_reference(name, B, T, S, N, K, H):
    mask = masks(B, T, S)[name]
    q, k, v = rand(B, T, N, H, seed=1, scale=2.0), rand(B, S, K, H, seed=2), rand(B, S, K, H, seed=3)
    start, end = check_intervals(mask, B, T, S)
    out = jax.jit(cpa.prefill_attention_cpu)(q, k, v, start, end)
    ref = attention_reference(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert max_err(out, ref) <= TOL


@pytest.mark.parametrize("name", list(segment_masks(1, 150)))
@pytest.mark.parametrize("N,K,H", [(4, 4, 8), (4, 2, 80), (2, 1, 64)])
def test_contiguous_segments_match_reference(name, N, K, H):
    """Per-segment work (each tile and 8-row register tile over its own keys only) gives the
    dense mask's result; padding rows are exactly 0."""
    B, T = 3, 150
    mask = segment_masks(B, T)[name]
    q, k, v = rand(B, T, N, H, seed=14, scale=2.0), rand(B, T, K, H, seed=15), rand(B, T, K, H, seed=16)
    start, end = check_intervals(mask, B, T, T)
    out = jax.jit(cpa.prefill_attention_cpu)(q, k, v, start, end)
    assert max_err(out, attention_reference(q, k, v, mask)) <= TOL
    pad = np.asarray(mask.q_segment_ids) < 0
    assert float(jnp.abs(out[pad]).max(initial=0.0)) == 0.0
    # and through attention(): the default policy sends contiguous segments here
    run = lambda q, k, v, m: attention_module.attention(q, k, v, m)
    assert cpa.TARGET in lowered(run, q, k, v, mask)
    assert max_err(jax.jit(run)(q, k, v, mask), out) == 0.0


def test_keys_past_every_interval_are_never_read():
    """Bucket padding (trailing id -1) holds NaN keys and values: a kernel that touched them in
    either product would return NaN. Output equals the reference on zeroed padding."""
    B, T, N, K, H = 2, 300, 4, 2, 8
    seg = np.stack([runs([100, 37, 3], 160, T), runs([64] * 3 + [8], 100, T)])
    mask = MaskSpec(causal=False, q_segment_ids=jnp.asarray(seg, jnp.int32), contiguous_segments=True)
    q, k, v = rand(B, T, N, H, seed=17), rand(B, T, K, H, seed=18), rand(B, T, K, H, seed=19)
    nan = jnp.asarray(seg < 0)[:, :, None, None]
    out = jax.jit(lambda *a: attention_module.attention(*a))(q, jnp.where(nan, jnp.nan, k), jnp.where(nan, jnp.nan, v),
                                                            mask)
    assert not bool(jnp.isnan(out).any())
    assert max_err(out, attention_reference(q, jnp.where(nan, 0.0, k), jnp.where(nan, 0.0, v), mask)) <= TOL


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
    # any head dim goes; what stays on XLA's ops: bf16, segments not declared contiguous, a policy
    # without it
    q8, k8, v8 = rand(B, T, N, 8, seed=7), rand(B, T, K, 8, seed=8), rand(B, T, K, 8, seed=9)
    assert cpa.TARGET in lowered(run, q8, k8, v8, mask)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    assert cpa.TARGET not in lowered(run, *bf, mask)
    seg = MaskSpec(causal=False, q_segment_ids=jnp.zeros((B, T), jnp.int32))
    assert cpa.TARGET not in lowered(run, q, k, v, seg)
    assert cpa.TARGET in lowered(run, q, k, v, MaskSpec(causal=False, q_segment_ids=seg.q_segment_ids,
                                                        contiguous_segments=True))
    mesh = KernelPolicy().without_cpu_custom_calls()  # what mmjax.load does under a mesh
    assert cpa.TARGET not in lowered(lambda *a: attention_module.attention(*a, kernels=mesh), q, k, v, mask)
    monkeypatch.setenv("MMJAX_CPU_ATTENTION", "0")  # read by from_env (mmjax.load), not while tracing
    off = KernelPolicy.from_env()
    assert off.attention_cpu == "xla"
    assert cpa.TARGET not in lowered(lambda *a: attention_module.attention(*a, kernels=off), q, k, v, mask)
    assert cpa.TARGET in lowered(run, q, k, v, mask)


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="K \\| N"):
        cpa.prefill_attention_cpu(rand(1, 4, 3, 8), rand(1, 4, 2, 8), rand(1, 4, 2, 8),
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
