"""The lowering tier, whole programs: the engine's jitted prefill and decode step for full-size
LLaVA-1.5-7B and Qwen2-VL-7B configs, exported for CUDA and for TPU from this CPU.

Params and the decode state are jax.ShapeDtypeStructs (jax.eval_shape: no weights in memory).
With the default KernelPolicy the program lowered for a platform must carry that platform's
attention kernel at every attention call site (Triton custom calls on CUDA, Mosaic
`tpu_custom_call`s on TPU) and no CPU custom call; a lowering error fails the test. Kernel-level
lowering at production shapes is tests/test_lowering.py."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from mmjax import registry
from mmjax.generation.engine import Engine
from mmjax.generation.sampling import SamplingParams
from mmjax.generation.state import StepArgs
from mmjax.kernels.policy import KernelPolicy, with_kernels
from mmjax.tree import unflatten_params
from tests.full_size.configs import FULL_SIZE

TRITON, TPU = "__gpu$xla.gpu.triton", "tpu_custom_call"
CPU_TARGETS = ("mmjax_gemv_f32", "mmjax_decode_attention_f32", "mmjax_prefill_attention_f32")
CHECKS = [export.DisabledSafetyCheck.custom_call(t) for t in (TRITON,)]
SLOTS = 64  # token slots of the cache


def _inputs(family, cfg, name):
    """A batch of one row with one image, as the family's prepare step pads it (numpy)."""
    if name.startswith("llava"):
        q = cfg.image_seq_length  # 576
        T = 640
        ids = np.zeros((1, T), np.int32)
        ids[0, 1:q + 1] = cfg.image_token_id
        v = cfg.vision
        px = np.zeros((1, v.num_channels, v.image_size, v.image_size), np.float32)
        return {"input_ids": ids, **family.prepare(cfg, {"input_ids": ids, "pixel_values": px})}
    grid = np.array([[1, 32, 32]])  # a 448x448 image: 1024 patches, 256 tokens
    T = 320
    ids = np.zeros((1, T), np.int32)
    ids[0, 1:257] = cfg.image_token_id
    px = np.zeros((1024, cfg.vision.patch_dim), np.float32)
    return {"input_ids": ids, **family.prepare(cfg, {"input_ids": ids, "pixel_values": px, "image_grid_thw": grid})}


def _sites(text: str, target: str) -> int:
    """Custom calls to `target` the program makes when run: the lowering puts a repeated kernel in
    one private function called from every site, so calls are counted through the call graph."""
    funcs = dict(re.findall(r"func\.func (?:private |public )?@([\w$.-]+)\((.*?)(?=\n  func\.func |\Z)", text, re.S))
    memo: dict[str, int] = {}

    def count(name: str) -> int:
        if name not in memo:
            body = funcs.get(name, "")
            memo[name] = body.count(f"custom_call @{target}(") + sum(
                count(callee) for callee in re.findall(r"\bcall @([\w$.-]+)\(", body))
        return memo[name]

    return count("main")


def _calls(text: str) -> dict:
    return {"triton": _sites(text, TRITON), "tpu": _sites(text, TPU), "cpu": sum(_sites(text, t) for t in CPU_TARGETS)}


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2-vl-7b"])
def test_prefill_and_decode_lower_with_the_platforms_kernels(name, platform):
    family_name, make = FULL_SIZE[name]
    family = registry.get(family_name)
    cfg = with_kernels(family.config_from_hf(make().to_dict()), KernelPolicy())
    module = family.build(cfg, jnp.bfloat16)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                          unflatten_params(module.param_shapes()))
    batch = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16 if k == "pixel_values" else v.dtype)
             for k, v in _inputs(family, cfg, name).items()}
    T = batch["input_ids"].shape[1]
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    args = StepArgs.make(SamplingParams(), [2], 0, SLOTS, 8)
    engine = Engine(module)
    static = dict(cache_len=T + SLOTS, token_slots=SLOTS, greedy=True)
    prefill = jax.jit(engine._prefill, static_argnames=tuple(static))
    text = export.export(prefill, platforms=[platform], disabled_checks=CHECKS)(
        params, batch, lengths, args, **static).mlir_module()
    state = jax.eval_shape(lambda p, b, n, a: engine._prefill(p, b, n, a, **static), params, batch, lengths, args)
    decode = jax.jit(engine._decode_step, static_argnames=("greedy",))
    step = export.export(decode, platforms=[platform], disabled_checks=CHECKS)(params, state, args,
                                                                                greedy=True).mlir_module()

    decoder_sites = cfg.decoder.num_layers
    vision_sites = cfg.vision.layers_used if name.startswith("llava") else cfg.vision.num_layers
    kernel = "triton" if platform == "cuda" else "tpu"
    assert _calls(text) == {**{"triton": 0, "tpu": 0}, kernel: decoder_sites + vision_sites, "cpu": 0}
    assert _calls(step) == {**{"triton": 0, "tpu": 0}, kernel: decoder_sites, "cpu": 0}
