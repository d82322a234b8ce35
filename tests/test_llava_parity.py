"""LLaVA parity against HF LlavaForConditionalGeneration: tiny random checkpoints written by
save_pretrained, converted through the converter, run through the public API only."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mmjax
from converters.torch2flax import convert
from mmjax.testing.checkpoints import save_tiny_llava, tiny_llava_config
from tests.tolerances import tol

PROMPT = "<image> Describe it."


def _image(seed, size=(50, 40)):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


def _hf_inputs(processor, images, prompt_text):
    msgs = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt_text}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return processor(images=images, text=text, return_tensors="pt")


def _hf_greedy(hf_model, inputs, n=32):
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _trim_at_eos(ids, eos=2):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture(scope="module")
def fp32(tiny_llava):
    return mmjax.load(tiny_llava.flax), tiny_llava.hf_model, tiny_llava.hf_processor


def test_fp32_prefill_logits_and_vision_features(fp32):
    model, hf_model, proc = fp32
    img = _image(0)
    inputs = model.preprocess([img], PROMPT)
    ref = _hf_inputs(proc, [img], "Describe it.")
    assert np.array_equal(inputs["input_ids"], ref["input_ids"].numpy())
    assert np.abs(inputs["pixel_values"] - ref["pixel_values"].numpy()).max() <= tol("float32", "pixel_values")
    logits = mmjax.forward(model, **inputs)
    with torch.no_grad():
        ref_logits = hf_model(**ref).logits.numpy()
        ref_feats = hf_model.model.get_image_features(
            ref["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output
    feats = model.module.apply({"params": model.params}, {"pixel_values": inputs["pixel_values"]},
                                method="image_features")
    assert logits.shape == ref_logits.shape
    assert np.abs(logits - ref_logits).max() <= tol("float32", "logits")
    assert np.abs(np.asarray(feats) - torch.stack(ref_feats).numpy()).max() <= tol("float32", "vision_features")


def test_fp32_greedy_32_tokens_match_hf(fp32):
    model, hf_model, proc = fp32
    img = _image(1, (64, 64))
    out = mmjax.generate(model, [img], PROMPT, max_new_tokens=32)
    ref = _trim_at_eos(_hf_greedy(hf_model, _hf_inputs(proc, [img], "Describe it.")))
    assert out.token_ids == ref
    assert len(ref) == 32 or ref[-1] == 2


def test_batch_rows_equal_each_row_alone(fp32):
    model = fp32[0]
    imgs = [_image(2, (30, 60)), _image(3, (80, 20)), _image(4)]
    prompts = ["<image> Describe it.", "What is in this picture? <image>", "<image> A long question about the "
               "colours, the shapes and the objects that can be seen in the image, please."]
    batch = mmjax.generate(model, [[i] for i in imgs], prompts, max_new_tokens=12)
    alone = [mmjax.generate(model, [i], p, max_new_tokens=12).token_ids for i, p in zip(imgs, prompts)]
    assert len({len(p) for p in batch.prompt_tokens}) == 3  # really different lengths
    assert batch.token_ids == alone


def test_text_only_row_in_a_batch_with_images(fp32):
    model = fp32[0]
    batch = mmjax.generate(model, [[_image(5)], None], ["<image> Describe it.", "Tell me a story."], max_new_tokens=8)
    alone = mmjax.generate(model, None, "Tell me a story.", max_new_tokens=8)
    assert batch.token_ids[1] == alone.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sharded", "bin", "bf16"])
def test_checkpoint_formats(tmp_path, variant):
    kw = {"sharded": {"max_shard_size": "200KB"}, "bin": {"safe_serialization": False}, "bf16": {"dtype": "bfloat16"}}
    _, hf_model, proc = save_tiny_llava(tmp_path / "hf", **kw[variant])
    files = sorted(os.listdir(tmp_path / "hf"))
    if variant == "sharded":
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    if variant == "bin":
        assert any(f.endswith(".bin") for f in files) and not any(f.endswith(".safetensors") for f in files)
    img = _image(6)
    ref = _hf_inputs(proc, [img], "Describe it.")
    if variant == "bf16":
        # bf16 end to end against HF in bf16: logits within the bf16 row of the table.
        convert(tmp_path / "hf", tmp_path / "flax16", progress=False)
        m16 = mmjax.load(tmp_path / "flax16")
        assert str(m16.dtype) == "bfloat16" or m16.dtype.__name__ == "bfloat16"
        with torch.no_grad():
            ref16 = hf_model(**{**ref, "pixel_values": ref["pixel_values"].bfloat16()}).logits.float().numpy()
            ref16_feats = torch.stack(hf_model.model.get_image_features(
                ref["pixel_values"].bfloat16(), vision_feature_layer=-2,
                vision_feature_select_strategy="default").pooler_output).float().numpy()
        inputs16 = m16.preprocess([img], PROMPT)
        got16 = mmjax.forward(m16, **inputs16)
        feats16 = m16.module.apply({"params": m16.params}, {"pixel_values": inputs16["pixel_values"]},
                                  method="image_features")
        assert np.abs(got16 - ref16).max() <= tol("bfloat16", "logits")
        assert np.abs(np.asarray(feats16, np.float32) - ref16_feats).max() <= tol("bfloat16", "vision_features")
        # The same bf16 weights upcast: fp32 parity and identical greedy tokens.
        # Reloaded rather than .float(): the in-memory model's rotary inv_freq buffer was rounded
        # to bf16 by .to(bfloat16), which from_pretrained recomputes in fp32.
        from transformers import LlavaForConditionalGeneration

        hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        convert(tmp_path / "hf", tmp_path / "flax", dtype="float32", progress=False)
    else:
        convert(tmp_path / "hf", tmp_path / "flax", progress=False)
    model = mmjax.load(tmp_path / "flax")
    with torch.no_grad():
        ref_logits = hf_model(**ref).logits.numpy()
    logits = mmjax.forward(model, **model.preprocess([img], PROMPT))
    assert np.abs(logits - ref_logits).max() <= tol("float32", "logits")
    out = mmjax.generate(model, [img], PROMPT, max_new_tokens=32)
    assert out.token_ids == _trim_at_eos(_hf_greedy(hf_model, ref))


@pytest.mark.parametrize("name,kw", [
    ("feature_layers_list_full", {"feature_layer": [-3, -1], "strategy": "full", "vision_layers": 3}),
    ("tied_llama3_rope", {"tie": True, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 64}}),
    ("linear_rope_mha", {"kv_heads": 4, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
])
def test_config_variants(tmp_path, name, kw):
    _, hf_model, proc = save_tiny_llava(tmp_path / "hf", tiny_llava_config(**kw))
    convert(tmp_path / "hf", tmp_path / "flax", progress=False)
    model = mmjax.load(tmp_path / "flax")
    img = _image(7)
    ref = _hf_inputs(proc, [img], "Describe it.")
    inputs = model.preprocess([img], PROMPT)
    assert np.array_equal(inputs["input_ids"], ref["input_ids"].numpy())
    with torch.no_grad():
        ref_logits = hf_model(**ref).logits.numpy()
    assert np.abs(mmjax.forward(model, **inputs) - ref_logits).max() <= tol("float32", "logits")
    out = mmjax.generate(model, [img], PROMPT, max_new_tokens=16)
    assert out.token_ids == _trim_at_eos(_hf_greedy(hf_model, ref, 16))
    meta = json.load(open(tmp_path / "flax" / "mmjax_config.json"))
    assert meta["family"] == "llava"
