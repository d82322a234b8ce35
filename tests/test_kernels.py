"""Attention kernels against their references.

The Pallas kernel tests live in TestPallasKernels, which runs them with interpret=True
(INTERPRET, one class attribute, as JAX's own Pallas tests do); TestPallasKernelsCompiled
reruns the same tests compiled through Triton where a GPU is present. Interpreted on CPU every
case is tiny (T, S <= 96, B <= 2, N <= 4) and block sizes are 16/32 so that several key/query
blocks, partial last blocks and skipped blocks all occur. Tolerances (max |kernel - reference|):
float32 1e-5, bfloat16 2e-2; the XLA path against HF eager attention: 1e-6 (float32).
"""
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.kernels import attention as attention_module
from mmjax.kernels import segment_attention
from mmjax.kernels.attention import decode_range, xla_attention
from mmjax.kernels.decode_attention import decode_attention, decode_attention_reference
from mmjax.kernels.flash_attention import BlockSizes, MaskSpec, attention_reference, flash_attention
from mmjax.kernels.policy import KernelPolicy

# Models call attention() under their own jit; so do the tests (eager op-by-op is slow).
attention = jax.jit(attention_module.attention, static_argnames=("kernels", "scale", "kv_layout"))
XLA = KernelPolicy(attention_cpu="xla", attention_gpu="xla", attention_tpu="xla")  # XLA's ops everywhere
make_mask = jax.jit(attention_module.make_mask, static_argnums=(1, 2))
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SMALL = BlockSizes(block_q=16, block_k=32)


def qkv(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype=jnp.float32, seed=0):
    # numpy, not jax.random: an eager jax.random call compiles once per shape.
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, num_heads, head_dim), np.float32)
    k, v = rng.standard_normal((2, batch, kv_len, num_kv_heads, head_dim), np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def heads(groups):
    """(N, K) with N <= 4: two kv heads while they fit, else one."""
    num_kv_heads = 2 if groups <= 2 else 1
    return num_kv_heads * groups, num_kv_heads


def max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def windows(batch, length, sizes, pad):
    """Segment ids [B, length]: consecutive windows of the given sizes, then `pad` x -1."""
    row = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)] + [np.full(pad, -1)])
    assert row.size == length
    return jnp.asarray(np.stack([row, row[::-1].copy()])[:batch], jnp.int32)


# name -> (T, S, mask factory(B, T, S)); lengths are deliberately not block multiples, and
# offsets and windows put each of the kernel's block-skipping bounds exactly on a key-block
# edge (with SMALL blocks: causal_offset 17 + 15 = 32; sliding_window 48 - 18 + 1 = 31;
# bidir_window 11 + 15 + 7 = 33; prefix_lm 33 = 32 + 1; a query block at 66 inside a
# 70-long prefix with window 25).
MASKS = {
    "causal": (40, 40, lambda B, T, S: MaskSpec(causal=True)),
    "causal_offset": (24, 72, lambda B, T, S: MaskSpec(causal=True, q_offset=jnp.array([17, 41][:B]))),
    "prefix_lm": (48, 48, lambda B, T, S: MaskSpec(causal=True, prefix_lengths=jnp.array([33, 5][:B]))),
    "sliding_window": (70, 70, lambda B, T, S: MaskSpec(causal=True, sliding_window=18)),
    "bidirectional": (33, 50, lambda B, T, S: MaskSpec(causal=False)),
    "bidir_window": (50, 64, lambda B, T, S: MaskSpec(causal=False, q_offset=jnp.array([11, 5][:B]), sliding_window=7)),
    "key_padding": (40, 56, lambda B, T, S: MaskSpec(causal=False, kv_lengths=jnp.array([56, 33][:B]))),
    "segments": (60, 60, lambda B, T, S: MaskSpec(causal=False, q_segment_ids=windows(B, 60, [16, 9, 23], 12))),
    # contiguous segments (packed images, Qwen2.5-VL windows after their reorder): row 1 is row 0
    # reversed, so its padding leads; uneven lengths, a segment of one, windows of 16 and partial ones
    "packed": (80, 80, lambda B, T, S: MaskSpec(causal=False, q_segment_ids=windows(B, 80, [7, 30, 1, 19], 23),
                                                contiguous_segments=True)),
    "windows": (80, 80, lambda B, T, S: MaskSpec(causal=False, q_segment_ids=windows(B, 80, [16, 16, 8, 4, 16, 12], 8),
                                                 contiguous_segments=True, max_segment_length=16)),
    "packed_causal": (70, 70, lambda B, T, S: MaskSpec(
        causal=True, kv_lengths=jnp.array([70, 52][:B]), q_segment_ids=windows(B, 70, [33, 2, 20], 15),
        contiguous_segments=True)),
    "everything": (40, 96, lambda B, T, S: MaskSpec(
        causal=True, q_offset=jnp.array([50, 34][:B]), kv_lengths=jnp.array([90, 80][:B]),
        prefix_lengths=jnp.array([30, 70][:B]), sliding_window=25,
        q_segment_ids=jnp.zeros((B, T), jnp.int32).at[:, -3:].set(-1),
        kv_segment_ids=jnp.zeros((B, S), jnp.int32).at[:, 60:70].set(3))),
}

