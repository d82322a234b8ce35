"""Qwen2-VL / Qwen2.5-VL processor (transformers 5.24 Qwen2VLProcessor / Qwen2_5_VLProcessor).

`<image>` in a prompt becomes `<|vision_start|><|image_pad|><|vision_end|>` (what Qwen's chat
template writes for an image part); after tokenizing, each `<|image_pad|>` is repeated
t * h * w / merge^2 times for its image's patch grid. Outputs HF's names: input_ids,
attention_mask, pixel_values [P, C*t*ps*ps] (all images' patch rows concatenated),
image_grid_thw [I, 3] and mm_token_type_ids (1 on image tokens, as HF's processor returns for
get_rope_index).

The prepare step (`prepare`) turns those arrays into what the jitted program reads: M-RoPE
positions (`mrope_positions`, exactly HF's get_rope_index), patches padded to a patch bucket and
the tower's index arrays. Text tokens advance one position on all three M-RoPE axes (t, h, w); an
image of llm grid (t, h', w') = (t, h/m, w/m) gets (start + t_i, start + row, start + col) and
moves the next position on by max(h', w'), so a sequence's last position is usually below its
length. The difference (rope delta, per row) is what decode adds to a token's cache index.
Nothing in the jitted program depends on image_grid_thw, so one program serves every image
layout of a (B, T, P) bucket.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mmjax.bucketing import pick
from mmjax.errors import InputError, LoadError
from mmjax.preprocess.buffers import padded_rows
from mmjax.preprocess.processor import VLMProcessor
from mmjax.preprocess.qwen2vl_image import Qwen2VLImageProcessor
from mmjax.vision.qwen2vl import vision_inputs

__all__ = ["Qwen2VLProcessor", "VISION_START", "IMAGE_PAD", "VISION_END", "mrope_positions", "check_inputs",
           "prepare"]

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


class Qwen2VLProcessor(VLMProcessor):
    image_text = VISION_START + IMAGE_PAD + VISION_END
    image_token = IMAGE_PAD
    # per request, as vLLM's mm_processor_kwargs: fewer (or more) image tokens than the checkpoint's bounds
    mm_kwargs_accepted = ("min_pixels", "max_pixels")

    def __init__(self, folder, config, tokenizer=None, image_processor=None):
        super().__init__(folder, tokenizer, image_processor or Qwen2VLImageProcessor.from_folder(folder))
        if self.tokenizer is None:
            raise LoadError(f"{self.folder}: no tokenizer files; Qwen2-VL's processor needs tokenizer.json")
        self.config = config
        ip, v = self.image_processor, config.vision
        for name, got, want in (("patch_size", ip.patch_size, v.patch_size),
                                ("merge_size", ip.merge_size, v.spatial_merge_size),
                                ("temporal_patch_size", ip.temporal_patch_size, v.temporal_patch_size)):
            if got != want:
                raise LoadError(f"{self.folder}: image processor {name}={got} but the vision tower expects {want}")
        for token, want in ((IMAGE_PAD, config.image_token_id), (VISION_START, config.vision_start_token_id),
                            (VISION_END, config.vision_end_token_id)):
            got = self.tokenizer.token_to_id(token)
            if got != want:
                raise LoadError(f"{self.folder}: tokenizer maps {token} to {got}, config says {want}")

    @property
    def image_marker_ids(self) -> list[int]:  # <|vision_start|><|image_pad|><|vision_end|>
        c = self.config
        return [c.vision_start_token_id, c.image_token_id, c.vision_end_token_id]

    def image_inputs(self, images: list[Any], **mm_kwargs):
        ip = self.image_processor
        if mm_kwargs:
            for k, v in mm_kwargs.items():
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise InputError(f"mm_processor_kwargs.{k}: a positive integer (pixels) is needed, got {v!r}")
            ip = dataclasses.replace(ip, **mm_kwargs)
            if ip.min_pixels > ip.max_pixels:
                raise InputError(f"mm_processor_kwargs: min_pixels={ip.min_pixels} > max_pixels={ip.max_pixels}")
        px, grid = ip(images)
        return {"pixel_values": px, "image_grid_thw": grid}, [int(n) for n in self.config.image_tokens(grid)]

    def __call__(self, images=None, prompt="", *, chat_template=None, mm_processor_kwargs=None,
                 prompt_token_ids=None) -> dict:
        out = super().__call__(images, prompt, chat_template=chat_template, mm_processor_kwargs=mm_processor_kwargs,
                               prompt_token_ids=prompt_token_ids)
        out["mm_token_type_ids"] = (out["input_ids"] == self.config.image_token_id).astype(np.int32)
        return out


# ---------------------------------------------------------------- the prepare step

def mrope_positions(cfg, input_ids, attention_mask=None, image_grid_thw=None):
    """HF get_rope_index for images: (position_ids [3, B, T] int32, rope_deltas [B] int32).

    Images are taken in row-major order over the batch, each consuming its t*h*w/m^2 image
    tokens (a run of image tokens may hold several images). Padded positions (mask 0) are 0."""
    ids = np.asarray(input_ids)
    B, T = ids.shape
    mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    m = cfg.vision.spatial_merge_size
    out = np.zeros((3, B, T), np.int32)
    deltas = np.zeros((B,), np.int32)
    k = 0
    for b in range(B):
        row = ids[b][mask[b]]
        is_img = row == cfg.image_token_id
        pos, cur, i = [], 0, 0
        while i < len(row):
            if not is_img[i]:
                j = i + 1
                while j < len(row) and not is_img[j]:
                    j += 1
                pos.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
            else:
                if k >= len(grids):
                    raise InputError(f"row {b}: more image tokens than the {len(grids)} image(s) of image_grid_thw")
                t, h, w = (int(v) for v in grids[k])
                k += 1
                lt, lh, lw = t, h // m, w // m
                j = i + lt * lh * lw
                if j > len(row) or not is_img[i:j].all():
                    raise InputError(f"row {b}: image {k - 1} (grid {(t, h, w)}) needs {lt * lh * lw} consecutive "
                                     f"image tokens at position {i}")
                tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
                pos.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
                cur += max(h, w) // m
            i = j
        if pos:
            p = np.concatenate(pos, axis=1)
            out[:, b, mask[b]] = p
            deltas[b] = p.max() + 1 - len(row)
    if k != len(grids):
        raise InputError(f"image_grid_thw has {len(grids)} image(s) but input_ids hold image tokens for {k}")
    return out, deltas


def prepare(cfg, inputs: dict, buckets=None, rows: int | None = None, tokens: int | None = None) -> dict:
    """The family's prepare step: check, then the host-built arrays the module reads
    (position_ids [3, B, T], rope_deltas [B], pixel_values [P, C*t*ps*ps] and the tower's index arrays).

    With buckets (generation) everything is padded: rows/tokens are the batch and prompt
    buckets the caller already chose, patches go up to buckets.patches. buckets=None keeps the
    exact sizes (mmjax.forward). Padding is inert: zero pixels with segment id -1, positions 0."""
    check_inputs(cfg, inputs)
    ids = np.asarray(inputs["input_ids"])
    B, T = ids.shape
    Bb, Tb = rows or B, tokens or T
    grid = inputs.get("image_grid_thw")
    pos, deltas = mrope_positions(cfg, ids, inputs.get("attention_mask"), grid)
    out = {"position_ids": np.zeros((3, Bb, Tb), np.int32), "rope_deltas": np.zeros((Bb,), np.int32)}
    out["position_ids"][:, :B, :T] = pos[:, :, :Tb]
    out["position_ids"][:, B:] = np.arange(Tb, dtype=np.int32)  # padding rows: plain positions
    out["rope_deltas"][:B] = deltas
    px = inputs.get("pixel_values")
    if px is not None:
        px = np.asarray(px)
        P = px.shape[0] if buckets is None else pick(px.shape[0], buckets.patches, "number of image patches")
        out["pixel_values"] = padded_rows(px, P)  # aligned: the device array aliases it (buffers.py)
        out.update(vision_inputs(cfg.vision, grid, P))
    return out


def check_inputs(cfg, batch) -> None:
    """Host-side: pixel rows, grids and image tokens must agree (HF raises on the same)."""
    ids = np.asarray(batch["input_ids"])
    px, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    if (px is None) != (grid is None):
        raise InputError("pixel_values and image_grid_thw must be given together")
    if np.any(ids == cfg.video_token_id):
        raise InputError(f"input_ids hold video tokens (id {cfg.video_token_id}); videos are not supported")
    found = int((ids == cfg.image_token_id).sum())
    if px is None:
        if found:
            raise InputError(f"input_ids hold {found} image tokens (id {cfg.image_token_id}) but no image was given")
        return
    grid = np.asarray(grid).reshape(-1, 3)
    px_shape = tuple(np.shape(px))
    if len(px_shape) != 2 or px_shape[1] != cfg.vision.patch_dim:
        raise InputError(f"pixel_values: expected [patches, {cfg.vision.patch_dim}], got {px_shape}")
    m = cfg.vision.spatial_merge_size
    if np.any(grid[:, 1:] % m) or np.any(grid <= 0):
        raise InputError(f"image_grid_thw {grid.tolist()}: h and w must be positive multiples of {m}")
    if int(np.prod(grid, axis=1).sum()) != px_shape[0]:
        raise InputError(f"image_grid_thw {grid.tolist()} describes {int(np.prod(grid, axis=1).sum())} patches, "
                         f"pixel_values has {px_shape[0]}")
    want = int(cfg.image_tokens(grid).sum())
    if found != want:
        raise InputError(f"input_ids hold {found} image tokens (id {cfg.image_token_id}) but image_grid_thw "
                         f"{grid.tolist()} gives {want} features")
