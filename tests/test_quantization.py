"""int8 weight-only quantization (mmjax/quantization.py, converters/quantize.py).

Exactness is tested apart from the quantization error: the int8 model must equal HF torch run
with the *dequantized* weights (q * scale) loaded into it, at the float32 tolerance, with 32
greedy tokens identical. The dequantized torch checkpoint is made on the torch side, per row of
each torch weight (torch Linear weights are [out, in]: a row is an output channel), for the
tensors the converter's own plan says feed a quantized kernel; that the two sides dequantize to
the same numbers is checked bit for bit, kernel by kernel.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import mmjax
from converters.families import rules_for
from converters.readers import open_checkpoint
from converters.rules import build_plan
from converters.torch2flax import _read_config, convert, load_rules, main as convert_cli, model_param_shapes
from mmjax import registry
from mmjax.errors import ConversionError
from mmjax.quantization import QuantConfig, contracted_axes, default_rules, dequantize, quantize_int8
from mmjax.tree import flatten_params
from tests.tolerances import tol


# ---- unit cases, by hand ---------------------------------------------------------------------

def test_quantize_int8_by_hand():
    # kernel [in 2, out 3]; channel 0: max |w| 1.27 -> scale 0.01; channel 1 all zero -> scale 1
    w = np.array([[1.27, 0.0, -0.5], [-0.635, 0.0, 0.25]], np.float32)
    q, scale = quantize_int8(w, 1)
    np.testing.assert_allclose(scale, [0.01, 1.0, 0.5 / 127], rtol=1e-7)
    assert q.dtype == np.int8 and q[:, 0].tolist() == [127, -64] and q[:, 1].tolist() == [0, 0]
    assert q[:, 2].tolist() == [-127, 64]  # 0.25 / (0.5 / 127) = 63.5 rounds to even: 64
    assert np.abs(dequantize(q, scale) - w).max() <= scale.max() / 2


def test_contracted_axes_from_the_equation():
    assert contracted_axes("BTD,DNH->BTNH") == 1
    assert contracted_axes("BTNH,NHD->BTD") == 2
    with pytest.raises(ValueError, match="must lead"):
        contracted_axes("BTD,VD->BTV")  # a tied head: [out, in]


def test_rule_table_first_match_and_no_match():
    quant = QuantConfig("int8", default_rules(lm_head=False))
    assert quant.method_for("decoder/layers_3/attn/o/kernel") == "int8"
    assert quant.method_for("vision/layers_0/mlp/fc1/kernel") == "int8"
    assert quant.method_for("decoder/lm_head/kernel") is None
    assert QuantConfig("int8", default_rules(lm_head=True)).method_for("decoder/lm_head/kernel") == "int8"
    assert quant.method_for("projector/mlp/fc1/kernel") is None
    assert quant.method_for("decoder/layers_0/input_norm/scale") is None
    with pytest.raises(ConversionError, match="no quantization rule matches"):
        QuantConfig("int8", ((r"decoder/.*", "int8"),)).method_for("vision/patch_embed")
    with pytest.raises(ValueError, match="one of int8 or None"):
        QuantConfig("int8", ((r".*", "int4"),))
    # stored in mmjax_config.json: the JSON form comes back equal
    assert QuantConfig.from_dict(json.loads(json.dumps(quant.to_dict()))) == quant


# ---- the dequantized torch reference ------------------------------------------------------------

def dequantized_checkpoint(src, dst, quant: QuantConfig) -> set:
    """Copy HF folder `src` to `dst` with every torch tensor that feeds a quantized kernel replaced
    by its int8 round trip, per row; returns those tensor names."""
    from safetensors.numpy import load_file, save_file

    hf = _read_config(src)
    family = registry.get(hf["model_type"])
    cfg = family.config_from_hf(hf)
    targets = model_param_shapes(family, cfg)
    with open_checkpoint(str(src)) as reader:
        plan = build_plan(reader.tensors(), load_rules(rules_for(family.name), cfg), targets)
    names = {n for t in targets if quant.method_for(t) for n in plan.origin[t]}
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    for n in names:
        w = tensors[n].astype(np.float32)  # [out, in]
        amax = np.abs(w).max(axis=1, keepdims=True)
        scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        tensors[n] = (np.clip(np.rint(w / scale), -127, 127) * scale).astype(np.float32)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return names


def assert_same_dequantized_kernels(int8_folder, float_folder):
    """Every int8 kernel, dequantized, equals the float conversion of the dequantized torch weights
    exactly; every other parameter is unchanged."""
    q = flatten_params(mmjax.load(int8_folder).checkpoint_params())
    f = flatten_params(mmjax.load(float_folder).checkpoint_params())
    kernels = [p for p in q if q[p].dtype == jnp.int8]
    assert kernels and set(f) == {p for p in q if not p.endswith("kernel_scale")}
    for p in f:
        want = np.asarray(f[p])
        got = dequantize(q[p], q[p + "_scale"]) if p in kernels else np.asarray(q[p])
        assert np.array_equal(got, want), p
    return kernels


def _image(seed, size=(50, 40)):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def llava_int8(tiny_llava, tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("llava_int8")
    assert convert_cli([str(tiny_llava.hf), "--out", str(root / "int8"), "--quantize", "int8", "--quiet"]) == 0
    quant = mmjax.load(root / "int8").config.quant
    names = dequantized_checkpoint(tiny_llava.hf, root / "hf_dq", quant)
    convert(root / "hf_dq", root / "float_dq", progress=False)
    hf = LlavaForConditionalGeneration.from_pretrained(root / "hf_dq").eval()
    return root, names, hf


def test_llava_int8_layout_and_config(llava_int8):
    root, names, _ = llava_int8
    model = mmjax.load(root / "int8")
    params = flatten_params(model.checkpoint_params())
    kernels = assert_same_dequantized_kernels(root / "int8", root / "float_dq")
    # 2 decoder blocks x 7 Linears + 1 tower block x 6 (vision_feature_layer -2 of 2: the last
    # block is dropped); no projector, no LM head, no embedding
    assert len(kernels) == 2 * 7 + 1 * 6 and len(names) == len(kernels)
    assert not any(p.startswith("projector") or "lm_head" in p for p in kernels)
    assert params["decoder/layers_0/attn/o/kernel_scale"].shape == (64,)  # o: [N, H, D] -> per D
    assert params["decoder/layers_0/attn/q/kernel_scale"].shape == (4, 16)  # q: [D, N, H] -> per (N, H)
    assert params["decoder/embed/embedding"].dtype == jnp.float32
    assert model.dtype == jnp.float32


def test_llava_int8_equals_hf_with_dequantized_weights(llava_int8, tiny_llava):
    root, _, hf_dq = llava_int8
    model = mmjax.load(root / "int8")
    proc = tiny_llava.hf_processor
    img = _image(0)
    inputs = model.preprocess([img], "<image> Describe it.")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    ref = proc(images=[img], text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    logits = mmjax.forward(model, **inputs)
    with torch.no_grad():
        want = hf_dq(**ref).logits.numpy()
        unquantized = tiny_llava.hf_model(**ref).logits.numpy()
    assert np.abs(logits - want).max() <= tol("int8", "logits")
    # the comparison can see quantization: the unquantized model is far outside the bound
    assert np.abs(unquantized - want).max() > 10 * tol("int8", "logits")
    out = mmjax.generate(model, [img], "<image> Describe it.", max_new_tokens=32)
    with torch.no_grad():
        hg = hf_dq.generate(**ref, max_new_tokens=32, do_sample=False)[0, ref["input_ids"].shape[1]:].tolist()
    hg = hg[: hg.index(2) + 1] if 2 in hg else hg
    assert out.token_ids == hg


def test_quantize_a_converted_folder(llava_int8, tiny_llava, tmp_path):
    """From an mmjax folder (float32, and bfloat16 with the LM head): the same int8 kernels as
    from the torch checkpoint; the bf16 folder's other params stay bf16, scales float32."""
    root, _, _ = llava_int8
    assert convert_cli([str(tiny_llava.flax), "--out", str(tmp_path / "a"), "--quantize", "int8", "--quiet"]) == 0
    a, b = (flatten_params(mmjax.load(f).checkpoint_params()) for f in (tmp_path / "a", root / "int8"))
    assert set(a) == set(b) and all(np.array_equal(a[p], b[p]) for p in a)
    assert os.path.isfile(tmp_path / "a" / "tokenizer.json") and os.path.isfile(tmp_path / "a" / "source_config.json")
    with pytest.raises(ConversionError, match="already quantized"):
        convert(tmp_path / "a", tmp_path / "again", quantize="int8")
    convert(tiny_llava.hf, tmp_path / "bf16", dtype="bfloat16", progress=False)
    convert(tmp_path / "bf16", tmp_path / "bf16_int8", quantize="int8", quantize_lm_head=True)
    m = mmjax.load(tmp_path / "bf16_int8")
    p = flatten_params(m.checkpoint_params())
    assert m.dtype == jnp.bfloat16 and p["decoder/lm_head/kernel"].dtype == jnp.int8
    assert p["decoder/lm_head/kernel_scale"].dtype == jnp.float32
    assert p["decoder/embed/embedding"].dtype == jnp.bfloat16
    out = mmjax.generate(m, None, "Tell me a story.", max_new_tokens=4)
    assert len(out.token_ids) == 4


