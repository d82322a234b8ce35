"""The KV cache stored as bfloat16 or int8 (mmjax.kernels.kv_cache; load(kv_cache_dtype=...)).

Logits of 16 teacher-forced tokens read through the cache are compared with the same model's
fp32 cache (bounds in tests/tolerances.py, "kv_cache", with their reasoning); greedy tokens are
reported against the fp32 cache's; the serving engine's paged int8/bf16 pools answer exactly as
mmjax.generate with the same cache dtype."""
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax.errors import InputError
from mmjax.kernels import kv_cache
from mmjax.kernels.attention import MaskSpec
from mmjax.serving import ServingEngine
from tests.tolerances import tol

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
PROMPT = "<image> describe the cat on the table"


def test_int8_round_trip_is_within_half_a_step():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 64)) * [[[0.01]], [[1.0]], [[50.0]]], jnp.float32)
    q, scale = kv_cache.quantize(x)
    assert q.dtype == jnp.int8 and scale.shape == (3, 5)
    err = jnp.abs(kv_cache.dequantize(q, scale) - x)
    assert bool(jnp.all(err <= scale[..., None] * 0.5 + 1e-7))
    zq, zs = kv_cache.quantize(jnp.zeros((2, 8)))
    assert bool(jnp.all(zq == 0)) and bool(jnp.all(zs == 1.0))


def test_unknown_kv_cache_dtype_is_refused(tiny_llava):
    with pytest.raises(InputError, match="kv_cache_dtype"):
        mmjax.load(tiny_llava.flax, kv_cache_dtype="fp8")


def forced_logits(model, n_forced=16, seed=1):
    """Logits of n_forced random tokens fed after the prompt through the model's cache: the
    prompt's keys written by prefill, then the forced tokens written and attended in one call."""
    inputs = model.preprocess([IMAGE], PROMPT)
    ids = np.asarray(inputs["input_ids"])
    T = ids.shape[1]
    batch = {"input_ids": jnp.asarray(ids), "pixel_values": jnp.asarray(inputs["pixel_values"])}
    forced = jnp.asarray(np.random.default_rng(seed).integers(5, 500, (1, n_forced)), jnp.int32)

    def run(mod):
        x, pos, _ = mod.embed(batch)
        _, kv = mod.decode(x, pos, MaskSpec(causal=True, kv_lengths=jnp.full((1,), T, jnp.int32)))
        cache = [model.engine._cache_layer(c, T + n_forced) for c in kv]
        idx = jnp.full((1,), T, jnp.int32)
        h, _ = mod.decode(mod.embed_tokens(forced), (T + jnp.arange(n_forced))[None],
                          MaskSpec(causal=True, kv_lengths=idx + n_forced, q_offset=idx), cache, idx)
        return mod.logits(h)

    return np.asarray(model.module.apply({"params": model.params}, method=run))


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_logits_through_a_narrow_cache_stay_within_the_table(tiny_llava, dtype):
    ref_model = mmjax.load(tiny_llava.flax)
    model = mmjax.load(tiny_llava.flax, kv_cache_dtype=dtype)
    worst = max(float(np.abs(forced_logits(model, seed=s) - forced_logits(ref_model, seed=s)).max()) for s in (1, 2, 3))
    ref_tokens = mmjax.generate(ref_model, [IMAGE], PROMPT, max_new_tokens=32, min_new_tokens=32).token_ids
    tokens = mmjax.generate(model, [IMAGE], PROMPT, max_new_tokens=32, min_new_tokens=32).token_ids
    same = sum(a == b for a, b in zip(tokens, ref_tokens))
    print(f"kv_cache_dtype={dtype}: logits max |d| {worst:.2e} vs the fp32 cache; greedy tokens equal to the fp32 "
          f"cache's: {same}/32 (first divergence at {next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)})")
    assert 0 < worst <= tol("kv_cache", dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_engine_pools_in_a_narrow_dtype_answer_as_generate(tiny_llava, dtype):
    model = mmjax.load(tiny_llava.flax, kv_cache_dtype=dtype)
    eng = ServingEngine(model, max_num_seqs=4, page_size=8)
    prompts = [PROMPT, "<image> hello", "<image>" + " what is it" * 3]
    outs = eng.generate([eng.make_request([IMAGE], p, max_new_tokens=10) for p in prompts])
    for p, o in zip(prompts, outs):
        assert o.token_ids == mmjax.generate(model, [IMAGE], p, max_new_tokens=10).token_ids
    pools = eng.pools[0]
    assert pools["k"].dtype == jnp.dtype(dtype) and (("k_scale" in pools) == (dtype == "int8"))
    per_token = sum(a.nbytes for a in pools.values()) / (pools["k"].shape[1] * pools["k"].shape[2])
    assert per_token < (0.55 if dtype == "bfloat16" else 0.4) * 2 * pools["k"].shape[0] * pools["k"].shape[3] * 4


@pytest.mark.parametrize("dtype, target", [("bfloat16", "mmjax_decode_attention_bf16"),
                                           ("int8", "mmjax_decode_attention_s8")])
def test_a_narrow_cache_reaches_the_cpu_kernel_unwidened(dtype, target):
    """Static cache (attention, BKSH) and paged pools alike: the C++ kernel reads the narrow
    cache itself; no float copy of it is made first (no convert of a cache-sized array)."""
    import jax

    from mmjax.kernels.attention import attention
    from mmjax.kernels.cpu import ffi
    from mmjax.kernels.paged_attention import paged_attention

    if not ffi.available():
        pytest.fail(f"the C++ CPU kernels did not build: {ffi.error()}")
    B, K, G, S, H, P, Z = 2, 2, 2, 64, 16, 9, 8
    q = jax.ShapeDtypeStruct((B, 1, K * G, H), jnp.float32)
    store = jnp.int8 if dtype == "int8" else jnp.bfloat16
    scales = (lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)) if dtype == "int8" else (lambda *s: None)
    mask = MaskSpec(causal=True, kv_lengths=jnp.full((B,), 5, jnp.int32), q_offset=jnp.full((B,), 4, jnp.int32))
    static = jax.jit(lambda q, k, v, ks, vs: attention(q, k, v, mask, kv_layout="BKSH", k_scale=ks, v_scale=vs)).lower(
        q, *[jax.ShapeDtypeStruct((B, K, S, H), store)] * 2, scales(B, K, S), scales(B, K, S)).as_text()
    paged = jax.jit(lambda q, k, v, t, n, ks, vs: paged_attention(q, k, v, t, n, k_scales=ks, v_scales=vs)).lower(
        q, *[jax.ShapeDtypeStruct((K, P, Z, H), store)] * 2, jax.ShapeDtypeStruct((B, 4), jnp.int32),
        jax.ShapeDtypeStruct((B,), jnp.int32), scales(K, P, Z), scales(K, P, Z)).as_text()
    narrow = "i8" if dtype == "int8" else "bf16"
    paged_target = target.replace("mmjax_", "mmjax_paged_")  # reads the pools in place, no gather
    for text, name, shape in ((static, target, f"{B}x{K}x{S}x{H}"), (paged, paged_target, f"{K}x{P}x{Z}x{H}")):
        assert text.count(name) == 1
        assert f"(tensor<{shape}x{narrow}>) -> tensor<{shape}xf32>" not in text  # no widened copy
    assert "gather" not in paged
