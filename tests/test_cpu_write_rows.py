"""In-place row writes of KV caches and page pools on XLA:CPU (mmjax.kernels.cpu.write_rows).

The kernel must write exactly what XLA's scatter / dynamic_update_slice writes (every cache
dtype, and an int8 cache's scales), and it must stay in place: XLA:CPU widens a bf16 write to
float32 (the whole cache converted both ways each decode step), expands the pools' scatter into
a loop that copies the pool, and copies an aliased operand that is reshaped, so the compiled
programs are checked for the kernel and for the absence of converts and copies of the buffer."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels.cpu import write_rows as wr
from mmjax.kernels.paged_attention import write_pages
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.attention import write_cache

CPU, XLA = KernelPolicy(), KernelPolicy(attention_cpu="xla")
pytestmark = pytest.mark.skipif(not wr.eligible(), reason="the CPU kernels need a C++ compiler")


def rand(shape, seed, dtype=jnp.bfloat16):
    x = np.random.default_rng(seed).standard_normal(shape) * (50 if dtype == jnp.int8 else 1)
    return jnp.asarray(x, dtype)


DTYPES = [jnp.bfloat16, jnp.float32, jnp.int8]


def test_rows_equal_the_scatter_and_out_of_range_rows_are_dropped():
    buf, new = rand((3, 5, 8), 0), rand((4, 8), 1)
    rows = jnp.asarray([14, 0, -1, 15], jnp.int32)  # 15 rows: -1 and 15 are outside
    got = jax.jit(wr.write_rows)(buf, new, rows)
    want = wr.write_rows_reference(buf, new, rows)
    assert got.shape == buf.shape and got.dtype == buf.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert not np.array_equal(np.asarray(got, np.float32), np.asarray(buf, np.float32))  # it did write


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H", [(1, 1, 8), (3, 1, 8), (3, 4, 8), (3, 4, None)])  # H None: scales [B, K, S]
def test_write_cache_matches_xla_bitwise(B, T, H, dtype):
    K, S = 2, 16
    h = () if H is None else (H,)
    cache, new = rand((B, K, S, *h), 2, dtype), rand((B, T, K, *h), 3, jnp.float32)
    index = jnp.asarray([0, 5, 14][:B], jnp.int32)  # 14 + 4 > 16: clamped as dynamic_update_slice does
    got = jax.jit(lambda c, n, i: write_cache(c, n, i, CPU))(cache, new, index)
    want = jax.jit(lambda c, n, i: write_cache(c, n, i, XLA))(cache, new, index)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [8, None])  # None: an int8 pool's scales [K, P, Z]
def test_write_pages_matches_xla_bitwise(H, dtype):
    K, P, Z, B, T = 2, 6, 4, 3, 2
    h = () if H is None else (H,)
    pages, new = rand((K, P, Z, *h), 4, dtype), rand((B, T, K, *h), 5, jnp.float32)
    slots = jnp.asarray([[4, 5], [9, 0], [22, 23]], jnp.int32)  # 0: the null page takes padding
    got = jax.jit(lambda p, n, s: write_pages(p, n, s, CPU))(pages, new, slots)
    want = jax.jit(lambda p, n, s: write_pages(p, n, s, XLA))(pages, new, slots)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_donated_writes_are_in_place_with_no_convert_or_copy(dtype):
    cache, new, index = rand((8, 4, 256, 64), 6, dtype), rand((8, 1, 4, 64), 7), jnp.arange(8, dtype=jnp.int32)
    pages, slots = rand((4, 16, 16, 64), 8, dtype), jnp.arange(8, dtype=jnp.int32).reshape(8, 1) * 3
    for f, args in [(lambda c, n, i: write_cache(c, n, i, CPU), (cache, new, index)),
                    (lambda p, n, s: write_pages(p, n, s, CPU), (pages, new, slots))]:
        text = jax.jit(f, donate_argnums=0).lower(*args).compile().as_text()
        assert wr.TARGET in text
        # every convert or copy in the program (fused ones too), by its result's size: only the
        # few new rows may be moved, never the buffer
        moved = [math.prod(int(d) for d in dims.split(",") if d)
                 for dims in re.findall(r"= \w+\[([\d,]*)\]\S* (?:convert|copy)\(", text)]
        assert max(moved, default=0) < args[0].size // 8, text
    # what the kernel replaces: XLA:CPU widens the bf16 cache (the pools' scatter copied each pool
    # inside the serving decode program, not in a program of its own: not checked here)
    if dtype == jnp.bfloat16:
        text = jax.jit(lambda c, n, i: write_cache(c, n, i, XLA), donate_argnums=0).lower(cache, new, index)
        assert "f32[8,4,256,64]" in text.compile().as_text(), "XLA:CPU writes bf16 in place now"


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_rows_equal_the_gather_and_out_of_range_rows_are_clipped(dtype):
    table = rand((11, 24), 3, dtype)
    rows = jnp.asarray([4, 0, -3, 10, 99, 4], jnp.int32)
    got = jax.jit(wr.read_rows)(table, rows)
    assert got.shape == (6, 24) and got.dtype == table.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(wr.read_rows_reference(table, rows), np.float32))
    np.testing.assert_array_equal(np.asarray(got[2], np.float32), np.asarray(table[0], np.float32))  # -3 -> row 0


def test_bf16_embedding_in_a_decode_loop_is_read_by_rows_not_converted_whole():
    """The decoders' embedding gather in a loop of steps (as Engine.decode_steps runs them): XLA:CPU
    gathers bfloat16 in float32 and hoists the table's convert out of the loop, so each call
    wrote the whole table out in float32. Through take_rows' CPU branch: no [V, D] convert, and
    the same rows as the XLA branch, gradient included."""
    from mmjax.layers.linear import take_rows

    table, ids0 = rand((512, 64), 4), jnp.asarray([[7], [300]], jnp.int32)

    def loop(kernels):
        def f(table, ids):
            def body(i, carry):
                ids, acc = carry
                x = take_rows(table, ids, kernels).astype(jnp.float32)  # [B, 1, D]
                return (ids + 1) % 512, acc + x
            return jax.lax.fori_loop(0, 8, body, (ids, jnp.zeros((2, 1, 64), jnp.float32)))[1]
        return jax.jit(f)

    for kernels, wide in ((CPU, False), (XLA, True)):
        hlo = loop(kernels).lower(table, ids0).compile().as_text()
        assert bool(re.search(r"f32\[512,64\]\{[^}]*\} convert\(", hlo)) == wide, kernels
    np.testing.assert_array_equal(np.asarray(loop(CPU)(table, ids0)), np.asarray(loop(XLA)(table, ids0)))
    g = lambda kernels: jax.grad(lambda t: jnp.sum(take_rows(t, ids0, kernels).astype(jnp.float32) ** 2))(table)
    np.testing.assert_array_equal(np.asarray(g(CPU), np.float32), np.asarray(g(XLA), np.float32))
