"""Qwen2-VL / Qwen2.5-VL against transformers 5.24 on tiny random checkpoints.

Tolerances: tests/tolerances.py (float32); ids, grids, M-RoPE positions and greedy tokens exact. Checkpoints are written by HF save_pretrained,
converted by the converter (CLI entry point for one family, Python API for the other) and read
back with mmjax.load, once per module.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import mmjax
from converters.torch2flax import convert, main as convert_cli
from mmjax.bucketing import Buckets
from mmjax.errors import InputError
from mmjax.kernels.policy import KernelPolicy, with_kernels
from mmjax.models.composed import ComposedVLM
from mmjax.preprocess.qwen2vl import check_inputs, mrope_positions, prepare
from mmjax.profiling import count_compiles
from mmjax.testing.qwen_checkpoints import save_tiny_qwen2vl
from mmjax.vision.qwen2vl import vision_inputs
from tests.tolerances import tol

VARIANTS = ("qwen2_vl", "qwen2_5_vl")
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = "Describe the image."


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# (height, width): A -> 8x8 patches (64, 16 tokens; 4 windows of Qwen2.5-VL's 2x2 tokens);
# B -> 6x10 (60 patches, partial windows); C -> 100x130 is resized to 112x140 (8x10);
# D -> 10x12 patches (120).
IMAGES = {"A": _image(112, 112, 0), "B": _image(84, 140, 1), "C": _image(100, 130, 2), "D": _image(140, 168, 3)}
CASES = {"A": ["A"], "B": ["B"], "A+B": ["A", "B"], "text": []}
PARITY_BUCKETS = Buckets(prompt=(64,), batch=(1,), patches=(128,), token_slots=(32,))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for variant in VARIANTS:
        root = tmp_path_factory.mktemp(variant)
        folder, hf, hp = save_tiny_qwen2vl(root / "hf", variant)
        if variant == "qwen2_vl":
            assert convert_cli([str(folder), "--out", str(root / "jax"), "--quiet"]) == 0
        else:
            convert(folder, root / "jax", progress=False)
        # one bucket set for every parity case: generation compiles once per family
        out[variant] = (mmjax.load(root / "jax", buckets=PARITY_BUCKETS), hf, hp)
    return out


def _inputs(model, hp, names, chat_template=False):
    images = [IMAGES[n] for n in names]
    ours = model.preprocess(images, "<image>" * len(names) + PROMPT, chat_template=chat_template)
    ref = hp(images=images or None, text=VISION * len(names) + PROMPT, return_tensors="pt")
    return images, ours, ref


@pytest.mark.parametrize("variant", VARIANTS)
def test_preprocess_matches_hf(ckpts, variant):
    model, _, hp = ckpts[variant]
    for names in (["A"], ["B"], ["C"], ["A", "C", "B"]):
        _, ours, ref = _inputs(model, hp, names)
        np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"].numpy())
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"].numpy())
        np.testing.assert_array_equal(ours["mm_token_type_ids"], ref["mm_token_type_ids"].numpy())
        assert ours["pixel_values"].shape == tuple(ref["pixel_values"].shape)
        assert np.abs(ours["pixel_values"] - ref["pixel_values"].numpy()).max() <= tol("float32", "pixel_values")
    # through the chat template: same ids as HF's processor on HF's rendering of the messages
    # (text between images becomes a stripped text part: mmjax.preprocess.chat.prompt_to_messages)
    images = [IMAGES["A"], IMAGES["B"]]
    ours = model.preprocess(images, "<image> and <image> " + PROMPT, chat_template=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                             {"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = hp.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    np.testing.assert_array_equal(ours["input_ids"], hp(images=images, text=text)["input_ids"])


def test_mrope_positions_match_hf_get_rope_index(ckpts):
    model, hf, hp = ckpts["qwen2_vl"]
    # two right-padded rows, three images (row 0 holds two of them), text between and after
    texts = [VISION + "a cat" + VISION + PROMPT, "Look: " + VISION]
    ref = hp(images=[IMAGES["A"], IMAGES["D"], IMAGES["B"]], text=texts, padding=True, padding_side="right",
             return_tensors="pt")
    want_pos, want_delta = hf.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"],
                                                   image_grid_thw=ref["image_grid_thw"],
                                                   attention_mask=ref["attention_mask"])
    pos, delta = mrope_positions(model.config, ref["input_ids"].numpy(), ref["attention_mask"].numpy(),
                                 ref["image_grid_thw"].numpy())
    np.testing.assert_array_equal(pos, want_pos.numpy())
    np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])
    assert delta.min() < 0  # images shorten the position range: decode must carry the delta


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_hf(ckpts, variant, case):
    model, hf, hp = ckpts[variant]
    images, ours, ref = _inputs(model, hp, CASES[case])
    logits = mmjax.forward(model, **ours)
    with torch.no_grad():
        want = hf(**ref).logits.numpy()
    assert logits.shape == want.shape
    assert np.abs(logits - want).max() <= tol("float32", "logits")
    out = mmjax.generate(model, images, "<image>" * len(images) + PROMPT, max_new_tokens=32, chat_template=False)
    with torch.no_grad():
        hg = hf.generate(**ref, max_new_tokens=32, do_sample=False)
    assert out.token_ids == hg[0, ref["input_ids"].shape[1]:].tolist()


def test_window_attention_is_what_matches_hf(ckpts):
    """Qwen2.5-VL image features equal HF's; the same weights with full attention everywhere do not."""
    model, hf, hp = ckpts["qwen2_5_vl"]
    _, ours, ref = _inputs(model, hp, ["A", "B"])
    segs = vision_inputs(model.config.vision, ours["image_grid_thw"])["window_segments"]
    assert len(np.unique(segs[:64])) == 4 and len(np.unique(segs[64:])) == 6  # windows really split
    with torch.no_grad():
        want = torch.cat(hf.model.get_image_features(ref["pixel_values"], ref["image_grid_thw"]).pooler_output).numpy()
    batch = {k: jnp.asarray(v) for k, v in prepare(model.config, ours).items()}

    def features(cfg):
        return np.asarray(jax.jit(lambda p, b: ComposedVLM(cfg).apply({"params": p}, b, method=ComposedVLM.image_features))(
            model.params, batch))

    assert np.abs(features(model.config) - want).max() <= tol("float32", "vision_features")
    full = model.config.replace(vision=model.config.vision.replace(fullatt_block_indexes=(0, 1)))
    assert np.abs(features(full) - want).max() > 1e-3


