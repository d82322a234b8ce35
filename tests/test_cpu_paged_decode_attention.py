"""The CPU decode attention kernels reading the serving engine's pools in place through block
tables (cpu.paged_decode_attention_cpu, rows.h). The claim that matters: the result equals
decode_attention_cpu over the rows' gathered caches *bitwise*, for every cache dtype, page size
and head dim, so a served greedy request keeps returning exactly mmjax.generate's tokens. Then the
reference at the kernels' float32 tolerance (1e-5), and the shape errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels.cpu import decode_attention as cda
from mmjax.kernels.cpu import ffi
from mmjax.kernels.kv_cache import quantize


def _case(lengths, K, G, H, Z, L, P=40, cache="float32", q_dtype="float32", seed=0):
    """q [B, 1, K*G, H], pools [K, P, Z, H] (+ scales), tables [B, L] of shuffled pages (unused
    entries: the null page 0), lengths [B]."""
    rng = np.random.default_rng(seed)
    B = len(lengths)
    P = max(P, sum(-(-n // Z) for n in lengths) + 1)  # every row's pages and the null page
    q = jnp.asarray(rng.standard_normal((B, 1, K * G, H), np.float32) * 2).astype(q_dtype)
    kp = jnp.asarray(rng.standard_normal((K, P, Z, H), np.float32))
    vp = jnp.asarray(rng.standard_normal((K, P, Z, H), np.float32))
    scales = {}
    if cache == "int8":
        (kp, ks), (vp, vs) = quantize(kp), quantize(vp)
        scales = {"k_scale": ks, "v_scale": vs}
    else:
        kp, vp = kp.astype(cache), vp.astype(cache)
    free = list(rng.permutation(np.arange(1, P)))
    tables = np.zeros((B, L), np.int32)
    for b, n in enumerate(lengths):
        tables[b, :-(-n // Z)] = [free.pop() for _ in range(-(-n // Z))]
    return q, kp, vp, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32), scales


def _gathered(q, kp, vp, tables, lengths, scales):
    """decode_attention_cpu over each row's gathered cache: mmjax.generate's path."""
    k, v = cda.gather_pages(kp, tables), cda.gather_pages(vp, tables)
    gs = {n: cda.gather_pages(s, tables) for n, s in scales.items()}
    return cda.decode_attention_cpu(q, k, v, jnp.zeros_like(lengths), lengths, **gs)


# Page sizes that are and are not multiples of the kernels' 8/16-key groups; head dims of the
# unrolled kernels (64, 128) and of the generic loops (24); GQA 1 and 3; rows of length 1, ending
# mid-page, filling the table; a row of more than 1024 keys (run in 2 parts, split mid-page: 552
# or 560 keys, AVX2 or AVX-512, is not a multiple of 11).
SHAPES = [((1, 9, 48), 2, 3, 64, 16, 3), ((5, 33, 16), 1, 1, 128, 16, 3), ((7, 20), 2, 2, 24, 5, 4),
          ((2, 13, 30, 1), 3, 1, 64, 6, 5), ((1100, 40, 700), 1, 4, 64, 11, 100)]


@pytest.mark.parametrize("cache", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lengths,K,G,H,Z,L", SHAPES)
def test_equals_the_gathered_kernel_bitwise(lengths, K, G, H, Z, L, cache, q_dtype):
    assert ffi.available(), ffi.error()
    case = _case(lengths, K, G, H, Z, L, cache=cache, q_dtype=q_dtype)
    q, kp, vp, tables, lengths, scales = case
    got = jax.jit(cda.paged_decode_attention_cpu)(q, kp, vp, tables, lengths, None, *scales.values())
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(jax.jit(_gathered)(*case), np.float32))
    want = cda.paged_decode_attention_cpu_reference(q, kp, vp, tables, lengths, None, *scales.values())
    tol = 1e-5 if q_dtype == "float32" else 1e-2  # bfloat16 output: one ulp at |out| < 2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_reads_only_the_rows_pages():
    """Every page a row does not own, and the tail of its last page, may hold anything."""
    q, kp, vp, tables, lengths, _ = _case((6, 11), 2, 2, 64, 4, 4)
    base = cda.paged_decode_attention_cpu(q, kp, vp, tables, lengths)
    tb, ln = np.asarray(tables), np.asarray(lengths)
    keep = np.zeros(kp.shape[:3], bool)
    for b, n in enumerate(ln):
        for s in range(n):
            keep[:, tb[b, s // 4], s % 4] = True
    noise = jnp.where(keep[..., None], kp, 1e4), jnp.where(keep[..., None], vp, -1e4)
    again = cda.paged_decode_attention_cpu(q, *noise, tables, lengths)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(again))


def test_rejects_what_it_cannot_do():
    q, kp, vp, tables, lengths, _ = _case((3,), 2, 1, 16, 4, 2)
    with pytest.raises(ValueError, match=r"k/v pages \[K, P, Z, H\]"):
        cda.paged_decode_attention_cpu(q, kp[:, :, :, :8], vp[:, :, :, :8], tables, lengths)
    with pytest.raises(ValueError, match="int8 pages need k_scale and v_scale"):
        cda.paged_decode_attention_cpu(q, kp.astype(jnp.int8), vp.astype(jnp.int8), tables, lengths)
    with pytest.raises(ValueError, match="go with int8 pages only"):
        cda.paged_decode_attention_cpu(q, kp, vp, tables, lengths, None, kp[..., 0], vp[..., 0])
