"""Image loading and the small numeric steps every image processor shares.

`load_image` turns whatever the caller has (PIL image, path, encoded bytes, HWC uint8 array) into an
RGB PIL image, safely:
- the pixel limit is checked from the header, BEFORE any pixel is decoded (PIL.Image.open reads
  only the header), so a decompression bomb costs nothing;
- corrupt or truncated data raises InputError naming the input;
- EXIF orientation is applied (ImageOps.exif_transpose), as HF's own `load_image` does for files.

RGB conversion follows transformers 5.24 `image_transforms.convert_to_rgb` exactly, so pixel values
match HF's processors bit for bit:
- a PIL image with an alpha band (RGBA, LA, PA, ...) or a `transparency` entry (P / L / RGB with
  tRNS) is alpha-composited onto WHITE, then converted to RGB;
- every other mode goes through `Image.convert("RGB")`: L / 1 replicate the grey level, CMYK uses
  PIL's naive CMYK->RGB, and 16-/32-bit integer and float modes (I;16, I, F) are CLIPPED to
  0..255, not rescaled: a 16-bit image whose values exceed 255 comes out saturated. That is what
  HF does too; rescale such an image to 8 bits yourself before passing it in if that matters.
- a uint8 numpy array is always read as [H, W] or [H, W, C] (HF guesses the layout and can take a
  3-row image for channels-first; HF also rejects 2-D arrays, which we read as grey): C=1 and 2-D
  are replicated to 3 channels, C=4 is composited onto white with HF's numpy formula
  (round(a*rgb + (1-a)*255)), C=3 is used as is.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mmjax.errors import InputError, LoadError
from mmjax.jsonfile import read_json

# 64 megapixels: an 8000x8000 photo passes, a crafted 50000x50000 PNG (a few KB on disk, 7.5 GB
# decoded) does not. Per call: load_image(x, max_pixels=...).
DEFAULT_MAX_PIXELS = 64_000_000

# What PIL's decoders raise on corrupt or truncated data (plugins differ).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

ImageLike = Image.Image | str | os.PathLike | bytes | bytearray | memoryview | np.ndarray


def _describe(x: Any) -> str:
    """A short name for an input, for error messages (never the whole payload)."""
    if isinstance(x, (str, os.PathLike)):
        return f"image file {os.fspath(x)!r}"
    if isinstance(x, (bytes, bytearray, memoryview)):
        head = bytes(x[:8])
        return f"image bytes ({len(x)} bytes, starting {head!r})"
    if isinstance(x, np.ndarray):
        return f"image array (shape {x.shape}, dtype {x.dtype})"
    if isinstance(x, Image.Image):
        return f"PIL image (mode {x.mode}, {x.width}x{x.height})"
    return f"image of type {type(x).__name__}"


def _check_pixels(width: int, height: int, max_pixels: int, label: str) -> None:
    if width < 1 or height < 1:
        raise InputError(f"{label}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"{label}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(decompression-bomb guard; pass max_pixels=... to allow larger images)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """HF's convert_to_rgb for a PIL image: transparency composited onto white, then RGB."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray, label: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(f"{label}: expected dtype uint8 (HWC, 0..255), got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InputError(f"{label}: expected shape [H, W] or [H, W, C] with C in (1, 3, 4)")
    if array.shape[-1] == 1:
        rgb = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        # HF's numpy branch of convert_to_rgb (float64 blend, round half to even), not PIL's
        # alpha_composite, whose integer rounding differs by one level on some pixels.
        alpha = array[..., 3:4] / 255
        rgb = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    else:
        rgb = array
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def _decode(image: Image.Image, max_pixels: int, label: str) -> Image.Image:
    """Check size from the header, decode, apply EXIF orientation, convert to RGB."""
    _check_pixels(image.width, image.height, max_pixels, label)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except _DECODE_ERRORS as e:
        raise InputError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e


