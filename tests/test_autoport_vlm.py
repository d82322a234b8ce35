"""A whole auto-ported vision tower as the vision side of a composed VLM, end to end.

TowerVLM (tests/autoport_parts.py) is AcmeVLM with a vision tower mmjax has no component for;
tests/autoport_vlm.py is its port.
The converter ports it from the checkpoint's own tensors (`--autoport 'vis.=pkg:Tower(...)'`),
the rest goes through AcmeVLM's rules; mmjax.load and mmjax.generate then run it with the KV
cache and buckets, and 32 greedy tokens equal a torch greedy loop over the same torch model.
"""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import mmjax
from converters.torch2flax import main as convert_cli
from tests.autoport_parts import build_tower_vlm
from tests.autoport_vlm import AUTOPORT_FLAG, FAMILY
from tests.custom_vlm.checkpoint import save_acme_checkpoint
from tests.custom_vlm.torch_model import torch_greedy
from tests.tolerances import tol

MODEL = "tests.autoport_vlm:FAMILY"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tower_vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tower_vlm")
    torch_model = build_tower_vlm(seed=0)
    ckpt = save_acme_checkpoint(root / "ckpt", torch_model)
    rc = convert_cli([str(ckpt), "--out", str(root / "flax"), "--model", MODEL, "--autoport", AUTOPORT_FLAG, "--quiet"])
    assert rc == 0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    return types.SimpleNamespace(root=root, ckpt=ckpt, torch_model=torch_model, model=mmjax.load(root / "flax"),
                                 image=image)


def test_converted_folder_carries_the_graph_and_the_params(tower_vlm):
    meta = json.loads((tower_vlm.root / "flax" / "mmjax_config.json").read_text())
    assert meta["source"]["autoport"] == [AUTOPORT_FLAG]
    vision = meta["config"]["vision"]
    assert meta["config"]["vision_type"] == "autoport" and vision["graph"]["module"] == "Tower"
    assert (vision["width"], vision["num_features"]) == (32, 16)
    # the tower's params sit in the composed tree, named by its state_dict, and shard like the rest
    from mmjax.sharding import make_mesh, param_specs
    from mmjax.tree import flatten_params

    names = set(flatten_params(tower_vlm.model.params))
    want = {f"vision/{k.replace('.', '/')}" for k in tower_vlm.torch_model.vis.state_dict()}
    assert want <= names and "vision/blocks/1/wqkv" in names
    shapes = tower_vlm.model.module.param_shapes()
    specs = param_specs(FAMILY.sharding(tower_vlm.model.config), shapes, make_mesh("data:1,model:1"))
    assert all(tuple(specs[k]) == () for k in want)  # replicated by the table's final ".*" rule


def test_vision_features_and_logits_match_torch(tower_vlm):
    model, torch_model = tower_vlm.model, tower_vlm.torch_model
    inputs = model.preprocess(tower_vlm.image, "Describe the image.")
    px = inputs["pixel_values"]
    feats = jax.jit(lambda p, x: model.module.apply({"params": p}, x, method=lambda m, x: m.vision(x)))(model.params, px)
    q = model.config.image_seq_length
    with torch.no_grad():
        want_feats = torch_model.vis(torch.from_numpy(px)).numpy()
        want_logits = torch_model(torch.from_numpy(px), torch.from_numpy(inputs["input_ids"][:, q:]).long()).numpy()
    assert np.abs(np.asarray(feats) - want_feats).max() <= tol("float32", "vision_features")
    logits = mmjax.forward(model, inputs["input_ids"], inputs["attention_mask"], px)
    err = float(np.abs(logits - want_logits).max())
    print(f"TowerVLM fp32 logits max |Δ| = {err:.2e}")
    assert err <= tol("float32", "logits")


def test_greedy_32_tokens_match_a_torch_loop(tower_vlm):
    model, torch_model = tower_vlm.model, tower_vlm.torch_model
    prompt = "Describe the image."
    out = mmjax.generate(model, tower_vlm.image, prompt, max_new_tokens=32, min_new_tokens=32)
    inputs = model.preprocess(tower_vlm.image, prompt)
    q = model.config.image_seq_length
    eos = list(model.tokenizer.eos_token_ids)
    px, ids = torch.from_numpy(inputs["pixel_values"]), torch.from_numpy(inputs["input_ids"][:, q:]).long()
    ref = torch_greedy(torch_model, px, ids, eos)
    print("TowerVLM greedy:", out.token_ids)
    assert out.token_ids == ref and len(set(ref)) > 3


_GENERATE_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
import json
import numpy as np
from PIL import Image
import mmjax
model = mmjax.load(sys.argv[1])  # imports tests.autoport_vlm (the family): no torch there either
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
out = mmjax.generate(model, image, "Describe the image.", max_new_tokens=8, min_new_tokens=8)
print(json.dumps(out.token_ids))
"""


def test_converted_model_loads_and_generates_without_torch(tower_vlm):
    run = subprocess.run([sys.executable, "-c", _GENERATE_WITHOUT_TORCH, tower_vlm.root / "flax"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    want = mmjax.generate(tower_vlm.model, tower_vlm.image, "Describe the image.", max_new_tokens=8, min_new_tokens=8)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == want.token_ids


def test_converter_flag_mistakes_are_named_and_write_nothing(tower_vlm, tmp_path, capsys):
    ckpt, out = str(tower_vlm.ckpt), tmp_path / "out"

    def convert(flag):
        rc = convert_cli([ckpt, "--out", str(out), "--model", MODEL, "--autoport", flag, "--quiet"])
        assert rc == 1 and not out.exists()
        return capsys.readouterr().err

    assert "expected [vision:|projector:]PREFIX=pkg.module:Class(k=v, ...)" in convert("vis.:Tower")
    assert "no tensor of" in convert(AUTOPORT_FLAG.replace("vis.=", "visual.="))
    assert "the checkpoint's vis.* tensors do not fit tests.autoport_parts:Tower" in convert(
        AUTOPORT_FLAG.replace("depth=2", "depth=3"))
    assert "the model's projector is not an 'autoport' component" in convert("projector:" + AUTOPORT_FLAG)
    text = convert(AUTOPORT_FLAG.replace(":Tower(", ":FFTTower("))
    assert "FFTTower: 2 op(s) have no JAX lowering" in text and "aten._fft_c2c.default at node" in text
    assert "autoport_parts.py" in text and "torch.fft.fft2(pixels)" in text