# (mask, GQA ratio G, head dim): each mask once, G in {1, 2, 4} and H in {64, 80, 128} all covered.
FLASH_CASES = [
    ("causal", 1, 64), ("causal_offset", 2, 80), ("prefix_lm", 4, 128), ("sliding_window", 2, 64),
    ("bidirectional", 1, 80), ("bidir_window", 4, 64), ("key_padding", 4, 80), ("segments", 2, 80),
    ("everything", 2, 64), ("packed", 1, 80), ("windows", 2, 64), ("packed_causal", 4, 128),
]


# (B, T, S, G, H, kv_lengths, kv_starts, block_k, splits, dtype)
DECODE_CASES = [
    (2, 1, 70, 1, 64, [70, 33], None, 16, 3, jnp.float32),  # S and a length not block multiples
    (2, 1, 60, 2, 80, [0, 17], [0, 5], 16, 2, jnp.float32),  # empty row; window start; H and S tails
    (1, 3, 96, 4, 128, [61], None, 32, 2, jnp.float32),  # a few queries, G = 4
    (2, 1, 80, 2, 64, [80, 41], None, 16, 4, jnp.bfloat16),
]


class TestPallasKernels:
    """The Triton kernels against their references. INTERPRET = True runs them anywhere (CPU);
    TestPallasKernelsCompiled runs the same tests compiled, on a GPU."""

    INTERPRET = True

    @property
    def pallas(self) -> KernelPolicy:
        """attention()'s policy for these kernels: interpreted on CPU, or compiled on a GPU."""
        return KernelPolicy(attention_cpu="pallas") if self.INTERPRET else KernelPolicy(attention_gpu="pallas")

    @pytest.mark.parametrize("name,groups,head_dim", FLASH_CASES)
    def test_flash_matches_reference_fp32(self, name, groups, head_dim):
        T, S, factory = MASKS[name]
        q, k, v = qkv(2, T, S, *heads(groups), head_dim)
        mask = factory(2, T, S)
        out = flash_attention(q, k, v, mask=mask, block_sizes=SMALL, interpret=self.INTERPRET)
        ref = attention_reference(q, k, v, mask)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert max_err(out, ref) <= TOL[jnp.float32]

    @pytest.mark.parametrize("name,groups,head_dim", [("causal_offset", 4, 128), ("segments", 2, 64)])
    def test_flash_matches_reference_bf16(self, name, groups, head_dim):
        T, S, factory = MASKS[name]
        q, k, v = qkv(2, T, S, *heads(groups), head_dim, jnp.bfloat16, seed=1)
        mask = factory(2, T, S)
        out = flash_attention(q, k, v, mask=mask, block_sizes=SMALL, interpret=self.INTERPRET)
        assert out.dtype == jnp.bfloat16
        assert max_err(out, attention_reference(q, k, v, mask)) <= TOL[jnp.bfloat16]

    def test_flash_default_blocks_and_scale(self):
        q, k, v = qkv(1, 90, 90, 2, 1, 64, seed=2)
        mask = MaskSpec(causal=True, sliding_window=30)
        out = flash_attention(q, k, v, mask=mask, scale=0.3, interpret=self.INTERPRET)
        assert max_err(out, attention_reference(q, k, v, mask, scale=0.3)) <= TOL[jnp.float32]

    def test_flash_skips_key_blocks_of_other_segments(self):
        """Contiguous segments: each query block loops over the key blocks its intervals reach only.
        Whole key blocks (16 keys) of bucket padding hold NaN: loading one would make the output NaN
        (0 * NaN in p @ v), as it does when the same segments are not declared contiguous."""
        T = 96
        seg = jnp.asarray(np.stack([np.r_[np.repeat([0, 1, 2, 3], [5, 30, 7, 20]), np.full(34, -1)],
                                    np.r_[np.repeat([0, 1], 40), np.full(16, -1)]]), jnp.int32)
        q, k, v = qkv(2, T, T, 2, 2, 64, seed=12)
        nan = ((seg < 0) & (jnp.arange(T) >= 64))[:, :, None, None]  # key blocks 4 and 5 of row 0, 5 of row 1
        packed = MaskSpec(causal=False, q_segment_ids=seg, contiguous_segments=True)
        run = lambda mask: flash_attention(q, jnp.where(nan, jnp.nan, k), jnp.where(nan, jnp.nan, v), mask=mask,
                                           block_sizes=BlockSizes(16, 16), interpret=self.INTERPRET)
        out = run(packed)
        assert not bool(jnp.isnan(out).any())
        assert max_err(out, attention_reference(q, k, v, packed)) <= TOL[jnp.float32]
        assert bool(jnp.isnan(run(MaskSpec(causal=False, q_segment_ids=seg))).any())  # the general path reads them

    def test_flash_fully_masked_rows_are_zero(self):
        # Row 0: the last 8 queries are padding (segment -1). Row 1: no key at all (kv_length 0).
        q, k, v = qkv(2, 40, 40, 2, 2, 64, seed=3)
        seg = jnp.zeros((2, 40), jnp.int32).at[0, 32:].set(-1)
        mask = MaskSpec(causal=False, kv_lengths=jnp.array([40, 0]), q_segment_ids=seg)
        out = flash_attention(q, k, v, mask=mask, block_sizes=SMALL, interpret=self.INTERPRET)
        assert not bool(jnp.isnan(out).any())
        assert float(jnp.abs(out[0, 32:]).max()) == 0.0 and float(jnp.abs(out[1]).max()) == 0.0
        assert float(jnp.abs(out[0, :32]).max()) > 0.1
        assert max_err(out, attention_reference(q, k, v, mask)) <= TOL[jnp.float32]
        assert max_err(xla_attention(q, k, v, mask), out) <= TOL[jnp.float32]

    @pytest.mark.parametrize("B,T,S,G,H,lengths,starts,block_k,splits,dtype", DECODE_CASES)
    def test_decode_matches_reference(self, B, T, S, G, H, lengths, starts, block_k, splits, dtype):
        q, k, v = qkv(B, T, S, *heads(G), H, dtype, seed=4)
        lengths = jnp.array(lengths, jnp.int32)
        starts = None if starts is None else jnp.array(starts, jnp.int32)
        out = decode_attention(q, k, v, lengths, kv_starts=starts, block_k=block_k, num_splits=splits,
                               interpret=self.INTERPRET)
        ref = decode_attention_reference(q, k, v, lengths, kv_starts=starts)
        assert out.shape == q.shape and out.dtype == dtype and not bool(jnp.isnan(out).any())
        assert max_err(out, ref) <= TOL[dtype]
        for b, n in enumerate(lengths.tolist()):
            if n == 0:
                assert float(jnp.abs(out[b]).max()) == 0.0

    @pytest.mark.parametrize("mask", [
        MaskSpec(causal=True, q_offset=jnp.array([37, 5]), kv_lengths=jnp.array([38, 6])),
        MaskSpec(causal=True, q_offset=jnp.array([50, 9]), prefix_lengths=jnp.array([20, 30]), sliding_window=16),
        MaskSpec(causal=False, q_offset=jnp.array([30, 2]), sliding_window=8),
    ], ids=["cache", "prefix_window", "bidir_window"])
    def test_pallas_dispatch_single_query(self, mask):
        """attention(kernels=self.pallas) with T == 1 goes through decode_range + decode_attention."""
        q, k, v = qkv(2, 1, 64, 4, 2, 64, seed=5)
        out = attention(q, k, v, mask, kernels=self.pallas)
        assert max_err(out, attention_reference(q, k, v, mask)) <= TOL[jnp.float32]

    def test_pallas_dispatch_prefill(self):
        q, k, v = qkv(1, 20, 20, 4, 2, 64, seed=6)
        mask = MaskSpec(causal=True, kv_lengths=jnp.array([17]))
        out = attention(q, k, v, mask, kernels=self.pallas)
        assert max_err(out, attention_reference(q, k, v, mask)) <= TOL[jnp.float32]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