def test_one_vision_program_per_patch_bucket(ckpts):
    """Compilations counted by JAX's own monitoring events, on buckets no other test uses."""
    model = mmjax.load(ckpts["qwen2_vl"][0].path, buckets=Buckets(prompt=(48, 96), patches=(80, 160), token_slots=(8,)))

    def run(name):
        with count_compiles() as c:
            mmjax.generate(model, [IMAGES[name]], "<image>" + PROMPT, max_new_tokens=4, chat_template=False)
        fns = c.by_function
        return (sum(n for f, n in fns.items() if "prefill" in f), sum(n for f, n in fns.items() if "decode_step" in f),
                c.total)

    prefill, decode, _ = run("A")  # 64 patches -> bucket 80
    assert (prefill, decode) == (1, 1)
    assert run("B") == (0, 0, 0)  # 60 patches, another grid and token count: nothing compiles at all
    prefill, decode, _ = run("D")  # 120 patches -> bucket 160: a new prefill only
    assert (prefill, decode) == (1, 0)
    assert run("C") == (0, 0, 0)  # 80 patches -> bucket 80 again


def test_large_image_parity_compiles_and_memory(ckpts):
    """Images as users send them (thousands of patches; the tiny checkpoints' processor caps them
    unless the request raises max_pixels): Qwen2.5-VL logits equal HF's at 868² (62x62 patches:
    partial windows, the full-attention block over one 3844-patch image); a 896² image lands in
    the same 4096-patch bucket and compiles nothing; the tower's program holds no P x P buffer."""
    model, hf, hp = ckpts["qwen2_5_vl"]
    big = {"max_pixels": 896 * 896}
    img = _image(868, 868, 4)
    ours = model.preprocess([img], "<image>" + PROMPT, chat_template=False, mm_processor_kwargs=big)
    size = {"shortest_edge": hp.image_processor.size.shortest_edge, "longest_edge": big["max_pixels"]}
    ref = hp(images=[img], text=VISION + PROMPT, return_tensors="pt", images_kwargs={"size": size})
    assert ours["image_grid_thw"].tolist() == [[1, 62, 62]]
    with torch.no_grad():
        want = hf(**ref).logits.numpy()
    assert np.abs(mmjax.forward(model, **ours) - want).max() <= tol("float32", "logits")

    bucketed = mmjax.load(model.path, buckets=Buckets(prompt=(1040,), patches=(4096,), token_slots=(8,)))

    def run(image):
        with count_compiles() as c:
            mmjax.generate(bucketed, [image], "<image>" + PROMPT, max_new_tokens=2, chat_template=False,
                           mm_processor_kwargs=big)
        fns = c.by_function
        return (sum(n for f, n in fns.items() if "prefill" in f), sum(n for f, n in fns.items() if "decode_step" in f),
                c.total)

    assert run(img)[:2] == (1, 1)
    assert run(_image(896, 896, 5)) == (0, 0, 0)  # 4096 patches: same bucket, nothing compiles at all

    # Peak temporaries of the tower at the 4096-patch bucket: one head's [P, P] float32 logits
    # alone would be 64 MiB; the CPU kernel path and the XLA path (blocks in steps) stay below.
    batch = {k: jnp.asarray(v) for k, v in prepare(model.config, ours, Buckets(patches=(4096,))).items()}
    for policy in (model.config.vision.kernels, KernelPolicy(attention_cpu="xla")):
        cfg = with_kernels(model.config, policy)
        tower = jax.jit(lambda p, b: ComposedVLM(cfg).apply({"params": p}, b, method=ComposedVLM.image_features))
        temp = tower.lower(model.params, batch).compile().memory_analysis().temp_size_in_bytes
        assert temp < 4096 * 4096 * 4, (policy, temp)


