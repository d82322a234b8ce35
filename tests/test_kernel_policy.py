"""KernelPolicy (mmjax/kernels/policy.py): a config field like any other, read from the
environment only when asked, replaced through nested configs, and part of every jit cache key."""
import json

import jax
import jax.numpy as jnp
import pytest

from mmjax.config import LlamaConfig
from mmjax.kernels.attention import MaskSpec, attention
from mmjax.kernels.cpu import decode_attention as cpu_decode
from mmjax.kernels.policy import KernelPolicy, with_kernels
from mmjax.families import llava
from mmjax.models.composed import ComposedConfig
from mmjax.testing.checkpoints import tiny_llava_config

SPEC = {
    "vision": {"type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
               "image_size": 16, "patch_size": 8},
    "projector": {"type": "resampler", "dim": 32, "num_queries": 4, "num_layers": 1, "num_heads": 2,
                  "intermediate_size": 64},
    "decoder": {"type": "neox", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                "num_heads": 2},
    "image_token_id": 3,
}


def policies(cfg) -> list:
    """Every KernelPolicy inside a config, depth first."""
    out = []
    for value in vars(cfg).values():
        if isinstance(value, KernelPolicy):
            out.append(value)
        elif hasattr(value, "__dataclass_fields__"):
            out += policies(value)
    return out


def test_with_kernels_reaches_every_component():
    llava_cfg = llava.config_from_hf(tiny_llava_config().to_dict())
    composed = ComposedConfig.from_spec(SPEC)
    xla = KernelPolicy(attention_cpu="xla", matmul_cpu="xla")
    for cfg, count in ((llava_cfg, 3), (composed, 3)):  # vision + projector + decoder
        assert len(policies(cfg)) == count and all(p == KernelPolicy() for p in policies(cfg))
        assert all(p == xla for p in policies(with_kernels(cfg, xla)))
        mesh = with_kernels(cfg, KernelPolicy.without_cpu_custom_calls)
        assert all(p.attention_cpu == "xla" and p.matmul_cpu == "xla" for p in policies(mesh))
        assert with_kernels(cfg, KernelPolicy()) == cfg


def test_json_round_trip_and_old_configs():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, kernels=KernelPolicy(attention_gpu="xla", platforms=("cuda",)))
    assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {**cfg.to_dict(), "attention_impl": "xla"}  # written before the kernels field existed
    del old["kernels"]
    assert LlamaConfig.from_dict(old).kernels == KernelPolicy(attention_gpu="xla", attention_tpu="xla")


def test_from_env_reads_only_when_called(monkeypatch):
    monkeypatch.setenv("MMJAX_CPU_ATTENTION", "0")
    assert KernelPolicy().attention_cpu == "cpu"  # constructing one reads nothing
    assert KernelPolicy.from_env() == KernelPolicy(attention_cpu="xla")
    assert KernelPolicy.from_env(environ={"MMJAX_CPU_GEMV": "off"}) == KernelPolicy(matmul_cpu="xla")
    pallas = KernelPolicy(attention_cpu="pallas")
    assert KernelPolicy.from_env(pallas) == pallas  # the switch turns off the C++ kernels, nothing else


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="KernelPolicy.matmul_cpu='gemv' is not one of cpu, xla"):
        KernelPolicy(matmul_cpu="gemv")
    with pytest.raises(ValueError, match=r"KernelPolicy.platforms=\('gpu',\)"):
        KernelPolicy(platforms=("gpu",))


def test_each_policy_is_its_own_program():
    # The choice is in the jit cache key: one jitted function, two policies, two programs (a
    # global read while tracing would have served the first trace to both).
    run = jax.jit(attention, static_argnames=("kernels", "kv_layout"))
    q, cache = jnp.ones((1, 1, 4, 64)), jnp.ones((1, 2, 16, 64))
    mask = MaskSpec(causal=True, kv_lengths=jnp.array([5]), q_offset=jnp.array([4]))
    text = lambda kernels: run.lower(q, cache, cache, mask, kernels=kernels, kv_layout="BKSH").as_text()
    assert cpu_decode.TARGET in text(KernelPolicy())
    assert cpu_decode.TARGET not in text(KernelPolicy().without_cpu_custom_calls())
    assert cpu_decode.TARGET in text(KernelPolicy())