class TestPallasKernelsCompiled(TestPallasKernels):
    INTERPRET = False


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_path_matches_reference(name, dtype):
    T, S, factory = MASKS[name]
    q, k, v = qkv(2, T, S, 4, 2, 64, dtype, seed=7)
    mask = factory(2, T, S)
    out = attention(q, k, v, mask, kernels=XLA)
    assert out.dtype == dtype
    assert max_err(out, attention_reference(q, k, v, mask)) <= TOL[dtype]


@pytest.mark.parametrize("name", ["packed", "windows", "packed_causal"])
def test_xla_segment_blocks_in_steps(monkeypatch, name):
    """Contiguous segments on the XLA path in sequential steps (a tiny STEP_BYTES forces several,
    as a full-attention layer over a large bucket does), all-padding steps skipped by lax.cond."""
    monkeypatch.setattr(segment_attention, "STEP_BYTES", 4096)
    T, S, factory = MASKS[name]
    q, k, v = qkv(2, T, S, 4, 2, 64, seed=13)
    mask = factory(2, T, S)
    Q, W, per_step = segment_attention.block_plan(2, T, 4, 2 * 2 * 64 * 4, mask.max_segment_length)
    assert -(-T // Q) > per_step  # really in steps
    text = jax.jit(lambda q, k, v, m: xla_attention(q, k, v, m)).lower(q, k, v, mask).as_text()
    assert "while" in text and "case" in text  # lax.map, lax.cond
    out = jax.jit(lambda q, k, v, m: xla_attention(q, k, v, m))(q, k, v, mask)
    assert max_err(out, attention_reference(q, k, v, mask)) <= TOL[jnp.float32]


def test_xla_segments_never_build_the_full_mask():
    """Qwen2.5-VL at a 4096-patch bucket (16 heads, H 80): windows of 64 patches go through
    [block, window] logits only; a full-attention layer (no bound) through steps of blocks; neither
    program holds a [4096, 4096] array. Without contiguous_segments the dense mask is there."""
    T, N, H = 4096, 16, 80
    q = jax.ShapeDtypeStruct((1, T, N, H), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, T), jnp.int32)
    lower = lambda mask: jax.jit(lambda q, k, v, m: xla_attention(q, k, v, m)).lower(q, q, q, mask).as_text()
    for bound in (64, None):
        text = lower(MaskSpec(causal=False, q_segment_ids=seg, contiguous_segments=True, max_segment_length=bound))
        assert f"{T}x{T}" not in text, bound
    assert f"{T}x{T}" in lower(MaskSpec(causal=False, q_segment_ids=seg))


