"""The CPU decode matmul kernel (mmjax/kernels/cpu/gemv.cc) against its reference, and the
one place that routes products to it (mmjax.layers.linear.Einsum)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels.cpu import ffi
from mmjax.kernels.cpu import gemv as cpu_gemv
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.linear import Einsum, _row_matmul_split


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def test_builds_here():
    # CI must have what the kernel needs; a user without a compiler gets XLA's dot and a warning.
    assert ffi.available(), ffi.error()


def check(M, K, N):
    x, w = rand(M, K, seed=1), rand(K, N, seed=2)
    out = jax.jit(cpu_gemv.gemv)(x, w)
    ref = cpu_gemv.gemv_reference(x, w)
    # float32 sums of K products in another order: |error| <= K * eps * max|partial sum|
    tol = K * 1.2e-7 * float(jnp.max(jnp.abs(ref))) + 1e-6
    assert out.shape == (M, N) and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) <= tol


# K not a multiple of the 4- or 8-row steps, N not a multiple of 16 or 32 or of the per-thread
# block, N below the 64-column minimum block, N over the 1024-column accumulator block, and the
# benchmark's shapes; one row (its own loop) and eight (the largest the engine sends).
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("K,N", [(768, 2048), (770, 1000), (5, 17), (2048, 768), (3, 64), (768, 32000)])
def test_matches_reference(M, K, N):
    check(M, K, N)


# Every row count has its own unrolled kernel; 9 and 17 run in groups of 8.
@pytest.mark.parametrize("M", [2, 3, 4, 5, 6, 7, 9, 17])
def test_every_row_count(M):
    check(M, 771, 1000)


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        cpu_gemv.gemv(rand(2, 8), rand(9, 4))
    with pytest.raises(ValueError, match="x float32 and w one of"):
        cpu_gemv.gemv(rand(1, 8).astype(jnp.bfloat16), rand(8, 4).astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="int8 weights need their scale"):
        cpu_gemv.gemv(rand(1, 8), jnp.zeros((8, 4), jnp.int8))
    with pytest.raises(ValueError, match="scale must be float32 \\[4\\]"):
        cpu_gemv.gemv(rand(1, 8), jnp.zeros((8, 4), jnp.int8), jnp.ones((5,)))


def narrow(kind, K, N, seed):
    """(w, scale) of a weight dtype the kernel widens: bfloat16, or int8 with a per-column scale."""
    if kind == "bfloat16":
        return rand(K, N, seed=seed).astype(jnp.bfloat16), None
    q = np.random.default_rng(seed).integers(-127, 128, (K, N)).astype(np.int8)
    return jnp.asarray(q), jnp.asarray(np.random.default_rng(seed + 1).uniform(0.001, 0.02, N).astype(np.float32))


# The narrow weights take the same loops with widening loads: every row count, the tails of a
# native register (N % 8, N % 16), K not a multiple of the 4- and 8-row steps. The reference
# widens the same weights to float32, so only the summation order differs (the float32 bound).
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("K,N", [(771, 1000), (5, 17), (768, 2048), (64, 4100)])
def test_narrow_weights_match_reference(kind, M, K, N):
    x = rand(M, K, seed=1)
    w, scale = narrow(kind, K, N, seed=2)
    out = jax.jit(cpu_gemv.gemv)(x, w, scale)
    ref = cpu_gemv.gemv_reference(x, w, scale)
    tol = K * 1.2e-7 * float(jnp.max(jnp.abs(ref))) + 1e-6
    assert out.shape == (M, N) and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) <= tol


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_einsum_with_narrow_weights_matches_xla(kind):
    """Einsum's two paths for bf16 and int8 kernels: the gemv custom call and XLA's einsum."""
    from mmjax.quantization import quantize_int8

    dtype = jnp.bfloat16 if kind == "bfloat16" else jnp.float32
    layer = Einsum((4, 16, 32), "BTNH,NHD->BTD", (32,), dtype, flatten_contraction=True)
    x = rand(3, 1, 4, 16, seed=5)
    params = layer.init(jax.random.PRNGKey(1), x)
    if kind == "int8":
        q, scale = quantize_int8(params["params"]["kernel"], 2)
        params = {"params": {**params["params"], "kernel": jnp.asarray(q), "kernel_scale": jnp.asarray(scale)}}
    xla = layer.clone(kernels=KernelPolicy(matmul_cpu="xla"))
    assert cpu_gemv.TARGETS[kind] in lowered_text(layer, params, x)
    assert "mmjax_gemv" not in lowered_text(xla, params, x)
    out, ref = jax.jit(layer.apply)(params, x), jax.jit(xla.apply)(params, x)
    assert out.dtype == ref.dtype == dtype
    # int8 in a float32 model: summation order only. bf16: both round the product to bf16 once
    # (XLA's dot accumulates in float32 too), so they differ by at most an ulp of the output.
    bound = 1e-5 if kind == "int8" else 2 ** -7 * float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)))) <= bound


@pytest.mark.parametrize("eqn,x_ndim,flat,expected", [
    ("BTD,DNH->BTNH", 3, False, 1),  # q / k / v projections
    ("BTNH,NHD->BTD", 4, True, 2),  # o projection, flattened contraction
    ("BTD,DF->BTF", 3, False, 1),  # MLP, untied head
    ("BTD,VD->BTV", 3, False, None),  # tied head: kernel is [out, in]
    ("BTD,DNH->BNTH", 3, False, None),  # output axes reordered
])
def test_which_einsums_qualify(eqn, x_ndim, flat, expected):
    assert _row_matmul_split(eqn, x_ndim, flat) == expected


def lowered_text(layer, *args):
    return jax.jit(layer.apply).lower(*args).as_text()


def test_einsum_routes_decode_rows_only(monkeypatch):
    layer = Einsum((64, 4, 16), "BTD,DNH->BTNH")
    params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 64)))
    one, two = rand(1, 1, 64, seed=3), rand(2, 1, 64, seed=4)
    assert cpu_gemv.TARGET in lowered_text(layer, params, one)
    assert cpu_gemv.TARGET in lowered_text(layer, params, two)  # a batch-2 decode step
    eight, nine = rand(8, 1, 64, seed=8), rand(3, 3, 64, seed=9)
    assert cpu_gemv.TARGET in lowered_text(layer, params, eight)
    assert cpu_gemv.TARGET not in lowered_text(layer, params, nine)  # 9 rows: XLA's GEMM
    out = jax.jit(lambda p, x: layer.apply(p, x))(params, eight)
    ref = jnp.einsum("BTD,DNH->BTNH", eight, params["params"]["kernel"], precision=jax.lax.Precision.HIGHEST)
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5
    mesh = layer.clone(kernels=KernelPolicy().without_cpu_custom_calls())  # what mmjax.load does under a mesh
    assert cpu_gemv.TARGET not in lowered_text(mesh, params, one)
    monkeypatch.setenv("MMJAX_CPU_GEMV", "0")  # read by from_env (mmjax.load), not while tracing
    off = layer.clone(kernels=KernelPolicy.from_env())
    assert cpu_gemv.TARGET not in lowered_text(off, params, one)
    assert cpu_gemv.TARGET in lowered_text(layer, params, one)
    xla = jax.jit(off.apply)(params, one)
    kernel = jax.jit(layer.apply)(params, one)
    assert kernel.shape == (1, 1, 4, 16)
    assert float(jnp.max(jnp.abs(kernel - xla))) <= 1e-5


def test_o_projection_with_bias_matches_einsum():
    layer = Einsum((4, 16, 32), "BTNH,NHD->BTD", (32,), flatten_contraction=True)
    x = rand(1, 1, 4, 16, seed=5)
    params = layer.init(jax.random.PRNGKey(1), x)
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # a nonzero bias
    out = jax.jit(lambda p, x: layer.apply(p, x))(params, x)
    k, b = params["params"]["kernel"], params["params"]["bias"]
    ref = jnp.einsum("BTNH,NHD->BTD", x, k, precision=jax.lax.Precision.HIGHEST) + b
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5


def test_under_vmap():
    xs, w = rand(3, 1, 40, seed=6), rand(40, 24, seed=7)
    out = jax.jit(jax.vmap(cpu_gemv.gemv, in_axes=(0, None)))(xs, w)
    ref = jnp.stack([cpu_gemv.gemv_reference(x, w) for x in xs])
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-4


def test_grad_matches_xla():
    # The custom call has no derivative of its own; jax.grad takes XLA's products instead.
    layer = Einsum((64, 4, 16), "BTD,DNH->BTNH", (4, 16))
    x = rand(3, 1, 64, seed=10)
    params = layer.init(jax.random.PRNGKey(2), x)
    loss = lambda layer: lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))
    grad = lambda layer: jax.jit(jax.grad(loss(layer), argnums=(0, 1)))(params, x)
    assert cpu_gemv.TARGET in jax.jit(loss(layer)).lower(params, x).as_text()
    (gp, gx) = grad(layer)
    (rp, rx) = grad(layer.clone(kernels=KernelPolicy(matmul_cpu="xla")))
    assert float(jnp.max(jnp.abs(gx - rx))) <= 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(rp)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5
