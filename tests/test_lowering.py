"""The lowering tier: every kernel, and the policy's choice, lowered for each platform from this
CPU-only machine (jax.export with abstract inputs: no device and no memory needed).

Exported for CUDA a kernel must hold the Triton custom call and no mmjax CPU target; for TPU
the TPU kernels hold `tpu_custom_call`; lowered for CPU the default policy holds the CPU
targets and neither of the others. A lowering error fails the test: that is the point (the
interpret-mode tests in test_kernels.py / test_tpu_attention.py cannot see Triton or Mosaic
rejecting a block shape). Shapes are production ones (head dims 64/80/128, GQA 1/4/8, 4k-32k
tokens, bf16 and fp32); the 32k cases and the 7B decoder are marked slow.
"""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from mmjax.config import LlamaConfig
from mmjax.decoders.llama import LlamaDecoder
from mmjax.kernels import tpu_attention
from mmjax.kernels.attention import MaskSpec, attention
from mmjax.kernels.cpu import ffi
from mmjax.kernels.decode_attention import decode_attention
from mmjax.kernels.flash_attention import flash_attention
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.linear import Einsum
from mmjax.layers.rope import rope_tables

TRITON = "__gpu$xla.gpu.triton"
TPU = "tpu_custom_call"
CPU_TARGETS = tuple(ffi.TARGETS)  # mmjax_gemv_f32, mmjax_decode_attention_f32, ...
# jax.export refuses custom calls it does not know to be stable; these are ours to vouch for.
ALLOWED = [export.DisabledSafetyCheck.custom_call(t) for t in (TRITON, *CPU_TARGETS)]
N = 32  # query heads, as in a 7B model


def lowered(fn, platform, *args) -> str:
    """StableHLO text of jit(fn)(*args) exported for one platform (args may be ShapeDtypeStructs)."""
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=ALLOWED)(*args).mlir_module()


def calls(text: str) -> dict:
    """How many of each kind of custom call the text holds."""
    return {"triton": text.count(TRITON), "tpu": text.count(TPU), "cpu": sum(text.count(t) for t in CPU_TARGETS)}


def spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def rows(batch):
    return spec(batch, dtype=jnp.int32)


