"""Preprocessing parity against transformers 5.24 (test-only dependency) plus input-safety cases.

Tolerances: pixel values must agree within 1e-5 (in practice they are bit-identical: the same PIL
resize feeds the same float32 arithmetic); token ids, decoded text and rendered chat strings must
be equal. The one documented approximation, the crop-window resize for huge intermediates, is
allowed one uint8 level (1/255/std < 0.016 after normalization).
"""

import io
import json
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from mmjax.errors import InputError, LoadError
from mmjax.preprocess.chat import find_chat_template, prompt_to_messages, render_chat_template
from mmjax.preprocess.clip_image import CLIPImageProcessor
from mmjax.preprocess.images import load_image
from mmjax.preprocess.qwen2vl_image import Qwen2VLImageProcessor, smart_resize
from mmjax.preprocess.tokenizer import Tokenizer
from mmjax.testing.tokenizers import build_tiny_tokenizer, save_hf_tokenizer, save_tokenizer_folder
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
)
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

PIXEL_TOL = 1e-5
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                 "<|vision_end|>", "<|video_pad|>"]  # fmt: skip

# The template llava-hf/llava-1.5-7b-hf ships (chat_template.json), verbatim.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# The template Qwen/Qwen2-VL-*-Instruct ships, verbatim.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

warnings.filterwarnings("ignore", module="transformers")


def _rand_image(rng, h, w, mode="RGB"):
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)


def _hf_pixels(processor, images):
    return processor(images, return_tensors="np")["pixel_values"]


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------- image loading


def _modes(rng):
    base = Image.fromarray(rng.integers(0, 256, (24, 36, 4), dtype=np.uint8), "RGBA")
    palette = base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    rgb_t = base.convert("RGB")
    rgb_t.info["transparency"] = tuple(int(v) for v in np.asarray(rgb_t)[0, 0])
    return {
        "L": base.convert("L"), "LA": base.convert("LA"), "RGBA": base, "CMYK": base.convert("CMYK"),
        "1": base.convert("1"), "P": palette, "P+transparency": palette_t, "PA": base.convert("PA"),
        "RGB+tRNS": rgb_t, "YCbCr": base.convert("RGB").convert("YCbCr"),
        "I;16": Image.fromarray(rng.integers(0, 700, (24, 36)).astype(np.uint16)),
        "I": Image.fromarray(rng.integers(-20, 700, (24, 36)).astype(np.int32)),
        "F": Image.fromarray(rng.uniform(-20, 300, (24, 36)).astype(np.float32)),
    }  # fmt: skip


def test_load_image_modes_equal_hf_convert_to_rgb(rng):
    for name, image in _modes(rng).items():
        ours = load_image(image)
        assert ours.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(ours), hf_convert_to_rgb(image, return_numpy=True), err_msg=name)
        # and through the whole processor
        got = CLIPImageProcessor()(image)
        want = _hf_pixels(CLIPImageProcessorPil(), image)
        assert np.abs(got - want).max() <= PIXEL_TOL, name


def test_load_image_numpy_inputs(rng):
    for shape in [(20, 30, 1), (20, 30, 3), (20, 30, 4)]:
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(np.asarray(load_image(array)), hf_convert_to_rgb(array, return_numpy=True))
        got, want = CLIPImageProcessor()(array), _hf_pixels(CLIPImageProcessorPil(), array)
        assert np.abs(got - want).max() <= PIXEL_TOL, shape
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(grey)), np.repeat(grey[:, :, None], 3, axis=-1))
    with pytest.raises(InputError, match="dtype uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InputError, match=r"shape \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InputError, match="empty image"):
        load_image(np.zeros((0, 4, 3), np.uint8))


def test_load_image_path_bytes_and_pil_agree(rng, tmp_path):
    image = _rand_image(rng, 17, 23)
    path = tmp_path / "x.png"
    image.save(path)
    want = np.asarray(image)
    for source in (image, str(path), path, path.read_bytes(), bytearray(path.read_bytes())):
        np.testing.assert_array_equal(np.asarray(load_image(source)), want)


