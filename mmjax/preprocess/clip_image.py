"""CLIP-style image preprocessing (resize shortest edge, center crop, rescale, normalize).

Equivalent to transformers 5.24 `CLIPImageProcessorPil` (the PIL backend that `CLIPImageProcessor`
resolves to without torchvision), step for step, so pixel values agree to float32 rounding:

1. RGB conversion: `images.load_image` (HF's convert_to_rgb, see there).
2. Resize with PIL (`Image.resize`, resample from the config, 3 = bicubic) to
   - size {"shortest_edge": s}: short side -> s, long side -> int(s * long / short) (truncated,
     torchvision's rule);
   - size {"shortest_edge": s, "longest_edge": l}: HF's get_size_with_aspect_ratio;
   - size {"height", "width"}: exactly that.
3. Center crop: top = (H - ch) // 2, left = (W - cw) // 2; an image smaller than the crop is
   zero-padded (uint8 0, before rescale) with ceil((crop - size) / 2) in front, as HF does.
4. Rescale: float64 multiply by rescale_factor, then float32. 5. Normalize: (x - mean) / std in
   float32.

One deliberate difference: when the resized image would exceed `max_resize_pixels` (a 1x10000
banner resized to shortest edge 224 is 224x2240000), we resize only the crop window (PIL's `box`
argument: same filter taps, coordinates computed from the crop offset) instead of the whole
image. HF would allocate the full intermediate. PIL takes box coordinates as float32, so the
two can differ by a uint8 level where a filter tap lands on a rounding boundary.

Output: pixel_values float32 [B, C=3, H, W], channel-first like HF (the JAX model transposes).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from mmjax.errors import InputError, LoadError
from mmjax.preprocess.images import (
    DEFAULT_MAX_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageLike,
    as_channels,
    as_number,
    load_image,
    normalize_chw,
    parse_resample,
    read_image_processor_config,
    rescale,
)



@dataclasses.dataclass(frozen=True)
class Size:
    """HF's SizeDict, reduced to the keys the PIL backend's resize reads."""

    shortest_edge: int | None = None
    longest_edge: int | None = None
    height: int | None = None
    width: int | None = None


def parse_size(value: Any, name: str, default_to_square: bool) -> Size:
    """HF's get_size_dict: an int means shortest edge (or a square), a pair means (height, width)."""
    if isinstance(value, bool) or value is None:
        raise LoadError(f"{name}: expected an int, [height, width] or a dict, got {value!r}")
    if isinstance(value, int):
        return Size(height=value, width=value) if default_to_square else Size(shortest_edge=value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return Size(height=int(value[0]), width=int(value[1]))
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(Size)}
        unknown = set(value) - known
        if unknown:
            raise LoadError(f"{name}: unsupported keys {sorted(unknown)} (supported: {sorted(known)})")
        try:
            size = Size(**{k: int(v) for k, v in value.items() if v is not None})
        except (TypeError, ValueError) as e:
            raise LoadError(f"{name}: values must be integers, got {value!r}") from e
        if not (size.shortest_edge or (size.height and size.width)):
            raise LoadError(f"{name}: needs 'shortest_edge' or both 'height' and 'width', got {value!r}")
        return size
    raise LoadError(f"{name}: expected an int, [height, width] or a dict, got {value!r}")


def resize_output_size(height: int, width: int, size: Size) -> tuple[int, int]:
    """(new_height, new_width) exactly as the HF PIL backend computes them."""
    if size.shortest_edge and size.longest_edge:
        return _size_with_aspect_ratio(height, width, size.shortest_edge, size.longest_edge)
    if size.shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return size.height, size.width


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    # HF image_transforms.get_size_with_aspect_ratio (DETR-style shortest edge capped by longest).
    raw_size = None
    lo, hi = float(min(height, width)), float(max(height, width))
    if hi / lo * size > max_size:
        raw_size = max_size * lo / hi
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    scale_from = raw_size if raw_size is not None else size
    if width < height:
        return int(scale_from * height / width), size
    return size, int(scale_from * width / height)


