"""Bad generation inputs through mmjax.generate on a tiny converted LLaVA (context 128 tokens).

Images that must be refused (corrupt, over the pixel limit) raise InputError naming the input;
images that must work (1x1, extreme aspect ratios, every PIL mode, EXIF-rotated) generate;
prompt / placeholder / context / sampling-parameter problems raise InputError (a ValueError)
whose message starts with the parameter's name. Nothing here writes: the model folder and the
image files are unchanged at the end (sha256). load_image's unit cases (mode conversions equal
to HF's, bomb and corrupt data at the load_image level) are in tests/test_preprocess.py.
"""
import hashlib
import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import mmjax
from converters.torch2flax import convert
from mmjax.errors import InputError
from mmjax.testing.checkpoints import save_tiny_llava, tiny_llava_config

CONTEXT = 128


def digest(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    save_tiny_llava(root / "hf", tiny_llava_config(max_positions=CONTEXT))
    convert(root / "hf", root / "flax", progress=False)
    return mmjax.load(root / "flax"), root / "flax", digest(root / "flax")


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


def gen(model, images=None, prompt="<image> hi", **kw):
    return mmjax.generate(model, images, prompt, **{"max_new_tokens": 2, **kw})


def photo(w=50, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def png_bytes(image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def png_header_only(width, height) -> bytes:
    """A PNG that declares width x height and holds no pixel data: a few dozen bytes on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- images that are refused

def test_corrupt_image_bytes_and_files(model, tmp_path):
    with pytest.raises(InputError, match=r"image bytes \(24 bytes, starting b'\\x89PNG\\r\\n\\x1a\\n'\): not a readable image"):
        gen(model, [b"\x89PNG\r\n\x1a\n" + b"garbage garbage!"])
    cut = png_bytes(photo())[:300]  # a valid header, then the data stops
    with pytest.raises(InputError, match=r"image bytes \(300 bytes, .*\): cannot decode image"):
        gen(model, [cut])
    path = tmp_path / "broken.png"
    path.write_bytes(cut)
    before = path.read_bytes()
    with pytest.raises(InputError, match=rf"image file '{path}': cannot decode image"):
        gen(model, [str(path)])
    assert path.read_bytes() == before
    with pytest.raises(InputError, match=r"image file '.*missing\.png': no such file"):
        gen(model, [str(tmp_path / "missing.png")])
    with pytest.raises(InputError, match=r"image of type NoneType: unsupported image input"):
        gen(model, [None])


def test_decompression_bomb_is_refused_from_the_header(model):
    # 9000x9000 declared in ~60 bytes: refused by the 64-megapixel limit before any decoding
    with pytest.raises(InputError, match=r"image bytes \(\d+ bytes.*\): 9000x9000 = 81000000 pixels exceeds the limit "
                                         r"of 64000000 \(decompression-bomb guard"):
        gen(model, [png_header_only(9000, 9000)])
    with pytest.raises(InputError, match=r"image bytes .*ecompression bomb"):  # past PIL's own hard limit too
        gen(model, [png_header_only(100_000, 100_000)])


# ---------------------------------------------------------------- images that must work

@pytest.mark.parametrize("size", [(1, 1), (1, 1000), (1000, 1), (1, 100_000), (3, 2)])
def test_tiny_and_extreme_aspect_ratio_images_generate(model, size):
    out = gen(model, [Image.new("RGB", size, (200, 30, 90))])
    assert len(out.token_ids) == 2
    px = model.preprocess([Image.new("RGB", size, (200, 30, 90))], "<image> hi")["pixel_values"]
    assert px.shape == (1, 3, 32, 32) and np.isfinite(px).all()


def _modes():
    rgb = photo(24, 18, seed=1)
    p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    i16 = Image.fromarray(np.full((18, 24), 1000, np.uint16))  # 16-bit, above 255
    return {
        "L": rgb.convert("L"), "1": rgb.convert("1"), "RGBA": rgb.convert("RGBA"), "LA": rgb.convert("LA"),
        "CMYK": rgb.convert("CMYK"), "P": p, "I;16": i16, "I;16-png": png_bytes(i16),
        "I": rgb.convert("I"), "F": rgb.convert("F"), "YCbCr": rgb.convert("YCbCr"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_image_mode_generates(model, mode):
    image = _modes()[mode]
    out = gen(model, [image])
    assert len(out.token_ids) == 2
    px = model.preprocess([image], "<image> hi")["pixel_values"]
    assert px.shape == (1, 3, 32, 32) and np.isfinite(px).all()


def _px(model, image):
    return model.preprocess([image], "<image> hi")["pixel_values"]


def test_mode_conversions_land_on_the_expected_rgb(model):
    white = _px(model, Image.new("RGB", (24, 18), (255, 255, 255)))
    np.testing.assert_array_equal(_px(model, Image.new("RGBA", (24, 18), (10, 200, 30, 0))), white)  # alpha 0 -> white
    i16 = Image.fromarray(np.full((18, 24), 1000, np.uint16))
    np.testing.assert_array_equal(_px(model, i16), white)  # clipped to 255, as HF does
    p = photo(24, 18, seed=2).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    np.testing.assert_array_equal(_px(model, p), _px(model, p.convert("RGB")))
    assert not np.array_equal(_px(model, p), white)


def test_exif_orientation_is_honoured(model, tmp_path):
    stored = photo(40, 20, seed=3)  # landscape as stored; EXIF says "rotate 90 CW" (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif.tobytes())
    before = path.read_bytes()
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # what a viewer shows: 20 wide, 40 high
    np.testing.assert_array_equal(_px(model, str(path)), _px(model, upright))
    np.testing.assert_array_equal(_px(model, path.read_bytes()), _px(model, upright))
    assert not np.array_equal(_px(model, str(path)), _px(model, stored))  # the tag did change something
    assert gen(model, [str(path)]).token_ids == gen(model, [upright]).token_ids
    assert path.read_bytes() == before


# ---------------------------------------------------------------- prompts and placeholders

def test_image_count_must_match_placeholders(model):
    img = photo()
    with pytest.raises(InputError, match=r"prompt has 1 <image> placeholder\(s\) but 2 image\(s\) were given"):
        gen(model, [img, img], "<image> one")
    with pytest.raises(InputError, match=r"prompt has 2 <image> placeholder\(s\) but 1 image\(s\) were given"):
        gen(model, [img], "<image> and <image>")
    with pytest.raises(InputError, match=r"prompt has 1 <image> placeholder\(s\) but 0 image\(s\) were given"):
        gen(model, None, "<image> where?")
    with pytest.raises(InputError, match=r"images: a batch of 2 prompts needs a list of 2 image lists"):
        gen(model, [[img]], ["<image> a", "<image> b"])
    with pytest.raises(InputError, match=r"images: a list of image lists needs a list of prompts"):
        gen(model, [[img]], "<image> a")


def test_context_overflow_is_an_error_unless_truncate(model):
    prompt = "the cat sat on the mat " * 10
    n = len(model.preprocess(None, prompt)["input_ids"][0])
    assert 64 < n < CONTEXT - 8
    with pytest.raises(InputError, match=rf"prompt of {n} tokens \+ max_new_tokens=40 exceeds the context of "
                                         rf"{CONTEXT} tokens \(pass truncate=True"):
        gen(model, None, prompt, max_new_tokens=40)
    out = gen(model, None, prompt, max_new_tokens=40, truncate=True, min_new_tokens=CONTEXT - n)
    assert len(out.prompt_tokens) == n and len(out.token_ids) == CONTEXT - n  # shortened exactly to fit
    too_long = "the cat sat on the mat " * 40
    with pytest.raises(InputError, match=r"prompt of \d+ tokens \+ max_new_tokens=2 exceeds the context"):
        gen(model, None, too_long, truncate=True)  # truncate shortens new tokens, never the prompt


BAD_PARAMS = [
    ({"max_new_tokens": 0}, r"max_new_tokens must be a positive integer, got 0"),
    ({"max_new_tokens": -3}, r"max_new_tokens must be a positive integer, got -3"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be a positive integer, got 2\.5"),
    ({"max_new_tokens": "8"}, r"max_new_tokens must be a positive integer, got '8'"),
    ({"min_new_tokens": -1}, r"min_new_tokens must be an integer in \[0, max_new_tokens\], got -1"),
    ({"min_new_tokens": 3}, r"min_new_tokens must be an integer in \[0, max_new_tokens\], got 3"),
    ({"temperature": -0.1}, r"temperature must be >= 0 and finite, got -0\.1"),
    ({"temperature": float("nan")}, r"temperature must be >= 0 and finite, got nan"),
    ({"temperature": float("inf")}, r"temperature must be >= 0 and finite, got inf"),
    ({"temperature": "1"}, r"temperature must be >= 0 and finite, got '1'"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1\.5"),
    ({"top_p": -0.5}, r"top_p must be in \(0, 1\], got -0\.5"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\], got nan"),
    ({"top_k": -1}, r"top_k must be an integer >= 0, got -1"),
    ({"top_k": 2.5}, r"top_k must be an integer >= 0, got 2\.5"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    ({"seed": 2**32}, r"seed must be an integer in \[0, 2\*\*32\), got 4294967296"),
    ({"seed": 2**70}, r"seed must be an integer in \[0, 2\*\*32\)"),
    ({"seed": 1.5}, r"seed must be an integer in \[0, 2\*\*32\), got 1\.5"),
    ({"stop_token_ids": [512]}, r"stop_token_ids: 512 is not a token id in \[0, 512\)"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids: -1 is not a token id"),
    ({"stop_token_ids": ["a"]}, r"stop_token_ids: 'a' is not a token id"),
    ({"stop_token_ids": 5}, r"stop_token_ids must be a list of token ids, got int"),
    ({"stop_token_ids": list(range(5, 20))}, r"stop_token_ids: at most 8 stop tokens"),
]


@pytest.mark.parametrize("kwargs, pattern", BAD_PARAMS, ids=[f"{k}={v!r}"[:40] for (k, v), in
                                                             (tuple(kw.items()) for kw, _ in BAD_PARAMS)])
def test_bad_sampling_parameters(model, kwargs, pattern):
    with pytest.raises(InputError, match="^" + pattern) as ei:
        gen(model, None, "hi", **kwargs)
    assert isinstance(ei.value, ValueError)  # InputError subclasses ValueError


def test_valid_edge_parameters_are_accepted(model):
    # the boundaries of the ranges above are allowed: top_p=1, top_k=0, seed 0 and 2**32-1, stop id V-1
    out = gen(model, None, "hi", temperature=0.7, top_p=1.0, top_k=0, seed=2**32 - 1, stop_token_ids=[511])
    assert len(out.token_ids) <= 2
    assert len(gen(model, None, "hi", temperature=1e-3, top_p=1e-6, top_k=1, seed=0).token_ids) == 2


def test_empty_prompts(model, tiny, tmp_path):
    out = gen(model, None, "")  # the chat template still gives "USER:  ASSISTANT:"
    assert len(out.token_ids) == 2 and len(out.prompt_tokens) > 3
    raw = gen(model, None, "", chat_template=False)  # only the tokenizer's BOS: still something to condition on
    assert raw.prompt_tokens == [model.tokenizer.bos_token_id]
    assert len(gen(model, None, ["", "hi"]).token_ids) == 2
    with pytest.raises(InputError, match=r"prompt must be a str or a non-empty list of str, got list"):
        gen(model, None, [])
    # a tokenizer that adds no BOS turns "" into no tokens at all: refused, not run on nothing
    folder = tmp_path / "no_bos"
    shutil.copytree(tiny[1], folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InputError, match=r"prompt 0: empty after tokenization"):
        gen(mmjax.load(folder), None, "", chat_template=False)


def test_non_utf8_prompts(model):
    with pytest.raises(InputError, match=r"prompt: bytes are not valid UTF-8 .*0xff in position 2"):
        gen(model, None, b"hi\xff\xfe")
    with pytest.raises(InputError, match=r"prompt: contains a character that is not valid Unicode at index"):
        gen(model, None, "hi \udcff there")
    with pytest.raises(InputError, match=r"prompt must be a str or a non-empty list of str, got int"):
        gen(model, None, 42)
    with pytest.raises(InputError, match=r"prompt\[1\] must be a str, got bytes"):
        gen(model, None, ["ok", b"\xff"])
    text = "héllo wörld"
    assert gen(model, None, text.encode("utf-8")).prompt_tokens == gen(model, None, text).prompt_tokens


def test_nothing_was_written_into_the_model_folder(tiny):
    assert digest(tiny[1]) == tiny[2]


def test_load_refuses_an_unknown_encoder_mode(tiny_llava):
    with pytest.raises(InputError, match="mm_encoder_tp_mode='dat' is not one of weights, data"):
        mmjax.load(tiny_llava.flax, mm_encoder_tp_mode="dat")