def test_inconsistent_inputs_are_refused(ckpts):
    model, _, hp = ckpts["qwen2_vl"]
    _, ours, _ = _inputs(model, hp, ["A"])
    check_inputs(model.config, ours)
    short = dict(ours, input_ids=ours["input_ids"][:, 1:])  # drops <|vision_start|>: still fine
    check_inputs(model.config, short)
    ids = ours["input_ids"].copy()
    ids[0, np.flatnonzero(ids[0] == model.config.image_token_id)[0]] = 7
    with pytest.raises(InputError, match="15 image tokens"):
        check_inputs(model.config, dict(ours, input_ids=ids))
    with pytest.raises(InputError, match="describes 64 patches, pixel_values has 60"):
        check_inputs(model.config, dict(ours, pixel_values=ours["pixel_values"][:60]))
    with pytest.raises(InputError, match="together"):
        check_inputs(model.config, dict(ours, image_grid_thw=None))


def test_max_pixels_per_request_matches_hf(ckpts):
    """mm_processor_kwargs={"max_pixels": N} (vLLM's per-request image settings) resizes as HF's
    processor called with the same max_pixels; other keys and bad values are refused by name."""
    model, _, hp = ckpts["qwen2_vl"]
    img, cap = IMAGES["D"], 56 * 84  # 140x168 (10x12 patches) capped to 4704 pixels
    ours = model.preprocess([img], "<image>" + PROMPT, chat_template=False, mm_processor_kwargs={"max_pixels": cap})
    size = {"shortest_edge": hp.image_processor.size.shortest_edge, "longest_edge": cap}  # HF: areas, despite the names
    ref = hp(images=[img], text=VISION + PROMPT, return_tensors="pt", images_kwargs={"size": size})
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"].numpy())
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"].numpy())
    assert np.abs(ours["pixel_values"] - ref["pixel_values"].numpy()).max() <= tol("float32", "pixel_values")
    full = model.preprocess([img], "<image>" + PROMPT, chat_template=False)
    assert ours["pixel_values"].shape[0] < full["pixel_values"].shape[0]
    out = mmjax.generate(model, [img], "<image>" + PROMPT, max_new_tokens=2, chat_template=False,
                         mm_processor_kwargs={"max_pixels": cap})
    assert len(out.token_ids) <= 2
    with pytest.raises(InputError, match="mm_processor_kwargs: do_resize not accepted by this model's processor"):
        model.preprocess([img], "<image>x", mm_processor_kwargs={"do_resize": False})
    with pytest.raises(InputError, match=r"mm_processor_kwargs\.max_pixels: a positive integer"):
        model.preprocess([img], "<image>x", mm_processor_kwargs={"max_pixels": -5})
    with pytest.raises(InputError, match="min_pixels=9999 > max_pixels=4704"):
        model.preprocess([img], "<image>x", mm_processor_kwargs={"max_pixels": cap, "min_pixels": 9999})


@pytest.mark.parametrize("variant", VARIANTS)
def test_serving_engine_answers_as_generate_alone(ckpts, variant):
    """32 mixed requests (1 image of 4 sizes or none, varied prompts, greedy and sampled, varied
    max_new_tokens) through continuous batching: each equals mmjax.generate on it alone (M-RoPE
    deltas and packed/windowed images per request)."""
    from mmjax.serving import ServingEngine
    from serving_cases import assert_served_like_alone, mixed_cases

    model = ckpts[variant][0]
    cases = mixed_cases(list(IMAGES.values()), [PROMPT, "Hi.", "What is it?"], n=32 if variant == "qwen2_vl" else 6,
                        max_new=(2, 12))
    eng = ServingEngine(model, max_num_seqs=8, page_size=8)
    assert_served_like_alone(model, eng, cases)
    assert eng.stats()["encoder_cache_hits"] > 0
