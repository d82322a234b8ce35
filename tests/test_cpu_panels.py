"""Column-panel kernels (mmjax/kernels/cpu/panels.cc, .py): the kernel against its reference,
packing, the Einsum paths that read a packed kernel, and mmjax.load packing the decoder."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax
from mmjax.kernels.cpu import panels
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.linear import Einsum
from mmjax.quantization import quantize_int8
from mmjax.tree import flatten_params


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def weights(kind, K, N, seed):
    """(w [K, N], scale or None) of each weight dtype the kernel reads."""
    if kind == "float32":
        return rand(K, N, seed=seed), None
    if kind == "bfloat16":
        return rand(K, N, seed=seed).astype(jnp.bfloat16), None
    q = np.random.default_rng(seed).integers(-127, 128, (K, N)).astype(np.int8)
    return jnp.asarray(q), jnp.asarray(np.random.default_rng(seed + 1).uniform(0.001, 0.02, N).astype(np.float32))


def check(kind, M, K, N):
    x = rand(M, K, seed=1)
    w, scale = weights(kind, K, N, seed=2)
    p = jnp.asarray(panels.pack(w))
    out = jax.jit(panels.gemv_panels, static_argnums=2)(x, p, N, scale)
    ref = panels.gemv_panels_reference(x, p, N, scale)
    # float32 sums of K products in another order: |error| <= K * eps * max|partial sum|
    tol = K * 1.2e-7 * float(jnp.max(jnp.abs(ref))) + 1e-6
    assert out.shape == (M, N) and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) <= tol


# Every row count has its own tile (1..8), prefills run 6-row tiles and a remainder (9, 13, 70);
# N not a multiple of 64 (a padded last panel) or of one register, K of one row, and the
# benchmark model's shapes.
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 70])
def test_every_row_count_matches_reference(kind, M):
    check(kind, M, 131, 1000)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("K,N", [(768, 2048), (2048, 768), (5, 17), (1, 64), (64, 4100), (768, 256)])
def test_shapes_match_reference(kind, M, K, N):
    check(kind, M, K, N)


def test_columns_do_not_depend_on_the_split():
    """Each column is summed over k in order, whatever panels a thread takes: the first 300
    columns of a 2000-column product equal a 300-column product bit for bit."""
    x, w = rand(3, 517, seed=3), rand(517, 2000, seed=4)
    wide = panels.gemv_panels(x, jnp.asarray(panels.pack(w)), 2000)
    narrow = panels.gemv_panels(x, jnp.asarray(panels.pack(w[:, :300])), 300)
    assert np.array_equal(np.asarray(wide[:, :300]), np.asarray(narrow))


def test_pack_round_trip_and_padding():
    w = np.arange(5 * 70, dtype=np.float32).reshape(5, 70)
    p = panels.pack(w)
    assert p.shape == (2, 5, 64) and p.flags["C_CONTIGUOUS"]
    assert np.array_equal(p[1, :, :6], w[:, 64:]) and not p[1, :, 6:].any()  # zero past N
    assert np.array_equal(np.asarray(panels.unpack(jnp.asarray(p), 70)), w)
    with pytest.raises(ValueError, match="do not hold 200 columns"):
        panels.unpack(jnp.asarray(p), 200)
    with pytest.raises(ValueError, match="expects a \\[K, N\\] kernel"):
        panels.pack(np.zeros((2, 3, 4)))


def test_rejects_what_it_cannot_do():
    p = jnp.asarray(panels.pack(np.zeros((8, 100), np.float32)))
    with pytest.raises(ValueError, match="expects x \\[M, K\\] and panels"):
        panels.gemv_panels(rand(1, 9), p, 100)
    with pytest.raises(ValueError, match="expects x \\[M, K\\] and panels"):
        panels.gemv_panels(rand(1, 8), p, 300)  # 300 columns need 5 panels
    with pytest.raises(ValueError, match="x float32 and panels one of"):
        panels.gemv_panels(rand(1, 8).astype(jnp.bfloat16), p, 100)
    q = jnp.zeros((2, 8, 64), jnp.int8)
    with pytest.raises(ValueError, match="int8 panels need their scale"):
        panels.gemv_panels(rand(1, 8), q, 100)
    with pytest.raises(ValueError, match="scale must be float32 \\[100\\]"):
        panels.gemv_panels(rand(1, 8), q, 100, jnp.ones((64,)))


def lowered(layer, params, x):
    return jax.jit(layer.apply).lower(params, x).as_text()


def packed_layer(kind, shape, eqn, flat=False, bias=None):
    """(layer, checkpoint-layout params, the same params with the kernel packed)."""
    dtype = jnp.bfloat16 if kind == "bfloat16" else jnp.float32
    layer = Einsum(shape, eqn, bias, dtype, flatten_contraction=flat)
    x = jnp.zeros((1, 1, *shape[: len(shape) - 1])) if flat else jnp.zeros((1, 1, shape[0]))
    params = jax.tree_util.tree_map(lambda a: a + 0.05, layer.init(jax.random.PRNGKey(1), x))["params"]
    c = 2 if flat else 1
    if kind == "int8":
        q, scale = quantize_int8(params["kernel"], c)
        params = {**params, "kernel": jnp.asarray(q), "kernel_scale": jnp.asarray(scale)}
    contractions = {"kernel": c}
    packed = panels.pack_params(dict(params), contractions)  # packs in place: a copy of the top level
    assert set(packed) == (set(params) - {"kernel"}) | {panels.PACKED}
    return layer, {"params": params}, {"params": packed}


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_einsum_reads_packed_kernels(kind):
    """The o projection (2 contracted axes, a bias) and a q projection (2 output axes), packed:
    the panel call on CPU for decode rows and prefills, the same values as the unpacked layer."""
    for shape, eqn, flat, bias, x_shape in [((4, 16, 96), "BTNH,NHD->BTD", True, (96,), (4, 16)),
                                            ((96, 4, 16), "BTD,DNH->BTNH", False, None, (96,))]:
        layer, plain, packed = packed_layer(kind, shape, eqn, flat, bias)
        for b, t in ((1, 1), (8, 1), (3, 11)):  # decode steps of 1 and 8 rows, a 33-row prefill
            x = rand(b, t, *x_shape, seed=b * t).astype(layer.dtype)
            assert panels.TARGETS[kind] in lowered(layer, packed, x)
            out, ref = jax.jit(layer.apply)(packed, x), jax.jit(layer.apply)(plain, x)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            # float32: summation order only; bf16: both round the float32 sum to bf16 once
            bound = 1e-5 if kind != "bfloat16" else 2 ** -7 * float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
            assert err <= bound, (kind, eqn, b, t, err)


def test_prefills_of_every_dtype_take_the_panel_kernel():
    layer, plain, packed = packed_layer("float32", (96, 4, 16), "BTD,DNH->BTNH")
    x = rand(1, 200, 96, seed=5)  # 33 6-row tiles and 2 rows
    assert panels.TARGETS["float32"] in lowered(layer, packed, x)
    assert float(jnp.max(jnp.abs(jax.jit(layer.apply)(packed, x) - jax.jit(layer.apply)(plain, x)))) <= 1e-5
    b16, _, p16 = packed_layer("bfloat16", (96, 4, 16), "BTD,DNH->BTNH")
    assert panels.TARGETS["bfloat16"] in lowered(b16, p16, x.astype(jnp.bfloat16))
    other = layer.clone(kernels=KernelPolicy(platforms=("cuda",)))  # lowered elsewhere: unpacked in the program
    assert "mmjax_gemv_panels" not in lowered(other, packed, rand(1, 1, 96))
    xla = layer.clone(kernels=KernelPolicy(matmul_cpu="xla"))  # the policy's choice holds for packed kernels too
    assert "mmjax_gemv_panels" not in lowered(xla, packed, rand(1, 1, 96))
    assert float(jnp.max(jnp.abs(jax.jit(xla.apply)(packed, x) - jax.jit(layer.apply)(plain, x)))) <= 1e-5


def test_grad_through_a_packed_kernel_matches_xla():
    layer, plain, packed = packed_layer("float32", (64, 4, 16), "BTD,DNH->BTNH")
    x = rand(3, 1, 64, seed=10)
    loss = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))
    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(packed, x)
    rp, rx = jax.jit(jax.grad(loss, argnums=(0, 1)))(plain, x)
    assert float(jnp.max(jnp.abs(gx - rx))) <= 1e-5
    dk = panels.unpack(gp["params"][panels.PACKED], 64).reshape(64, 4, 16)
    assert float(jnp.max(jnp.abs(dk - rp["params"]["kernel"]))) <= 1e-5


def test_load_packs_the_decoder_and_generates_the_same(tiny_llava):
    default = mmjax.load(tiny_llava.flax)  # float32 kernels stay as stored unless asked (prefill)
    assert not any(k.endswith(panels.PACKED) for k in flatten_params(default.params))
    packed, plain = mmjax.load(tiny_llava.flax, pack_weights=True), mmjax.load(tiny_llava.flax, pack_weights=False)
    p, q = flatten_params(packed.params), flatten_params(plain.params)
    kernels = sorted(k for k in q if k.endswith("/kernel") and k.startswith("decoder/"))

    def packed_path(k):  # q|k|v and gate|up fused before packing (mmjax.layers.fusion)
        k = re.sub(r"/attn/[qkv]/kernel$", "/attn/qkv/kernel", re.sub(r"/mlp/(gate|up)/kernel$", "/mlp/gate_up/kernel", k))
        return k[: -len("kernel")] + panels.PACKED

    assert kernels and all(packed_path(k) in p and k not in p for k in kernels)
    assert len({packed_path(k) for k in kernels}) == len(kernels) - 3 * 2  # 2 layers: 7 products -> 4
    assert "vision/layers_0/attn/q/kernel" in p  # the tower runs with many rows: left as stored
    assert not any(k.endswith(panels.PACKED) for k in q)
    back = flatten_params(packed.checkpoint_params())
    assert set(back) == set(q) and all(back[k].shape == q[k].shape and np.array_equal(back[k], q[k]) for k in q)
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    kw = dict(max_new_tokens=16, min_new_tokens=16)
    a = mmjax.generate(packed, [[image]] * 3, ["describe it", "hi", "go on"], **kw)
    b = mmjax.generate(plain, [[image]] * 3, ["describe it", "hi", "go on"], **kw)
    assert a.token_ids == b.token_ids


def test_load_packs_narrow_kernels_by_default(tiny_llava, tmp_path):
    from converters.torch2flax import convert

    convert(tiny_llava.hf, tmp_path / "bf16", dtype="bfloat16", progress=False)
    m = mmjax.load(tmp_path / "bf16")
    p = flatten_params(m.params)
    up = "decoder/layers_0/mlp/gate_up/kernel_panels"  # gate|up fused, then packed: [2F / 64, D, 64]
    assert p[up].dtype == jnp.bfloat16 and p[up].shape == (2 * 128 // 64, 64, 64) and "decoder/layers_0/mlp/up/kernel" not in p
    assert p["decoder/lm_head/kernel_panels"].shape == (512 // 64, 64, 64)  # [P, K = D, 64], vocab 512
    out = mmjax.generate(m, None, "Tell me a story.", max_new_tokens=4)
    assert len(out.token_ids) == 4