# (head dim H, GQA ratio G, tokens T, dtype): each H, G, dtype at least twice, T from 4k to 32k.
PREFILL = [
    (128, 4, 4096, jnp.bfloat16), (64, 1, 4096, jnp.float32), (80, 8, 8192, jnp.bfloat16),
    (128, 8, 8192, jnp.float32), (64, 4, 16384, jnp.bfloat16),
    pytest.param(128, 1, 32768, jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param(80, 4, 32768, jnp.float32, marks=pytest.mark.slow),
]
DECODE = [(128, 4, 4096, jnp.bfloat16), (64, 8, 8192, jnp.float32), (80, 1, 16384, jnp.bfloat16),
          pytest.param(128, 8, 32768, jnp.float32, marks=pytest.mark.slow)]


@pytest.mark.parametrize("H,G,T,dtype", PREFILL)
def test_flash_attention_exports_for_cuda(H, G, T, dtype):
    q, kv = spec(1, T, N, H, dtype=dtype), spec(1, T, N // G, H, dtype=dtype)
    mask = MaskSpec(causal=True, kv_lengths=rows(1), sliding_window=4096 if G == 8 else None)
    text = lowered(lambda q, k, v, m: flash_attention(q, k, v, mask=m), "cuda", q, kv, kv, mask)
    assert calls(text) == {"triton": 1, "tpu": 0, "cpu": 0}


def test_flash_attention_with_segments_exports_for_cuda():
    q, kv = spec(1, 4096, 16, 80), spec(1, 4096, 16, 80)  # a Qwen2-VL vision tower's packed images
    mask = MaskSpec(causal=False, q_segment_ids=spec(1, 4096, dtype=jnp.int32))
    text = lowered(lambda q, k, v, m: flash_attention(q, k, v, mask=m), "cuda", q, kv, kv, mask)
    assert calls(text) == {"triton": 1, "tpu": 0, "cpu": 0}


# The Qwen2-VL / Qwen2.5-VL tower (16 heads of 80) over packed images and windows: contiguous
# segments, the flash kernel's per-query-block key ranges; windows of 64 patches or whole images.
@pytest.mark.parametrize("P,window,dtype", [(4096, 64, jnp.bfloat16), (16384, 64, jnp.float32),
                                            (16384, None, jnp.bfloat16),
                                            pytest.param(65536, 64, jnp.bfloat16, marks=pytest.mark.slow)])
def test_flash_attention_with_contiguous_segments_exports_for_cuda(P, window, dtype):
    q = spec(1, P, 16, 80, dtype=dtype)
    mask = MaskSpec(causal=False, q_segment_ids=spec(1, P, dtype=jnp.int32), contiguous_segments=True,
                    max_segment_length=window)
    text = lowered(lambda q, k, v, m: flash_attention(q, k, v, mask=m), "cuda", q, q, q, mask)
    assert calls(text) == {"triton": 1, "tpu": 0, "cpu": 0}


@pytest.mark.parametrize("H,G,S,dtype", DECODE)
def test_decode_attention_exports_for_cuda(H, G, S, dtype):
    q, kv = spec(8, 1, N, H, dtype=dtype), spec(8, S, N // G, H, dtype=dtype)
    text = lowered(lambda q, k, v, n: decode_attention(q, k, v, n), "cuda", q, kv, kv, rows(8))
    assert calls(text) == {"triton": 1, "tpu": 0, "cpu": 0}


@pytest.mark.parametrize("H,G,T,dtype", PREFILL)
def test_splash_attention_exports_for_tpu(H, G, T, dtype):
    q, kv = spec(1, T, N, H, dtype=dtype), spec(1, T, N // G, H, dtype=dtype)
    mask = MaskSpec(causal=True, kv_lengths=rows(1), sliding_window=4096 if G == 8 else None)
    text = lowered(tpu_attention.splash_attention, "tpu", q, kv, kv, mask)
    assert calls(text) == {"triton": 0, "tpu": 1, "cpu": 0}


@pytest.mark.parametrize("H,G,S,dtype", [(128, 4, 4096, jnp.bfloat16), (128, 1, 16384, jnp.float32),
                                         pytest.param(128, 8, 32768, jnp.bfloat16, marks=pytest.mark.slow)])
def test_paged_decode_exports_for_tpu(H, G, S, dtype):
    q, cache = spec(8, 1, N, H, dtype=dtype), spec(8, N // G, S, H, dtype=dtype)  # cache [B, K, S, H]
    text = lowered(tpu_attention.paged_decode, "tpu", q, cache, cache, rows(8))
    assert calls(text) == {"triton": 0, "tpu": 1, "cpu": 0}


# The default policy, through attention(): what each platform's program holds.
WANT = {
    "cuda": {"triton": 1, "tpu": 0, "cpu": 0},
    "tpu": {"triton": 0, "tpu": 1, "cpu": 0},
    "cpu": {"triton": 0, "tpu": 0, "cpu": 1},
}


@pytest.mark.parametrize("platform", sorted(WANT))
def test_attention_default_policy_prefill(platform):
    q, kv = spec(2, 512, 8, 128, dtype=jnp.float32), spec(2, 512, 2, 128, dtype=jnp.float32)
    mask = MaskSpec(causal=True, kv_lengths=rows(2))
    assert calls(lowered(attention, platform, q, kv, kv, mask)) == WANT[platform]


@pytest.mark.parametrize("platform", sorted(WANT))
def test_attention_default_policy_contiguous_segments(platform):
    """A vision tower's packed images: the CPU kernel takes them now (one interval per query), CUDA
    the flash kernel with its key ranges, TPU splash (segment ids)."""
    q = spec(1, 4096, 16, 80, dtype=jnp.float32)
    mask = MaskSpec(causal=False, q_segment_ids=spec(1, 4096, dtype=jnp.int32), contiguous_segments=True,
                    max_segment_length=64)
    assert calls(lowered(attention, platform, q, q, q, mask)) == WANT[platform]


@pytest.mark.parametrize("platform", sorted(WANT))
def test_attention_default_policy_decode(platform):
    q, cache = spec(2, 1, 8, 128, dtype=jnp.float32), spec(2, 2, 1024, 128, dtype=jnp.float32)  # [B, K, S, H]
    mask = MaskSpec(causal=True, kv_lengths=rows(2), q_offset=rows(2))
    fn = lambda q, k, v, m: attention(q, k, v, m, kv_layout="BKSH")
    assert calls(lowered(fn, platform, q, cache, cache, mask)) == WANT[platform]


def test_attention_policy_choices_lower_as_chosen():
    q, kv = spec(2, 512, 8, 128, dtype=jnp.float32), spec(2, 512, 2, 128, dtype=jnp.float32)
    mask = MaskSpec(causal=True, kv_lengths=rows(2))
    with_policy = lambda kernels: lambda q, k, v, m: attention(q, k, v, m, kernels=kernels)
    xla = KernelPolicy(attention_cpu="xla", attention_gpu="xla", attention_tpu="xla")
    for platform in WANT:
        assert calls(lowered(with_policy(xla), platform, q, kv, kv, mask)) == {"triton": 0, "tpu": 0, "cpu": 0}
    # prefix-LM bounds are per row: splash cannot take them, so TPU gets XLA's ops
    prefix = MaskSpec(causal=True, prefix_lengths=rows(2))
    assert calls(lowered(attention, "tpu", q, kv, kv, prefix))["tpu"] == 0
    # only the CUDA branch traced: any other platform gets the XLA path
    cuda_only = KernelPolicy(platforms=("cuda",))
    assert calls(lowered(with_policy(cuda_only), "cuda", q, kv, kv, mask))["triton"] == 1
    assert calls(lowered(with_policy(cuda_only), "cpu", q, kv, kv, mask))["cpu"] == 0


@pytest.mark.parametrize("platform", sorted(WANT))
def test_einsum_default_policy(platform):
    layer = Einsum((512, 8, 64), "BTD,DNH->BTNH")  # a q projection in a decode step: one row
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), spec(1, 1, 512, dtype=jnp.float32))
    got = calls(lowered(layer.apply, platform, params, spec(1, 1, 512, dtype=jnp.float32)))
    assert got == {"triton": 0, "tpu": 0, "cpu": int(platform == "cpu")}


def _int8_params(layer, x):
    """Abstract params of `layer` with its kernel int8 and the per-channel scale beside it."""
    from mmjax.quantization import contracted_axes

    p = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)["params"]
    c = contracted_axes(layer.eqn)
    return {"params": {**p, "kernel": spec(*layer.shape, dtype=jnp.int8),
                       "kernel_scale": spec(*layer.shape[c:], dtype=jnp.float32)}}


# int8 weight-only projections of a 7B decoder (q [D, N, H], o [N, H, D] flattened, MLP down
# [F, D]) in a prefill (4096 tokens) and a decode step (one row), bf16 and fp32 activations.
INT8_LAYERS = [((4096, 32, 128), "BTD,DNH->BTNH", False), ((32, 128, 4096), "BTNH,NHD->BTD", True),
               ((11008, 4096), "BTF,FD->BTD", False)]


@pytest.mark.parametrize("shape,eqn,flat", INT8_LAYERS)
@pytest.mark.parametrize("T", [4096, 1])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_int8_einsum_exports_for_cuda(shape, eqn, flat, T, dtype):
    """For CUDA: the int8 kernel enters the program as int8 and is converted as the dot's operand
    (XLA:GPU fuses the convert into the GEMM), scaled after it; no CPU target. For CPU a decode
    step holds the int8 gemv, a prefill XLA's dot."""
    layer = Einsum(shape, eqn, dtype=dtype, flatten_contraction=flat)
    x = spec(1, T, *shape[: len(eqn.split(",")[0]) - 2], dtype=dtype)
    params = _int8_params(layer, x)
    text = lowered(layer.apply, "cuda", params, x)
    assert calls(text) == {"triton": 0, "tpu": 0, "cpu": 0}
    assert "xi8>" in text and "stablehlo.convert" in text and "stablehlo.dot_general" in text
    cpu = lowered(layer.apply, "cpu", params, x)
    assert cpu.count("mmjax_gemv_s8") == int(T == 1) and calls(cpu)["cpu"] == int(T == 1)


def test_rope_tables_materialised_on_cpu_only():
    from mmjax.config import RopeConfig

    fn = lambda pos: rope_tables(pos, RopeConfig(), 128, jnp.float32)
    pos = spec(1, 64, dtype=jnp.int32)
    assert "dot_general" in lowered(fn, "cpu", pos)  # the identity product (mmjax/layers/rope.py)
    assert "dot_general" not in lowered(fn, "cuda", pos)


@pytest.mark.slow
def test_7b_prefill_exports_for_cuda_without_cpu_calls():
    """The case that motivated the policy: a 7B decoder's prefill exported for CUDA from a CPU
    machine held the CPU gemv in its LM head and no Triton call (kernels chosen from the default
    backend while tracing). Now: one flash call per layer, nothing for the CPU."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128)
    dec = LlamaDecoder(cfg)  # float32 weights: the LM head's one row was gemv-eligible

    def prefill(params, x, positions, lengths):  # logits of each row's last token, as the engine does
        def run(m):
            h, _ = m(x, positions, MaskSpec(causal=True, kv_lengths=lengths))
            return m.logits(jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1))
        return dec.apply(params, method=run)

    def init(m, x, positions):
        return m.logits(m(x, positions, MaskSpec())[0])

    x, positions = spec(1, 4096, 4096, dtype=jnp.float32), spec(1, 4096, dtype=jnp.int32)
    params = jax.eval_shape(lambda x, p: dec.init(jax.random.PRNGKey(0), x, p, method=init), x, positions)
    text = lowered(prefill, "cuda", params, x, positions, rows(1))
    # flash_attention is one jitted function: its Triton call appears once, called by each layer
    assert calls(text) == {"triton": 1, "tpu": 0, "cpu": 0}
    assert text.count("call @flash_attention") == 32