def test_load_image_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buf, "JPEG", exif=exif)
    loaded = load_image(buf.getvalue())
    assert loaded.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(ImageOps.exif_transpose(Image.open(buf))))


def _png_header_only(width, height):
    """A PNG whose IHDR claims width x height but carries almost no pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding(rng):
    # 81 MP: over our 64 MP default, under PIL's own warning threshold, so this is our check; the
    # message is the limit one, not a decode error, so no pixel data was read.
    with pytest.raises(InputError, match="9000x9000 = 81000000 pixels exceeds the limit"):
        load_image(_png_header_only(9000, 9000))
    with pytest.raises(InputError, match="decompression bomb"):  # PIL's hard limit, also InputError
        load_image(_png_header_only(100_000, 100_000))
    with pytest.raises(InputError, match="exceeds the limit of 100"):
        load_image(_rand_image(rng, 20, 20), max_pixels=100)
    with pytest.raises(InputError, match="exceeds the limit of 100"):
        CLIPImageProcessor(max_input_pixels=100)(_rand_image(rng, 20, 20))
    # under the limit the same header-only file fails as what it is: truncated
    with pytest.raises(InputError, match="cannot decode"):
        load_image(_png_header_only(10, 10))


def test_corrupt_inputs_raise_input_error_naming_the_input(tmp_path, rng):
    with pytest.raises(InputError, match=r"image bytes \(19 bytes, starting b'not an i'\)"):
        load_image(b"not an image at all")
    buf = io.BytesIO()
    _rand_image(rng, 64, 64).save(buf, "PNG")
    with pytest.raises(InputError, match="cannot decode"):
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2])
    missing = tmp_path / "missing.png"
    with pytest.raises(InputError, match="missing.png.*no such file"):
        load_image(missing)
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="unsupported image input"):
        load_image(12345)
    with pytest.raises(InputError, match="request image 2"):
        load_image(b"junk", name="request image 2")


# ----------------------------------------------------------------------------- CLIP


CLIP_CONFIGS = [
    {},
    {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 26}},
    {"size": {"height": 17, "width": 40}, "do_center_crop": False},
    {"size": {"shortest_edge": 20, "longest_edge": 33}, "crop_size": {"height": 24, "width": 24}},
    {"size": {"shortest_edge": 16}, "crop_size": {"height": 40, "width": 40}},  # crop pads
    {"do_rescale": False},
    {"do_normalize": False, "resample": 2},
    {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0], "rescale_factor": 0.01},
]
CLIP_SIZES = [(1, 1), (224, 224), (300, 200), (37, 501), (5, 3), (1, 50), (225, 224), (480, 640)]


@pytest.mark.parametrize("config", CLIP_CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True)[:60])
def test_clip_matches_hf(config, rng):
    hf, ours = CLIPImageProcessorPil(**config), CLIPImageProcessor.from_dict(config)
    for h, w in CLIP_SIZES:
        image = _rand_image(rng, h, w)
        want, got = _hf_pixels(hf, image), ours(image)
        assert got.dtype == np.float32 and got.shape == want.shape, (h, w, got.shape, want.shape)
        assert np.abs(got - want).max() <= PIXEL_TOL, (h, w)
        if not config:  # measured: bit-identical (same PIL resize, same float64->float32 steps)
            np.testing.assert_array_equal(got, want)


def test_clip_batch_and_saved_configs(rng, tmp_path):
    hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = [_rand_image(rng, h, w) for h, w in [(40, 50), (33, 90), (64, 32)]]
    want = _hf_pixels(hf, images)
    # flat preprocessor_config.json (ImageProcessor.save_pretrained) ...
    hf.save_pretrained(tmp_path / "flat")
    got = CLIPImageProcessor.from_folder(tmp_path / "flat")(images)
    assert got.shape == (3, 3, 32, 32) and np.abs(got - want).max() <= PIXEL_TOL
    # ... and the nested processor_config.json that Processor.save_pretrained writes instead
    tok = save_hf_tokenizer(build_tiny_tokenizer(400, LLAVA_SPECIALS), tmp_path / "tok", unk="<unk>")
    LlavaProcessor(image_processor=hf, tokenizer=tok, patch_size=14).save_pretrained(tmp_path / "nested")
    assert not (tmp_path / "nested" / "preprocessor_config.json").exists()
    got = CLIPImageProcessor.from_folder(tmp_path / "nested")(images)
    assert np.abs(got - want).max() <= PIXEL_TOL
    # legacy int sizes
    legacy = {"size": 32, "crop_size": 32, "do_center_crop": True}
    got = CLIPImageProcessor.from_dict(legacy)(images)
    assert np.abs(got - _hf_pixels(CLIPImageProcessorPil(**legacy), images)).max() <= PIXEL_TOL
    with pytest.raises(LoadError, match="no image processor config"):
        CLIPImageProcessor.from_folder(tmp_path / "tok")


def test_clip_crop_window_resize_for_huge_intermediates(rng):
    # Force the crop-window path on ordinary images and compare with HF's full resize + crop.
    worst, differing, total = 0.0, 0, 0
    for resample in (3, 2):
        for h, w in [(300, 200), (37, 501), (999, 2), (17, 1000), (480, 640)]:
            image = _rand_image(rng, h, w)
            config = {"resample": resample, "do_rescale": False, "do_normalize": False}
            want = _hf_pixels(CLIPImageProcessorPil(**config), image)
            got = CLIPImageProcessor.from_dict(config, max_resize_pixels=1)(image)
            diff = np.abs(got - want)
            worst, differing, total = max(worst, diff.max()), differing + (diff > 0).sum(), total + diff.size
    assert worst <= 1.0 and differing / total < 1e-3, (worst, differing / total)
    # A 1x20000 banner: the full intermediate would be 224x4480000 (1e9 pixels); we crop first.
    out = CLIPImageProcessor()(_rand_image(rng, 1, 20000))
    assert out.shape == (1, 3, 224, 224) and np.isfinite(out).all()
    with pytest.raises(InputError, match="resizes to 33x0"):
        CLIPImageProcessor.from_dict({"size": {"shortest_edge": 20, "longest_edge": 33}})(_rand_image(rng, 999, 2))


# ----------------------------------------------------------------------------- Qwen2-VL


QWEN_CONFIGS = [
    {},
    {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16},  # legacy top-level keys
    {"size": {"shortest_edge": 3136, "longest_edge": 28 * 28 * 30}, "patch_size": 8, "temporal_patch_size": 3},
    {"do_normalize": False, "resample": 2, "max_pixels": 28 * 28 * 40},
]
QWEN_SIZES = [(1, 1), (28, 28), (300, 200), (37, 501), (5, 3), (1, 50), (2, 399), (640, 480), (29, 57)]


@pytest.mark.parametrize("config", QWEN_CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True)[:60])
def test_qwen2vl_matches_hf(config, rng):
    hf, ours = Qwen2VLImageProcessorPil(**config), Qwen2VLImageProcessor.from_dict(config)
    images = [_rand_image(rng, h, w) for h, w in QWEN_SIZES]
    want = hf(images, return_tensors="np")
    pixels, grid = ours(images)
    assert pixels.dtype == np.float32 and pixels.shape == want["pixel_values"].shape
    assert pixels.shape[1] == ours.patch_dim
    assert np.abs(pixels - want["pixel_values"]).max() <= PIXEL_TOL
    if not config:  # measured: bit-identical
        np.testing.assert_array_equal(pixels, want["pixel_values"])
    np.testing.assert_array_equal(grid, want["image_grid_thw"])
    assert grid.dtype == np.int64
    for (h, w), row in zip(QWEN_SIZES, grid):
        assert ours.num_patches(h, w) == row[1] * row[2] == hf.get_number_of_image_patches(h, w)


def test_qwen2vl_defaults_saved_config_and_limits(rng, tmp_path):
    hf = Qwen2VLImageProcessorPil(min_pixels=100 * 28 * 28)
    hf.save_pretrained(tmp_path)
    ours = Qwen2VLImageProcessor.from_folder(tmp_path)
    assert (ours.min_pixels, ours.max_pixels, ours.patch_dim) == (100 * 28 * 28, 28 * 28 * 1280, 1176)
    image = _rand_image(rng, 90, 130)
    pixels, grid = ours(image)
    want = hf(image, return_tensors="np")
    assert np.abs(pixels - want["pixel_values"]).max() <= PIXEL_TOL
    np.testing.assert_array_equal(grid, want["image_grid_thw"])
    # the element order of one row: (C, T, ph, pw) with the frame repeated over T
    row = pixels[0].reshape(3, 2, 14, 14)
    np.testing.assert_array_equal(row[:, 0], row[:, 1])
    assert smart_resize(1, 150) == (28, 700) and smart_resize(1, 1) == (56, 56)  # by hand
    for h, w in [(1, 200), (10000, 60), (4000, 3000), (14, 14), (43, 97), (2, 2)]:
        assert smart_resize(h, w) == hf_smart_resize(h, w), (h, w)
    with pytest.raises(InputError, match=r"image 201x1 .* aspect ratio 201.0 exceeds 200"):
        ours(Image.new("RGB", (201, 1)))
    with pytest.raises(InputError, match="not a multiple of patch_size"):
        Qwen2VLImageProcessor(do_resize=False)(_rand_image(rng, 30, 28))
    with pytest.raises(LoadError, match="size: needs"):
        Qwen2VLImageProcessor.from_dict({"size": {"shortest_edge": 10}})


# ----------------------------------------------------------------------------- tokenizer


TEXTS = [
    "A photo of a cat.", "<image>\nWhat is in the image?", "  leading and trailing  ", "héllo 日本 🙂", "",
    "<s>hi</s><pad> x", "USER: <image>\nDescribe ASSISTANT:", "don't . , ? ! 're", "a <img> b <mask> c x<mask>y",
    "<|im_start|>user\nhi<|im_end|><|vision_start|><|image_pad|><|vision_end|>",
]  # fmt: skip


def _assert_same_as_hf(folder):
    hf, ours = AutoTokenizer.from_pretrained(folder), Tokenizer.from_folder(folder)
    for text in TEXTS:
        for add in (True, False):
            ids = hf(text, add_special_tokens=add)["input_ids"]
            assert ours.encode(text, add_special_tokens=add) == ids, (folder, text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.special_tokens_map == hf.special_tokens_map
    assert ours.vocab_size == len(hf)
    return hf, ours


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    tok = build_tiny_tokenizer(600, LLAVA_SPECIALS)
    hf = save_hf_tokenizer(tok, folder, unk="<unk>", pad="<pad>", extra_special_tokens=["<image>"])
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(), tokenizer=hf, chat_template=LLAVA_TEMPLATE, patch_size=14
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    tok = build_tiny_tokenizer(600, QWEN_SPECIALS, bos=None)
    save_hf_tokenizer(tok, folder, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                      extra_special_tokens=QWEN_SPECIALS[1:], chat_template=QWEN2VL_TEMPLATE)  # fmt: skip
    return folder


def test_tokenizer_matches_hf_llava_and_qwen(llava_folder, qwen_folder, tmp_path):
    hf, ours = _assert_same_as_hf(llava_folder)
    assert ours.encode("hi")[0] == ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids == (hf.eos_token_id,) and ours.pad_token_id == hf.pad_token_id
    hf, ours = _assert_same_as_hf(qwen_folder)
    assert ours.bos_token_id is None and ours.encode("hi") == hf("hi")["input_ids"]
    assert ours.token_to_id("<|image_pad|>") == hf.convert_tokens_to_ids("<|image_pad|>")
    # the transformers-free writer produces a folder HF reads the same way
    save_tokenizer_folder(build_tiny_tokenizer(600, LLAVA_SPECIALS), tmp_path / "plain", pad="<pad>")
    _assert_same_as_hf(tmp_path / "plain")


def test_tokenizer_config_variants_match_hf(llava_folder, tmp_path):
    folder = tmp_path / "variant"
    shutil.copytree(llava_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(
        add_bos_token=False,  # ignored by HF when tokenizer.json exists; must be by us too
        add_eos_token=True,
        clean_up_tokenization_spaces=True,  # ignored for BPE
        image_token="<img>",  # model-specific special token not in tokenizer.json
        mask_token={"__type": "AddedToken", "content": "<mask>", "lstrip": True, "rstrip": False,
                    "normalized": False, "single_word": False, "special": True},  # fmt: skip
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _, ours = _assert_same_as_hf(folder)
    assert ours.special_tokens_map["image_token"] == "<img>"
    config["split_special_tokens"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _assert_same_as_hf(folder)


def test_tokenizer_wordpiece_cleanup_matches_hf(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    raw = RawTokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.decoder = decoders.WordPiece()
    text = ["Don't stop. Is it here? Yes, it is! They're fine, we've seen it."] * 4
    raw.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", sep_token="[SEP]",
                                 clean_up_tokenization_spaces=True)  # fmt: skip
    hf.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_folder(tmp_path)
    ids = hf(text[0])["input_ids"]
    assert ours.encode(text[0]) == ids
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert "don't stop." in ours.decode(ids)  # the cleanup really ran (WordPiece would give "don ' t stop .")


def test_tokenizer_eos_ids_and_input_errors(llava_folder, tmp_path):
    folder = tmp_path / "gen"
    shutil.copytree(llava_folder, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    ours = Tokenizer.from_folder(folder)
    assert ours.eos_token_ids == (7, 2)  # generation config first, tokenizer eos (2) deduplicated
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert Tokenizer.from_folder(folder).eos_token_ids == (9, 2)
    assert ours.encode("héllo".encode()) == ours.encode("héllo")
    with pytest.raises(InputError, match=r"not valid UTF-8 \(byte b'\\xff' at offset 2\)"):
        ours.encode(b"ab\xffcd")
    with pytest.raises(InputError, match="not valid Unicode at index 1"):
        ours.encode("a\udcffb")
    with pytest.raises(InputError, match="expected str or UTF-8 bytes"):
        ours.encode(42)
    with pytest.raises(InputError, match=r"ids\[1\] = -3"):
        ours.decode([5, -3])
    assert ours.decode(np.array([37, 438], dtype=np.int64)) == ours.decode([37, 438])
    with pytest.raises(LoadError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_tiny_tokenizer_is_real_and_deterministic():
    a = build_tiny_tokenizer(500, LLAVA_SPECIALS)
    assert a.to_str() == build_tiny_tokenizer(500, LLAVA_SPECIALS).to_str()
    assert a.get_vocab_size() <= 500
    assert [a.token_to_id(t) for t in LLAVA_SPECIALS] == list(range(len(LLAVA_SPECIALS)))
    sentence = "The image shows a small red cat sitting on a table."
    ids = a.encode(sentence).ids
    assert ids[0] == a.token_to_id("<s>") and len(ids) < len(sentence) / 2  # merges learned words
    assert a.decode(ids) == sentence
    assert a.encode("x <image> y").ids.count(a.token_to_id("<image>")) == 1
    q = build_tiny_tokenizer(500, QWEN_SPECIALS, bos=None)
    assert q.encode("hi").ids == q.encode("hi", add_special_tokens=False).ids
    with pytest.raises(ValueError, match="bos='<s>' is not one of"):
        build_tiny_tokenizer(500, QWEN_SPECIALS)
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(100, LLAVA_SPECIALS)


# ----------------------------------------------------------------------------- chat templates


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first is red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the second?"}]},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "No image here, <b>&'quotes'"}]}],
]


def test_chat_llava_template_matches_hf_processor(llava_folder):
    processor = AutoProcessor.from_pretrained(llava_folder)
    template = find_chat_template(llava_folder)
    assert template == processor.chat_template == LLAVA_TEMPLATE
    tok = Tokenizer.from_folder(llava_folder)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_chat_template(template, messages, gen, **tok.special_tokens_map) == want
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want


def test_chat_qwen2vl_template_matches_hf(qwen_folder):
    hf_tok = AutoTokenizer.from_pretrained(qwen_folder)
    # Qwen2VLProcessor needs a torchvision video processor; apply_chat_template is ProcessorMixin's
    # own (Qwen2VLProcessor does not override it), so a LlavaProcessor carrier renders identically.
    carrier = LlavaProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=hf_tok, chat_template=QWEN2VL_TEMPLATE)
    ours = Tokenizer.from_folder(qwen_folder)
    assert ours.chat_template == QWEN2VL_TEMPLATE
    string_content = [{"role": "user", "content": "plain string content"}]
    for messages in CONVERSATIONS + [string_content]:
        for extra in ({}, {"add_vision_id": True}):
            want = carrier.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
            assert ours.apply_chat_template(messages, True, **extra) == want
            assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra) == want
    rendered = ours.apply_chat_template(prompt_to_messages("<image> What color?"))
    assert rendered.endswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color?<|im_end|>\n"
                             "<|im_start|>assistant\n")  # fmt: skip


def test_find_chat_template_locations(tmp_path):
    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))  # fmt: skip
    assert find_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert find_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "LEGACY"}))
    assert find_chat_template(tmp_path) == "LEGACY"  # HF's processor prefers the legacy json
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "P", "image_processor": {}}))
    assert find_chat_template(tmp_path) == "P"
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    (tmp_path / "chat_template.json").unlink()
    assert find_chat_template(tmp_path) == "P"  # never reaches the broken file
    (tmp_path / "processor_config.json").unlink()
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(LoadError, match="tokenizer_config.json: not valid JSON"):
        find_chat_template(tmp_path)


def test_render_chat_template_environment():
    msgs = [{"role": "user", "content": "hi", "name": None}]
    assert render_chat_template("{{ messages | tojson }}", msgs) == '[{"role": "user", "content": "hi"}]'
    assert render_chat_template("{{ '<a & b>' | tojson }}", msgs) == '"<a & b>"'  # no HTML escaping
    assert render_chat_template("  {% if true %}\nx{% endif %}\n", msgs) == "x"  # trim + lstrip blocks
    loop = "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render_chat_template(loop, msgs) == "01"
    ns = "{% set n = namespace(c=0) %}{% for m in messages %}{% set n.c = n.c + 1 %}{% endfor %}{{ n.c }}"
    assert render_chat_template(ns, msgs * 3) == "3"
    assert render_chat_template("{{ bos_token }}{{ add_generation_prompt }}", msgs, False, bos_token="<s>") == "<s>False"
    assert render_chat_template("{{ strftime_now('%Y') | length }}", msgs) == "4"
    image_obj = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (2, 2))}]}]
    assert render_chat_template("{{ messages[0].content[0].image }}", image_obj) == "<Image>"
    with pytest.raises(InputError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", msgs)
    with pytest.raises(InputError, match="unsafe"):
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", msgs)
    with pytest.raises(InputError, match="unsafe"):
        render_chat_template("{% set n = namespace(_x=1) %}", msgs)
    with pytest.raises(InputError, match="unsafe"):
        render_chat_template("{% set _ = messages.append(1) %}", msgs)  # immutable sandbox
    with pytest.raises(LoadError, match="syntax error on line 1"):
        render_chat_template("{% for %}", msgs)


def test_prompt_to_messages():
    assert prompt_to_messages("Describe <image> and <image>.") == [{"role": "user", "content": [
        {"type": "text", "text": "Describe"}, {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
        {"type": "text", "text": "."}]}]  # fmt: skip
    assert prompt_to_messages("<image>\nWhat is this?", num_images=1)[0]["content"] == [
        {"type": "image"}, {"type": "text", "text": "What is this?"}]  # fmt: skip
    assert prompt_to_messages("What is this?", num_images=2)[0]["content"] == [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is this?"}]  # fmt: skip
    assert prompt_to_messages("Just text")[0]["content"] == [{"type": "text", "text": "Just text"}]
    with pytest.raises(InputError, match="2 <image> marker"):
        prompt_to_messages("<image><image>", num_images=1)
    with pytest.raises(InputError, match="expected a string"):
        prompt_to_messages(b"bytes")