# The cache path ("BKSH", one query) computes probs @ V as a multiply + reduce instead of a
# dot (mmjax/kernels/attention.py); it must agree with the reference like the dot path does.
# In float32 on CPU the default policy sends it to the cpu.decode_attention kernel; without CPU
# custom calls (as under a mesh) it stays on XLA's ops: both ways are checked.
@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("B,G,trivial", [(1, 1, False), (3, 3, False), (2, 2, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_cache_path_single_query(B, G, trivial, dtype, cpu_kernels):
    S, K, H = 70, 2, 64
    q, k, v = qkv(B, 1, S, K * G, K, H, dtype, seed=11)
    lengths = jnp.array([70, 33, 1][:B])
    mask = MaskSpec() if trivial else MaskSpec(causal=True, kv_lengths=lengths, q_offset=lengths - 1)
    kernels = KernelPolicy() if cpu_kernels else KernelPolicy().without_cpu_custom_calls()
    out = attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, kernels=kernels, kv_layout="BKSH")
    assert out.dtype == dtype and out.shape == q.shape
    assert max_err(out, attention_reference(q, k, v, mask)) <= TOL[dtype]
    assert max_err(out, attention(q, k, v, mask, kernels=XLA)) <= TOL[dtype]  # = the BSKH dot path


def test_xla_path_matches_hf_eager():
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import eager_attention_forward

    B, T, S, N, K, H = 2, 12, 20, 4, 2, 32
    q, k, v = qkv(B, T, S, N, K, H, seed=8)
    mask = MaskSpec(causal=True, q_offset=jnp.array([8, 3]), kv_lengths=jnp.array([20, 15]))
    ok = np.asarray(make_mask(mask, T, S))  # [B, 1, T, S]; every row sees >= 1 key
    additive = torch.from_numpy(np.where(ok, 0.0, np.finfo(np.float32).min).astype(np.float32))
    to_t = lambda x: torch.from_numpy(np.array(x)).transpose(1, 2)  # [B, heads, len, H]
    module = SimpleNamespace(num_key_value_groups=N // K, training=False)
    hf, _ = eager_attention_forward(module, to_t(q), to_t(k), to_t(v), additive, scaling=1 / math.sqrt(H))
    ours = attention(q, k, v, mask, kernels=XLA)
    assert np.max(np.abs(np.asarray(ours) - hf.numpy())) <= 1e-6


def test_make_mask_by_hand():
    T, S = 3, 5
    causal = make_mask(MaskSpec(causal=True, q_offset=jnp.array([2])), T, S)
    np.testing.assert_array_equal(causal[0, 0], np.array(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool))
    window = make_mask(MaskSpec(causal=True, q_offset=jnp.array([2]), sliding_window=2), T, S)
    np.testing.assert_array_equal(window[0, 0], np.array(
        [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], bool))
    prefix = make_mask(MaskSpec(causal=True, prefix_lengths=jnp.array([2]), kv_lengths=jnp.array([4])), 4, S)
    np.testing.assert_array_equal(prefix[0, 0], np.array(
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool))
    bidir = make_mask(MaskSpec(causal=False, q_offset=jnp.array([1]), sliding_window=2), T, S)
    np.testing.assert_array_equal(bidir[0, 0], np.array(
        [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], bool))
    seg = jnp.array([[0, 0, 1, -1]])
    segments = make_mask(MaskSpec(causal=False, q_segment_ids=seg), 4, 4)
    np.testing.assert_array_equal(segments[0, 0], np.array(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool))
    assert make_mask(MaskSpec(causal=False), T, S).shape == (1, 1, T, S)


def test_decode_range_matches_make_mask():
    masks = [
        MaskSpec(causal=True, q_offset=jnp.array([3, 9]), kv_lengths=jnp.array([4, 7]), sliding_window=3),
        MaskSpec(causal=True, q_offset=jnp.array([2, 9]), prefix_lengths=jnp.array([6, 4]), sliding_window=2),
        MaskSpec(causal=False, q_offset=jnp.array([0, 8]), sliding_window=4),
    ]
    for mask in masks:
        start, end = decode_range(mask, 2, 10)
        kpos = np.arange(10)
        want = (kpos >= np.asarray(start)[:, None]) & (kpos < np.asarray(end)[:, None])
        np.testing.assert_array_equal(np.asarray(make_mask(mask, 1, 10))[:, 0, 0], want)


def random_runs(rng, length, max_run, pad_frac=0.15):
    """Segment ids [length]: runs of random lengths 1..max_run with distinct ids, some runs -1."""
    out, i = [], 0
    while len(out) < length:
        n = int(rng.integers(1, max_run + 1))
        out += [-1 if rng.random() < pad_frac else i] * n
        i += 1
    return np.array(out[:length], np.int32)


def test_query_ranges_of_contiguous_segments_match_make_mask():
    """Contiguous segments give each query its run intersected with every other term; 40 random
    masks (runs of 1..12 with padding runs, causal or not, windows, key padding, offsets, prefixes)."""
    rng = np.random.default_rng(0)
    ranges = jax.jit(attention_module.query_ranges, static_argnums=(1, 2, 3))
    for i in range(40):
        B, T = 2, (5, 41)[i % 2]
        kw = dict(causal=bool(rng.integers(2)))
        if rng.integers(2):
            kw["sliding_window"] = int(rng.integers(1, 10))
        if rng.integers(2):
            kw["kv_lengths"] = jnp.asarray(rng.integers(0, T + 1, B), jnp.int32)
        if rng.integers(2):
            kw["q_offset"] = jnp.asarray(rng.integers(0, 4, B), jnp.int32)
        if kw["causal"] and rng.integers(2):
            kw["prefix_lengths"] = jnp.asarray(rng.integers(0, T, B), jnp.int32)
        seg = np.stack([random_runs(rng, T, 12), random_runs(rng, T, 12)])
        mask = MaskSpec(q_segment_ids=jnp.asarray(seg), contiguous_segments=True, **kw)
        start, end = ranges(mask, B, T, T)
        kpos = np.arange(T)
        got = (kpos >= np.asarray(start)[..., None]) & (kpos < np.asarray(end)[..., None])
        np.testing.assert_array_equal(got, np.broadcast_to(np.asarray(make_mask(mask, T, T))[:, 0], (B, T, T)), str(kw))


def test_contiguous_segments_are_checked():
    seg = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(InputError, match="contiguous_segments=True needs q_segment_ids"):
        MaskSpec(contiguous_segments=True)
    with pytest.raises(InputError, match="contiguous_segments=True needs q_segment_ids and no kv_segment_ids"):
        MaskSpec(q_segment_ids=seg, kv_segment_ids=seg, contiguous_segments=True)
    with pytest.raises(InputError, match="max_segment_length=0 needs contiguous_segments=True"):
        MaskSpec(q_segment_ids=seg, contiguous_segments=True, max_segment_length=0)
    with pytest.raises(InputError, match="max_segment_length=4 needs contiguous_segments=True"):
        MaskSpec(q_segment_ids=seg, max_segment_length=4)
    with pytest.raises(InputError, match="query_ranges: segment ids that are not contiguous_segments"):
        attention_module.query_ranges(MaskSpec(q_segment_ids=seg), 1, 4, 4)


def test_mask_spec_is_a_pytree_with_static_flags():
    mask = MaskSpec(causal=True, kv_lengths=jnp.array([3]), sliding_window=4)
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    assert len(leaves) == 1
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.causal and again.sliding_window == 4 and again.bidirectional is False
    packed = MaskSpec(causal=False, q_segment_ids=jnp.zeros((1, 4), jnp.int32), contiguous_segments=True,
                      max_segment_length=4)
    leaves, treedef = jax.tree_util.tree_flatten(packed)
    assert len(leaves) == 1 and jax.tree_util.tree_unflatten(treedef, leaves).max_segment_length == 4


def test_errors_name_the_thing():
    q, k, v = qkv(1, 8, 8, 3, 2, 64)
    with pytest.raises(InputError, match="num_heads=3 must be a multiple of num_kv_heads=2"):
        attention(q, k, v, MaskSpec(), kernels=XLA)
    q, k, v = qkv(1, 8, 8, 2, 2, 64)
    with pytest.raises(InputError, match="head_dim=32 of q"):
        flash_attention(q[..., :32], k, v, mask=MaskSpec(), interpret=True)
    with pytest.raises(InputError, match=r"MaskSpec.kv_lengths: expected shape \(1,\)"):
        flash_attention(q, k, v, mask=MaskSpec(kv_lengths=jnp.array([1, 2])), interpret=True)
    with pytest.raises(InputError, match=r"MaskSpec.kv_lengths: expected shape \(1,\)"):
        attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), MaskSpec(kv_lengths=jnp.array([1, 2])), kv_layout="BKSH")
    with pytest.raises(InputError, match="block_q=24 must be a power of two"):
        BlockSizes(block_q=24)
    with pytest.raises(ValueError, match="KernelPolicy.attention_gpu='triton' is not one of pallas, xla"):
        KernelPolicy(attention_gpu="triton")
    with pytest.raises(InputError, match="kernels='xla' is not a KernelPolicy"):
        attention(q, k, v, MaskSpec(), kernels="xla")
