"""Qwen2-VL / Qwen2.5-VL processor (transformers 5.24 Qwen2VLProcessor / Qwen2_5_VLProcessor).

`<image>` in a prompt becomes `<|vision_start|><|image_pad|><|vision_end|>` (what Qwen's chat
template writes for an image part); after tokenizing, each `<|image_pad|>` is repeated
t * h * w / merge^2 times for its image's patch grid. Outputs HF's names: input_ids,
attention_mask, pixel_values [P, C*t*ps*ps] (all images' patch rows concatenated),
image_grid_thw [I, 3] and mm_token_type_ids (1 on image tokens, as HF's processor returns for
get_rope_index).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mmjax.errors import LoadError
from mmjax.preprocess.processor import VLMProcessor
from mmjax.preprocess.qwen2vl_image import Qwen2VLImageProcessor

__all__ = ["Qwen2VLProcessor", "VISION_START", "IMAGE_PAD", "VISION_END"]

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


class Qwen2VLProcessor(VLMProcessor):
    image_text = VISION_START + IMAGE_PAD + VISION_END
    image_token = IMAGE_PAD

    def __init__(self, folder, config, tokenizer=None, image_processor=None):
        super().__init__(folder, tokenizer, image_processor or Qwen2VLImageProcessor.from_folder(folder))
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

    def image_inputs(self, images: list[Any]):
        px, grid = self.image_processor(images)
        return {"pixel_values": px, "image_grid_thw": grid}, [int(n) for n in self.config.image_tokens(grid)]

    def __call__(self, images=None, prompt="", *, chat_template=None) -> dict:
        out = super().__call__(images, prompt, chat_template=chat_template)
        out["mm_token_type_ids"] = (out["input_ids"] == self.config.image_token_id).astype(np.int32)
        return out