def _open(data: io.BytesIO | str | os.PathLike, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit (checked next, from the header) replaces PIL's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(data)
    except Image.DecompressionBombError as e:
        raise InputError(f"{label}: {e}") from e
    except FileNotFoundError as e:
        raise InputError(f"{label}: no such file") from e
    except IsADirectoryError as e:
        raise InputError(f"{label}: is a directory, not an image file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{label}: not a readable image ({type(e).__name__}: {e})") from e


def load_image(x: ImageLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Any supported image input -> a decoded RGB PIL image (see the module docstring).

    x: PIL.Image.Image | path (str / PathLike) | encoded bytes | numpy uint8 [H, W] or [H, W, C].
    max_pixels: width*height limit, checked before decoding. name: used in error messages
    instead of a description of x (e.g. "image 2 of the request").
    """
    label = name or _describe(x)
    if isinstance(x, Image.Image):
        return _decode(x, max_pixels, label)
    if isinstance(x, np.ndarray):
        if x.ndim >= 2:
            _check_pixels(x.shape[1], x.shape[0], max_pixels, label)
        return _array_to_rgb(x, label)
    if isinstance(x, (bytes, bytearray, memoryview)):
        return _decode(_open(io.BytesIO(bytes(x)), label), max_pixels, label)
    if isinstance(x, (str, os.PathLike)):
        with _open(x, label) as image:
            # _decode always returns a new image (convert copies), so closing the file is safe.
            return _decode(image, max_pixels, label)
    raise InputError(f"{label}: unsupported image input; pass a PIL image, a path, bytes or a uint8 array")


# ----------------------------------------------------------------- shared settings and steps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL filter ids as HF configs store them: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING.
RESAMPLE_IDS = (0, 1, 2, 3, 4, 5)


def parse_resample(value: Any) -> int:
    if isinstance(value, bool) or value not in RESAMPLE_IDS:
        raise LoadError(f"resample: expected a PIL filter id in {list(RESAMPLE_IDS)}, got {value!r}")
    return int(value)



def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """x * factor like HF's rescale: multiply in float64, then round to float32 once."""
    return (image.astype(np.float64) * factor).astype(np.float32)


def normalize_chw(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(x - mean) / std per channel, in float32 like HF's normalize. image: [C, H, W] float32."""
    if len(mean) != image.shape[0] or len(std) != image.shape[0]:
        raise InputError(f"image_mean/std have {len(mean)}/{len(std)} entries for {image.shape[0]} channels")
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return (image - m) / s


def as_channels(value: float | list | tuple, name: str) -> tuple[float, ...]:
    """image_mean / image_std may be a scalar (applied to every channel) or one value per channel."""
    if isinstance(value, (int, float)):
        out = (float(value),) * 3
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        out = tuple(float(v) for v in value)
    else:
        raise LoadError(f"{name}: expected a number or a list of numbers, got {value!r}")
    if name == "image_std" and not all(v != 0 and np.isfinite(v) for v in out):  # x / 0: silent inf/NaN pixels
        raise LoadError(f"image_std: every entry must be finite and non-zero, got {value!r}")
    return out


def as_number(value: Any, name: str, kind: type = float):
    """A numeric config entry (int(...) / float(...)) or a LoadError naming the key."""
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise LoadError(f"{name}: expected a number, got {value!r}") from None


def read_image_processor_config(folder: str | os.PathLike) -> dict:
    """The image processor's settings as transformers 5 saves them.

    `ImageProcessor.save_pretrained` writes a flat preprocessor_config.json;
    `Processor.save_pretrained` writes processor_config.json with the same dict under
    "image_processor" (and no preprocessor_config.json). Older checkpoints have the flat file.
    """
    folder = Path(folder)
    flat = folder / "preprocessor_config.json"
    nested = folder / "processor_config.json"
    for path in (flat, nested):
        if not path.is_file():
            continue
        data = read_json(path)
        if path == nested:
            if not isinstance(data.get("image_processor"), dict):
                continue
            data = data["image_processor"]
        return data
    raise LoadError(f"{folder}: no image processor config (looked for {flat.name}, {nested.name} with 'image_processor')")
