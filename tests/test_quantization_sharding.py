"""int8 kernels and their scales on a mesh: split by the same rules as the kernels they replace.

The unit case reads the rule table on a fake mesh; the slow one runs this file as a script with
8 emulated host devices (as tests/test_sharding.py does) and compares a sharded int8 model with
the same model on one device (partial sums in another order: 1e-5, tests/test_sharding.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LOGIT_TOL = 1e-5
MESHES = ("model:4", "data:2,model:4")
# tiny LLaVA "A" of tests/test_sharding.py: every split axis divisible by 8
TINY = dict(vocab_size=512, text_hidden=64, text_layers=2, heads=8, kv_heads=8, inter=128, vision_hidden=64,
            vision_heads=8, vision_inter=128, vision_layers=3)


def _int8_shapes(lm_head=True):
    import dataclasses

    from converters.quantize import plan_quantization
    from mmjax import registry
    from mmjax.testing.checkpoints import tiny_llava_config

    family = registry.get("llava")
    cfg = family.config_from_hf(tiny_llava_config(**TINY).to_dict())
    cfg_q, _, _ = plan_quantization(family, cfg, "int8", lm_head=lm_head)
    assert dataclasses.replace(cfg_q, quant=None) == cfg
    return family, cfg_q, family.build(cfg_q).param_shapes()


def test_scale_takes_its_kernels_output_axes():
    from jax.sharding import PartitionSpec as P

    from mmjax.sharding import param_specs

    family, cfg, shapes = _int8_shapes()
    specs = param_specs(family.sharding(cfg), shapes, types.SimpleNamespace(shape={"data": 2, "model": 4}))
    want = {  # kernel: its rule as for float; scale: the rule's output axes
        "decoder/layers_0/attn/q/kernel": P(None, "model"), "decoder/layers_0/attn/q/kernel_scale": P("model"),
        "decoder/layers_0/attn/o/kernel": P("model"), "decoder/layers_0/attn/o/kernel_scale": P(),
        "decoder/layers_0/mlp/up/kernel": P(None, "model"), "decoder/layers_0/mlp/up/kernel_scale": P("model"),
        "decoder/layers_0/mlp/down/kernel": P("model"), "decoder/layers_0/mlp/down/kernel_scale": P(),
        "decoder/lm_head/kernel": P(None, "model"), "decoder/lm_head/kernel_scale": P("model"),
        "vision/layers_0/mlp/fc1/kernel_scale": P("model"), "decoder/layers_0/input_norm/scale": P(),
    }
    assert {k: specs[k] for k in want} == want
    assert str(shapes["decoder/layers_0/attn/q/kernel"].dtype) == "int8"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from converters.torch2flax import convert
    from mmjax.testing.checkpoints import save_tiny_llava, tiny_llava_config

    root = tmp_path_factory.mktemp("quant_sharding")
    save_tiny_llava(root / "hf", tiny_llava_config(**TINY), seed=1)
    convert(root / "hf", root / "int8", quantize="int8", quantize_lm_head=True, progress=False)
    return str(root / "int8")


@pytest.mark.slow
def test_sharded_int8_matches_one_device(folder):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", HF_HUB_OFFLINE="1",
               MMJAX_COMPILE_CACHE="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, __file__, folder], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads([line for line in p.stdout.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])
    for mesh in MESHES:
        r = res[mesh]
        assert r["max_logit_diff"] <= LOGIT_TOL, (mesh, r)
        assert r["tokens"] == res["one"]["tokens"], mesh
        # q kernel [D 64, N 8, H 8] over model:4 -> 2 heads a device; its scale [N, H] the same 2
        assert r["q_kernel_shard"] == [64, 2, 8] and r["q_scale_shard"] == [2, 8], (mesh, r)
        assert r["q_kernel_dtype"] == "int8"


def _worker(folder: str) -> dict:
    from PIL import Image

    import mmjax

    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 40, 3), np.uint8))
    prompts = ["<image>\nWhat is this?", "<image>\nhello there general kenobi"]
    out = {}
    for mesh in ("one", *MESHES):
        model = mmjax.load(folder, mesh=None if mesh == "one" else mesh)
        inp = model.preprocess([[img], [img]], prompts, chat_template=False)
        logits = mmjax.forward(model, **inp)
        tokens = mmjax.generate(model, [[img], [img]], prompts, max_new_tokens=8, chat_template=False).token_ids
        q = model.checkpoint_params()["decoder"]["layers_0"]["attn"]["q"]  # as stored (one device: packed)
        out[mesh] = {"logits": logits, "tokens": tokens, "q_kernel_dtype": str(q["kernel"].dtype),
                     "q_kernel_shard": list(q["kernel"].addressable_shards[0].data.shape),
                     "q_scale_shard": list(q["kernel_scale"].addressable_shards[0].data.shape)}
    for mesh in MESHES:
        out[mesh]["max_logit_diff"] = float(np.abs(out[mesh].pop("logits") - out["one"]["logits"]).max())
    out["one"].pop("logits")
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(_worker(sys.argv[1])), flush=True)
