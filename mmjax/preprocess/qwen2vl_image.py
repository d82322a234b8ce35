"""Qwen2-VL image preprocessing: dynamic-resolution resize and patch flattening.

Equivalent to transformers 5.24 `Qwen2VLImageProcessorPil`, step for step:

1. RGB conversion: `images.load_image` (HF's convert_to_rgb).
2. `smart_resize(h, w, factor=patch_size * merge_size, min_pixels, max_pixels)`: both sides
   rounded (Python round, half to even) to multiples of factor; if the area then exceeds
   max_pixels, scale down by sqrt(h*w / max_pixels) and floor to multiples; if below min_pixels,
   scale up by sqrt(min_pixels / (h*w)) and ceil. Aspect ratios above 200 are rejected (HF raises
   too). PIL resize to that size (resample 3 = bicubic), even when the size is unchanged.
3. Rescale (float64 multiply, then float32) and normalize ((x - mean) / std in float32).
4. Patchify a [C, H, W] image (grid gh = H / ps, gw = W / ps) into [gh * gw, C * T * ps * ps]:
   rows ordered (gh/m, gw/m, m, m) -- merge_size x merge_size blocks of neighbouring patches are
   consecutive, which the vision tower's patch merger relies on -- and each row ordered
   (C, T, ps_h, ps_w), the single frame repeated T = temporal_patch_size times (the Conv3d
   patch embedding expects T frames). For ps = 14, T = 2, C = 3 a row has 1176 values.

transformers 5 names the pixel bounds size={"shortest_edge": min_pixels, "longest_edge":
max_pixels} (both are AREAS, not edges); older configs have top-level min_pixels / max_pixels,
which take precedence as in HF's __init__.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

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

MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(new_height, new_width): multiples of factor, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"image {width}x{height} (width x height): aspect ratio "
            f"{max(height, width) / min(height, width):.1f} exceeds {MAX_ASPECT_RATIO}, which Qwen2-VL's "
            "resize does not support; crop or pad the image first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """[C, H, W] -> [gh * gw, C * T * ps * ps] in HF's element order (see module docstring)."""
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    if gh * patch_size != h or gw * patch_size != w or gh % merge_size or gw % merge_size:
        raise InputError(
            f"image {w}x{h} (width x height) is not a multiple of patch_size * merge_size = "
            f"{patch_size * merge_size} on both sides; enable do_resize"
        )
    m, p = merge_size, patch_size
    x = image.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * temporal_patch_size * p * p)


@dataclasses.dataclass(frozen=True)
class Qwen2VLImageProcessor:
    """Settings of preprocessor_config.json; call it on images to get (pixel_values, grid_thw)."""

    do_resize: bool = True
    min_pixels: int = 56 * 56  # HF size["shortest_edge"]
    max_pixels: int = 28 * 28 * 1280  # HF size["longest_edge"]
    resample: int = 3
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True  # always on in effect (the vision tower needs RGB)
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    max_input_pixels: int = DEFAULT_MAX_PIXELS  # load_image limit, checked before decoding

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * ps * ps (1176 for the defaults)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, config: dict, **overrides) -> Qwen2VLImageProcessor:
        c = {**config, **overrides}
        kw: dict[str, Any] = {}
        size = c.get("size")
        if size is not None:
            if not isinstance(size, dict):
                raise LoadError(f"size: expected a dict with shortest_edge/longest_edge, got {size!r}")
            # transformers 5 keys first; a few checkpoints carry the old names inside size.
            lo = size.get("shortest_edge", size.get("min_pixels"))
            hi = size.get("longest_edge", size.get("max_pixels"))
            if lo is None or hi is None:
                raise LoadError(f"size: needs 'shortest_edge' and 'longest_edge' (pixel areas), got {size!r}")
            kw["min_pixels"] = as_number(lo, "size.shortest_edge", int)
            kw["max_pixels"] = as_number(hi, "size.longest_edge", int)
        for key in ("min_pixels", "max_pixels"):  # legacy top-level keys win, as in HF's __init__
            if c.get(key) is not None:
                kw[key] = as_number(c[key], key, int)
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if c.get(key) is not None:
                kw[key] = bool(c[key])
        for key in ("patch_size", "temporal_patch_size", "merge_size", "max_input_pixels"):
            if c.get(key) is not None:
                kw[key] = as_number(c[key], key, int)
        if c.get("resample") is not None:
            kw["resample"] = parse_resample(c["resample"])
        if c.get("rescale_factor") is not None:
            kw["rescale_factor"] = as_number(c["rescale_factor"], "rescale_factor")
        for key in ("image_mean", "image_std"):
            if c.get(key) is not None:
                kw[key] = as_channels(c[key], key)
        out = cls(**kw)
        if out.min_pixels > out.max_pixels:
            raise LoadError(f"min_pixels={out.min_pixels} > max_pixels={out.max_pixels}")
        return out

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **overrides) -> Qwen2VLImageProcessor:
        config = read_image_processor_config(folder)
        try:
            return cls.from_dict(config, **overrides)
        except LoadError as e:  # name the folder: the key alone does not say which model's config
            raise LoadError(f"{folder}: image processor config: {e}") from None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)

    def num_patches(self, height: int, width: int) -> int:
        """Patch rows for an image of this size (image tokens = num_patches / merge_size**2)."""
        h, w = self.resized_size(height, width) if self.do_resize else (height, width)
        return (h // self.patch_size) * (w // self.patch_size)

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """One image or a list -> (pixel_values float32 [P, C*T*ps*ps], image_grid_thw int64 [n, 3]).

        P is the sum of gh * gw over images, concatenated in order; grid_thw rows are (1, gh, gw).
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("Qwen2VLImageProcessor: no images given")
        patches, grids = [], []
        for image in images:
            rows, grid = self.process_one(image)
            patches.append(rows)
            grids.append(grid)
        return np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int64)

    def process_one(self, image: ImageLike, name: str | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patch rows float32 [gh * gw, C*T*ps*ps], (1, gh, gw))."""
        rgb = load_image(image, max_pixels=self.max_input_pixels, name=name)
        if self.do_resize:
            h, w = self.resized_size(rgb.height, rgb.width)
            rgb = rgb.resize((w, h), resample=self.resample)
        chw = np.moveaxis(np.asarray(rgb), -1, 0)  # uint8 [C, H, W]
        pixels = rescale(chw, self.rescale_factor) if self.do_rescale else chw.astype(np.float32)
        if self.do_normalize:
            pixels = normalize_chw(pixels, self.image_mean, self.image_std)
        rows = patchify(pixels, self.patch_size, self.merge_size, self.temporal_patch_size)
        return rows, (1, pixels.shape[1] // self.patch_size, pixels.shape[2] // self.patch_size)
