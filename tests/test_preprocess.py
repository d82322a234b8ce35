"""Image preprocessing parity against transformers 5.24 (test-only dependency) plus input-safety
cases (tokenizer and chat templates: test_tokenizer_chat.py).

Tolerances: pixel values must agree within 1e-5 (in practice they are bit-identical: the same PIL
resize feeds the same float32 arithmetic); token ids, decoded text and rendered chat strings must
be equal. The one documented approximation, the crop-window resize for huge intermediates, is
allowed one uint8 level (1/255/std < 0.016 after normalization).
"""

import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from mmjax.errors import InputError, LoadError
from mmjax.preprocess.clip_image import CLIPImageProcessor
from mmjax.preprocess.images import load_image
from mmjax.preprocess.qwen2vl_image import Qwen2VLImageProcessor, smart_resize
from mmjax.testing.tokenizers import build_tiny_tokenizer, save_hf_tokenizer
from transformers import CLIPImageProcessorPil, LlavaProcessor, Qwen2VLImageProcessorPil
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

PIXEL_TOL = 1e-5
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

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