def test_rule_on_a_non_einsum_parameter_is_refused(tiny_llava, tmp_path):
    from converters.quantize import plan_quantization

    family = registry.get("llava")
    cfg = family.config_from_hf(_read_config(tiny_llava.hf))
    shapes = model_param_shapes(family, cfg)
    import dataclasses

    from mmjax.quantization import quantized_layout, einsum_contractions

    bad = QuantConfig("int8", ((r"decoder/final_norm/scale", "int8"), (r".*", None)))
    with pytest.raises(ConversionError, match="decoder/final_norm/scale: the quantization rules select it"):
        quantized_layout(shapes, bad, einsum_contractions(family.build(cfg)))
    with pytest.raises(ConversionError, match="choose one of int8"):
        plan_quantization(family, cfg, "int4")
    assert dataclasses.replace(cfg, quant=None) == cfg


# ---- Qwen2-VL ------------------------------------------------------------------------------------

def test_qwen2vl_int8_equals_hf_with_dequantized_weights(tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from mmjax.bucketing import Buckets
    from mmjax.testing.qwen_checkpoints import save_tiny_qwen2vl

    folder, hf, hp = save_tiny_qwen2vl(tmp_path / "hf", "qwen2_vl")
    convert(folder, tmp_path / "int8", quantize="int8", progress=False)
    buckets = Buckets(prompt=(64,), batch=(1,), patches=(128,), token_slots=(32,))
    model = mmjax.load(tmp_path / "int8", buckets=buckets)
    names = dequantized_checkpoint(folder, tmp_path / "hf_dq", model.config.quant)
    convert(tmp_path / "hf_dq", tmp_path / "float_dq", progress=False)
    kernels = assert_same_dequantized_kernels(tmp_path / "int8", tmp_path / "float_dq")
    assert "vision/merger/mlp/fc1/kernel" in kernels and "vision/layers_0/attn/q/kernel" in kernels
    assert "visual.blocks.0.attn.qkv.weight" in names  # one fused torch tensor behind q, k and v
    hf_dq = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "hf_dq").eval()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))
    prompt = "Describe the image."
    ours = model.preprocess([img], "<image>" + prompt, chat_template=False)
    ref = hp(images=[img], text="<|vision_start|><|image_pad|><|vision_end|>" + prompt, return_tensors="pt")
    logits = mmjax.forward(model, **ours)
    with torch.no_grad():
        want = hf_dq(**ref).logits.numpy()
        unquantized = hf(**ref).logits.numpy()
    assert np.abs(logits - want).max() <= tol("int8", "logits")
    assert np.abs(unquantized - want).max() > 10 * tol("int8", "logits")
    out = mmjax.generate(model, [img], "<image>" + prompt, max_new_tokens=32, chat_template=False)
    with torch.no_grad():
        hg = hf_dq.generate(**ref, max_new_tokens=32, do_sample=False)
    assert out.token_ids == hg[0, ref["input_ids"].shape[1]:].tolist()