def center_crop_chw(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HF image_transforms.center_crop on [C, H, W], including its zero padding of small images."""
    _, h, w = image.shape
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return image[:, top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((image.shape[0], new_h, new_w), dtype=image.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[:, top_pad : top_pad + h, left_pad : left_pad + w] = image
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessor:
    """Settings of preprocessor_config.json; call it on images to get pixel_values [B, 3, H, W]."""

    do_resize: bool = True
    size: Size = Size(shortest_edge=224)
    resample: int = 3
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    # Always on in effect: the vision tower needs RGB. Kept so configs round-trip.
    do_convert_rgb: bool = True
    max_input_pixels: int = DEFAULT_MAX_PIXELS  # load_image limit, checked before decoding
    max_resize_pixels: int = DEFAULT_MAX_PIXELS  # above this, resize only the crop window

    @classmethod
    def from_dict(cls, config: dict, **overrides) -> CLIPImageProcessor:
        """From the dict HF saves (unknown keys such as image_processor_type are ignored)."""
        c = {**config, **overrides}
        kw: dict[str, Any] = {}
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if c.get(key) is not None:
                kw[key] = bool(c[key])
        if c.get("use_square_size"):  # KOSMOS-2 legacy flag in CLIPImageProcessor.__init__
            edge = parse_size(c.get("size", 224), "size", default_to_square=False).shortest_edge
            kw["size"] = Size(height=edge, width=edge)
        elif c.get("size") is not None:
            kw["size"] = parse_size(c["size"], "size", default_to_square=False)
        if c.get("crop_size") is not None:
            crop = parse_size(c["crop_size"], "crop_size", default_to_square=True)
            if not (crop.height and crop.width):
                raise LoadError(f"crop_size: needs 'height' and 'width', got {c['crop_size']!r}")
            kw["crop_size"] = (crop.height, crop.width)
        if c.get("resample") is not None:
            kw["resample"] = parse_resample(c["resample"])
        if c.get("rescale_factor") is not None:
            kw["rescale_factor"] = as_number(c["rescale_factor"], "rescale_factor")
        for key in ("image_mean", "image_std"):
            if c.get(key) is not None:
                kw[key] = as_channels(c[key], key)
        for key in ("max_input_pixels", "max_resize_pixels"):
            if c.get(key) is not None:
                kw[key] = as_number(c[key], key, int)
        return cls(**kw)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **overrides) -> CLIPImageProcessor:
        config = read_image_processor_config(folder)
        try:
            return cls.from_dict(config, **overrides)
        except LoadError as e:  # name the folder: the key alone does not say which model's config
            raise LoadError(f"{folder}: image processor config: {e}") from None

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """One image or a list -> float32 [B, 3, H, W]."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("CLIPImageProcessor: no images given")
        out = [self.process_one(img, name=None) for img in images]
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise InputError(
                f"CLIPImageProcessor: images came out with different shapes {sorted(shapes)}; "
                "enable do_center_crop or use size {height, width} to batch them"
            )
        return np.stack(out)

    def process_one(self, image: ImageLike, name: str | None = None) -> np.ndarray:
        """One image -> float32 [3, H, W]."""
        rgb = load_image(image, max_pixels=self.max_input_pixels, name=name)
        label = name or f"image {rgb.width}x{rgb.height}"
        array = self._resize_and_crop(rgb, label)  # uint8 [C, H, W]
        pixels = rescale(array, self.rescale_factor) if self.do_rescale else array.astype(np.float32)
        if self.do_normalize:
            pixels = normalize_chw(pixels, self.image_mean, self.image_std)
        return pixels

    def _resize_and_crop(self, rgb: Image.Image, label: str) -> np.ndarray:
        crop_h, crop_w = self.crop_size
        if not self.do_resize:
            array = np.moveaxis(np.asarray(rgb), -1, 0)
            return center_crop_chw(array, crop_h, crop_w) if self.do_center_crop else array
        out_h, out_w = resize_output_size(rgb.height, rgb.width, self.size)
        if out_h < 1 or out_w < 1:
            raise InputError(f"{label}: resizes to {out_h}x{out_w} (height x width) with size={self.size}")
        if out_h * out_w <= self.max_resize_pixels:
            array = np.moveaxis(np.asarray(rgb.resize((out_w, out_h), resample=self.resample)), -1, 0)
            return center_crop_chw(array, crop_h, crop_w) if self.do_center_crop else array
        top, left = (out_h - crop_h) // 2, (out_w - crop_w) // 2
        if not self.do_center_crop or top < 0 or left < 0:
            raise InputError(
                f"{label}: resizes to {out_h}x{out_w} = {out_h * out_w} pixels (height x width), "
                f"over max_resize_pixels={self.max_resize_pixels}"
            )
        # Resize only the crop window. Output pixel j of the full resize samples source coordinate
        # (j + 0.5) * in/out, so the window starts at left * in/out. Two single-axis passes,
        # horizontal first, because that is the order (and uint8 rounding point) of PIL's full
        # resize; one resize(box=...) call may run the vertical pass first and differ by up to
        # ~20 levels where bicubic overshoot is clipped.
        sx, sy = rgb.width / out_w, rgb.height / out_h
        rows = rgb.resize((crop_w, rgb.height), self.resample, box=(left * sx, 0, (left + crop_w) * sx, rgb.height))
        window = rows.resize((crop_w, crop_h), self.resample, box=(0, top * sy, crop_w, (top + crop_h) * sy))
        return np.moveaxis(np.asarray(window), -1, 0)
