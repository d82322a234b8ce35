"""In-place row writes of bfloat16 KV caches and page pools on XLA:CPU (mmjax.kernels.cpu.write_rows).

The kernel must write exactly what XLA's scatter / dynamic_update_slice writes, and it must stay
in place: XLA:CPU widens a bf16 write to float32 (the whole cache converted both ways each
decode step) and copies an aliased operand that is reshaped, so the compiled programs are
checked for the kernel and for the absence of converts and copies of the cache."""
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
pytestmark = pytest.mark.skipif(not wr.eligible(jnp.bfloat16), reason="the CPU kernels need a C++ compiler")


def rand(shape, seed, dtype=jnp.bfloat16):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def test_rows_equal_the_scatter_and_out_of_range_rows_are_dropped():
    buf, new = rand((3, 5, 8), 0), rand((4, 8), 1)
    rows = jnp.asarray([14, 0, -1, 15], jnp.int32)  # 15 rows: -1 and 15 are outside
    got = jax.jit(wr.write_rows)(buf, new, rows)
    want = wr.write_rows_reference(buf, new, rows)
    assert got.shape == buf.shape and got.dtype == buf.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert not np.array_equal(np.asarray(got, np.float32), np.asarray(buf, np.float32))  # it did write


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (3, 4)])
def test_write_cache_matches_xla_bitwise(B, T):
    K, S, H = 2, 16, 8
    cache, new = rand((B, K, S, H), 2), rand((B, T, K, H), 3, jnp.float32)
    index = jnp.asarray([0, 5, 14][:B], jnp.int32)  # 14 + 4 > 16: clamped as dynamic_update_slice does
    got = jax.jit(lambda c, n, i: write_cache(c, n, i, CPU))(cache, new, index)
    want = jax.jit(lambda c, n, i: write_cache(c, n, i, XLA))(cache, new, index)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_write_pages_matches_xla_bitwise():
    K, P, Z, H, B, T = 2, 6, 4, 8, 3, 2
    pages, new = rand((K, P, Z, H), 4), rand((B, T, K, H), 5, jnp.float32)
    slots = jnp.asarray([[4, 5], [9, 0], [22, 23]], jnp.int32)  # 0: the null page takes padding
    got = jax.jit(lambda p, n, s: write_pages(p, n, s, CPU))(pages, new, slots)
    want = jax.jit(lambda p, n, s: write_pages(p, n, s, XLA))(pages, new, slots)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_donated_writes_are_in_place_with_no_convert_or_copy():
    cache, new, index = rand((8, 4, 256, 64), 6), rand((8, 1, 4, 64), 7), jnp.arange(8, dtype=jnp.int32)
    pages, slots = rand((4, 16, 16, 64), 8), jnp.arange(8, dtype=jnp.int32).reshape(8, 1) * 3
    for f, args in [(lambda c, n, i: write_cache(c, n, i, CPU), (cache, new, index)),
                    (lambda p, n, s: write_pages(p, n, s, CPU), (pages, new, slots))]:
        text = jax.jit(f, donate_argnums=0).lower(*args).compile().as_text()
        assert wr.TARGET in text
        # every convert or copy in the program (fused ones too), by its result's size: only the
        # few new rows may be moved, never the buffer
        moved = [math.prod(int(d) for d in dims.split(",") if d)
                 for dims in re.findall(r"= \w+\[([\d,]*)\]\S* (?:convert|copy)\(", text)]
        assert max(moved, default=0) < args[0].size // 8, text
    # the XLA path on CPU is what the kernel replaces: it widens the bf16 cache
    text = jax.jit(lambda c, n, i: write_cache(c, n, i, XLA), donate_argnums=0).lower(cache, new, index).compile()
    assert "f32[8,4,256,64]" in text.as_text(), "XLA:CPU writes bf16 in place now: write_rows may be unneeded"
