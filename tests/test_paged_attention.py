"""Paged decode attention (mmjax.kernels.paged_attention) against the dense decode attention it
replaces, on every implementation the policy can pick: the gather reference (XLA), the C++ CPU
kernel, JAX's Pallas GPU paged kernel in interpret mode; and its CUDA / TPU lowering at 7B shapes.

Pages are scattered through the pool in a shuffled order, rows have uneven lengths (one of 1, one
ending mid-page, one filling its table), and unused table entries point at the null page 0."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels.attention import MaskSpec, xla_attention
from mmjax.kernels.cpu import ffi
from mmjax.kernels.paged_attention import gather_pages, paged_attention, paged_attention_reference, write_pages
from mmjax.kernels.policy import KernelPolicy
from test_lowering import calls, lowered, spec

K, G, H, Z = 2, 2, 16, 4  # kv heads, query heads per kv head, head dim, page size


def _case(lengths, L, P=24, seed=0):
    """q [B, 1, N, H], pools [K, P, Z, H], block tables [B, L] (shuffled pages, null-padded), and the
    dense [B, K, L*Z, H] cache holding the same keys."""
    rng = np.random.default_rng(seed)
    B = len(lengths)
    q = rng.standard_normal((B, 1, K * G, H)).astype(np.float32)
    kp = rng.standard_normal((K, P, Z, H)).astype(np.float32)
    vp = rng.standard_normal((K, P, Z, H)).astype(np.float32)
    free = list(rng.permutation(np.arange(1, P)))
    tables = np.zeros((B, L), np.int32)
    for b, n in enumerate(lengths):
        used = -(-n // Z)
        tables[b, :used] = [free.pop() for _ in range(used)]
    return q, kp, vp, tables, np.asarray(lengths, np.int32)


def _dense(q, kp, vp, tables, lengths):
    k, v = gather_pages(jnp.asarray(kp), tables), gather_pages(jnp.asarray(vp), tables)
    mask = MaskSpec(causal=True, kv_lengths=jnp.asarray(lengths), q_offset=jnp.asarray(lengths) - 1)
    return xla_attention(jnp.asarray(q), k, v, mask, kv_layout="BKSH")


LENGTHS = [[1, 7, 16], [5], [16, 13, 2, 9]]


@pytest.mark.parametrize("lengths", LENGTHS)
def test_reference_equals_dense_decode_attention(lengths):
    case = _case(lengths, L=4)
    ref = paged_attention_reference(*map(jnp.asarray, case))
    np.testing.assert_allclose(ref, _dense(*case), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attention_cpu", ["cpu", "xla", "pallas"])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_each_cpu_policy_matches_the_reference(attention_cpu, lengths):
    if attention_cpu == "cpu" and not ffi.available():
        pytest.fail(f"the C++ CPU kernels did not build: {ffi.error()}")
    case = _case(lengths, L=4)
    pol = KernelPolicy(attention_cpu=attention_cpu)
    got = jax.jit(lambda *a: paged_attention(*a, kernels=pol))(*map(jnp.asarray, case))
    np.testing.assert_allclose(got, _dense(*case), atol=2e-6, rtol=2e-6)


def test_rows_only_read_their_own_pages():
    """Changing every page a row does not own (and the null page) leaves the row's output as is."""
    q, kp, vp, tables, lengths = _case([6, 11], L=4)
    base = paged_attention(*map(jnp.asarray, (q, kp, vp, tables, lengths)))
    own = {int(p) for b, n in enumerate(lengths) for p in tables[b, :-(-n // Z)]}
    other = [p for p in range(kp.shape[1]) if p not in own]
    kp2, vp2 = kp.copy(), vp.copy()
    kp2[:, other], vp2[:, other] = 1e3, -1e3
    # and the unused tail of each row's last page
    for b, n in enumerate(lengths):
        if n % Z:
            kp2[:, tables[b, n // Z], n % Z:] = 1e3
    again = paged_attention(*map(jnp.asarray, (q, kp2, vp2, tables, lengths)))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(again))


def test_write_pages_puts_each_token_at_its_slot():
    pages = jnp.zeros((K, 5, Z, H))
    new = jnp.arange(2 * 3 * K * H, dtype=jnp.float32).reshape(2, 3, K, H)
    slots = jnp.asarray([[4 * Z + 1, 2 * Z + 3, 0], [Z, Z + 1, 0]])  # the last token of each row: null slot
    out = np.asarray(write_pages(pages, new, slots))
    np.testing.assert_array_equal(out[:, 4, 1], np.asarray(new[0, 0]))
    np.testing.assert_array_equal(out[:, 2, 3], np.asarray(new[0, 1]))
    np.testing.assert_array_equal(out[:, 1, 0], np.asarray(new[1, 0]))
    np.testing.assert_array_equal(out[:, 1, 1], np.asarray(new[1, 1]))
    assert np.count_nonzero(out[:, 3]) == 0


# 7B-shaped pools: 32 query heads, page 16, 2048-token rows (L=128 pages)
@pytest.mark.parametrize("H_, G_, dtype", [(128, 4, jnp.bfloat16), (128, 1, jnp.float32), (64, 8, jnp.bfloat16)])
def test_paged_attention_lowers_to_each_platforms_kernel(H_, G_, dtype):
    N, B, L, P, Z_ = 32, 8, 128, 2048, 16
    args = (spec(B, 1, N, H_, dtype=dtype), spec(N // G_, P, Z_, H_, dtype=dtype), spec(N // G_, P, Z_, H_, dtype=dtype),
            spec(B, L, dtype=jnp.int32), spec(B, dtype=jnp.int32))
    pol = KernelPolicy(attention_gpu="pallas", attention_tpu="pallas")
    fn = lambda *a: paged_attention(*a, kernels=pol)  # noqa: E731
    assert calls(lowered(fn, "cuda", *args))["triton"] >= 1
    # TPU's kernel takes head dims that fill its 128 lanes; others take the XLA gather path
    assert (calls(lowered(fn, "tpu", *args))["tpu"] >= 1) == (H_ % 128 == 0)
    cpu = calls(lowered(fn, "cpu", *args))
    assert cpu["cpu"] == (1 if ffi.available() else 0)  # float32 and bfloat16 pages each have a kernel


@pytest.mark.parametrize("attention_cpu", ["cpu", "xla", "pallas"])
def test_int8_pools_with_scales_match_the_dequantized_pools(attention_cpu):
    """int8 pools + scales [K, P, Z] (kv_cache_dtype="int8") read as the float pools they stand for;
    the Pallas GPU kernel (interpret mode here) takes the scales itself."""
    from mmjax.kernels import kv_cache

    q, kp, vp, tables, lengths = _case([1, 7, 16], L=4)
    (kq, ks), (vq, vs) = kv_cache.quantize(jnp.asarray(kp)), kv_cache.quantize(jnp.asarray(vp))
    want = _dense(q, kv_cache.dequantize(kq, ks), kv_cache.dequantize(vq, vs), tables, lengths)
    pol = KernelPolicy(attention_cpu=attention_cpu)
    got = jax.jit(lambda *a: paged_attention(*a[:5], kernels=pol, k_scales=a[5], v_scales=a[6]))(
        jnp.asarray(q), kq, vq, jnp.asarray(tables), jnp.asarray(lengths), ks, vs)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_int8_pools_lower_to_the_gpu_kernel_with_scales():
    args = (spec(8, 1, 32, 128, dtype=jnp.bfloat16), spec(8, 2048, 16, 128, dtype=jnp.int8),
            spec(8, 2048, 16, 128, dtype=jnp.int8), spec(8, 128, dtype=jnp.int32), spec(8, dtype=jnp.int32),
            spec(8, 2048, 16, dtype=jnp.float32), spec(8, 2048, 16, dtype=jnp.float32))
    pol = KernelPolicy(attention_gpu="pallas")
    text = lowered(lambda *a: paged_attention(*a[:5], kernels=pol, k_scales=a[5], v_scales=a[6]), "cuda", *args)
    assert calls(text)["triton"] >= 1
