"""JAX's TPU Pallas kernels behind MaskSpec (mmjax/kernels/tpu_attention.py) against the
references, run here in TPU interpret mode (INTERPRET = True; TestTpuKernelsCompiled reruns
them compiled where a TPU is present). That they lower for TPU is tests/test_lowering.py's job.

Tolerances (max |kernel - reference|) as in test_kernels.py: float32 1e-5, bfloat16 2e-2. The
paged kernel in TPU interpret mode rounds float32 K/V to bfloat16 as it loads them (exact for
inputs that bfloat16 holds), so its float32 case uses such inputs and a power-of-two scale.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mmjax.kernels import tpu_attention
from mmjax.kernels.decode_attention import decode_attention_reference
from mmjax.kernels.flash_attention import attention_reference
from mmjax.kernels.mask import MaskSpec

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def qkv(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, num_heads, head_dim), np.float32)
    k, v = rng.standard_normal((2, batch, kv_len, num_kv_heads, head_dim), np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def segments(rows):
    return jnp.asarray(np.stack(rows), jnp.int32)


# name -> (T, S, mask for B = 2): lengths not multiples of the 128-row blocks; a row with no key
# (kv_lengths 0, an all-padding key row, padding queries with segment -1) must come out 0.
MASKS = {
    "causal+padding": (40, 40, MaskSpec(causal=True, kv_lengths=jnp.array([33, 0]))),
    "sliding_window": (150, 150, MaskSpec(causal=True, sliding_window=18)),
    "bidir_window": (50, 64, MaskSpec(causal=False, sliding_window=7)),
    "segments": (60, 60, MaskSpec(causal=False, q_segment_ids=segments(
        [np.r_[np.zeros(16), np.ones(30), -np.ones(14)], np.r_[np.zeros(50), -np.ones(10)]]))),
    "cross_segments": (20, 30, MaskSpec(causal=False, q_segment_ids=jnp.zeros((2, 20), jnp.int32),
                                        kv_segment_ids=segments([np.r_[np.zeros(25), -np.ones(5)], -np.ones(30)]))),
}


class TestTpuKernels:
    INTERPRET = True

    def interpreted(self):
        """The paged kernel has no interpret argument: TPU interpret mode is a context."""
        return pltpu.force_tpu_interpret_mode() if self.INTERPRET else contextlib.nullcontext()

    @pytest.mark.parametrize("name,groups,head_dim", [
        ("causal+padding", 2, 64), ("sliding_window", 1, 128), ("bidir_window", 2, 80), ("segments", 2, 64),
        ("cross_segments", 1, 64)])
    def test_splash_matches_reference(self, name, groups, head_dim):
        T, S, mask = MASKS[name]
        q, k, v = qkv(2, T, S, 2 * groups, 2, head_dim, seed=1)
        assert tpu_attention.splash_eligible(q, k, mask)
        out = jax.jit(lambda *a: tpu_attention.splash_attention(*a, interpret=self.INTERPRET))(q, k, v, mask)
        assert out.shape == q.shape and not bool(jnp.isnan(out).any())
        assert max_err(out, attention_reference(q, k, v, mask)) <= TOL[jnp.float32]

    def test_splash_bf16(self):
        T, S, mask = MASKS["causal+padding"]
        q, k, v = qkv(2, T, S, 4, 2, 128, jnp.bfloat16, seed=2)
        out = jax.jit(lambda *a: tpu_attention.splash_attention(*a, interpret=self.INTERPRET))(q, k, v, mask)
        assert out.dtype == jnp.bfloat16
        assert max_err(out, attention_reference(q, k, v, mask)) <= TOL[jnp.bfloat16]

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_paged_decode_matches_reference(self, dtype):
        # S = 72: pages of 8 slots; row 0 has an empty cache (output 0), row 2 a full one.
        bf16_exact = lambda x: x.astype(jnp.bfloat16).astype(dtype)
        q, k, v = (bf16_exact(x) for x in qkv(3, 1, 72, 8, 2, 128, seed=3))
        end = jnp.array([0, 40, 72], jnp.int32)
        with self.interpreted():
            out = jax.jit(tpu_attention.paged_decode, static_argnums=4)(
                q, k.swapaxes(1, 2), v.swapaxes(1, 2), end, 0.125)
        ref = decode_attention_reference(q, k, v, end, scale=0.125)
        assert out.shape == q.shape and out.dtype == dtype
        assert max_err(out, ref) <= TOL[dtype]
        assert float(jnp.abs(out[0]).max()) == 0.0


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="compiled TPU kernels need a TPU")
class TestTpuKernelsCompiled(TestTpuKernels):
    INTERPRET = False


def test_what_runs_on_xla_instead():
    q, k, _ = qkv(2, 8, 8, 2, 2, 128)
    rows = jnp.array([3, 5])
    assert not tpu_attention.splash_eligible(q, k, MaskSpec(causal=True, prefix_lengths=rows))
    assert not tpu_attention.splash_eligible(q, k, MaskSpec(causal=True, q_offset=rows))
    assert not tpu_attention.splash_eligible(q, k, MaskSpec(causal=False, q_offset=rows, sliding_window=4))
    assert tpu_attention.splash_eligible(q, k, MaskSpec(causal=False, q_offset=rows))  # offset unused
    one = q[:, :1]
    cache = jax.ShapeDtypeStruct((2, 2, 64, 128), jnp.float32)  # [B, K, S, H]
    assert tpu_attention.paged_eligible(one, cache, MaskSpec(causal=True, q_offset=rows, kv_lengths=rows + 1))
    assert not tpu_attention.paged_eligible(one, cache, MaskSpec(causal=True, q_offset=rows, sliding_window=4))
    assert not tpu_attention.paged_eligible(one[..., :64], jax.ShapeDtypeStruct((2, 2, 64, 64), jnp.float32),
                                            MaskSpec(causal=True, q_offset=rows))  # head dim 64
