"""Host side of a composed model: its processor (images + prompt -> HF-named arrays) and its
prepare step (those arrays -> what the jitted program reads, checked and padded to buckets).

Every family has one prepare step, `prepare(cfg, inputs, buckets=None, rows=None, tokens=None)
-> dict`: it raises InputError when images and image tokens disagree, and returns the batch
arrays besides input_ids (pixel_values, positions, ...). With buckets (generation) they are
padded: rows / tokens are the batch and prompt buckets the caller already chose; buckets=None
keeps the exact sizes (mmjax.forward).
"""
from __future__ import annotations

import numpy as np

from mmjax.bucketing import pick
from mmjax.errors import InputError
from mmjax.preprocess.buffers import padded_rows
from mmjax.preprocess.clip_image import CLIPImageProcessor
from mmjax.preprocess.processor import VLMProcessor

__all__ = ["ComposedProcessor", "check_composed_inputs", "prepare_composed"]


def check_composed_inputs(cfg, batch) -> None:
    """Images and image tokens must agree with the fusion (InputError otherwise)."""
    ids = np.asarray(batch["input_ids"])
    px = batch.get("pixel_values")
    n_img = 0 if px is None else int(np.shape(px)[0])
    q, tid = cfg.image_seq_length, cfg.image_token_id
    marks = ids == tid
    if cfg.fusion == "tokens":
        if int(marks.sum()) != n_img * q:
            raise InputError(f"input_ids hold {int(marks.sum())} image tokens (id {tid}) but {n_img} image(s) give "
                             f"{n_img * q} features ({q} each)")
        return
    if n_img == 0:
        if cfg.prefix_attention == "bidirectional":
            raise InputError("this model attends bidirectionally over an image prefix: every row needs an image")
        if marks.any():
            raise InputError(f"input_ids hold image tokens (id {tid}) but no pixel_values were given")
        return
    if n_img != ids.shape[0]:
        raise InputError(f"prefix fusion takes one image per row: {n_img} image(s) for {ids.shape[0]} row(s)")
    if ids.shape[1] < q or not marks[:, :q].all() or marks[:, q:].any():
        raise InputError(f"prefix fusion: every row must start with exactly {q} image tokens (id {tid}), the "
                         "positions the image features fill (Model.preprocess puts them there)")


def prepare_composed(cfg, inputs: dict, buckets=None, rows: int | None = None, tokens: int | None = None) -> dict:
    """Check, then pixel_values [I, C, H, W] padded to the image-count bucket (zero images are
    never read: only the first I images' features fill image tokens)."""
    check_composed_inputs(cfg, inputs)
    px = inputs.get("pixel_values")
    if px is None:
        return {}
    px = np.asarray(px)
    return {"pixel_values": px if buckets is None else padded_rows(px, pick(px.shape[0], buckets.images,
                                                                          "number of images"))}


class ComposedProcessor(VLMProcessor):
    """Model.preprocess for a composed model with a fixed token count per image: CLIP-style
    image processing (the folder's preprocessor_config.json) and the image tokens its fusion
    needs ("tokens": each <image> becomes Q image tokens, as HF's LlavaProcessor does)."""

    def __init__(self, folder, cfg, tokenizer=None):
        super().__init__(folder, tokenizer, CLIPImageProcessor.from_folder(folder))
        self.config = cfg
        tok_id = None if self.tokenizer is None else self.tokenizer.token_to_id(self.image_token)
        if tok_id is not None and tok_id != cfg.image_token_id:
            raise InputError(f"{folder}: tokenizer maps {self.image_token} to {tok_id}, config says "
                             f"image_token_id={cfg.image_token_id}")

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id  # the tokenizer's, when it has one (checked above)

    def image_inputs(self, images, **mm_kwargs):
        return {"pixel_values": self.image_processor(images)}, [self.config.image_seq_length] * len(images)

    def expand(self, ids, counts):
        if self.config.fusion == "tokens":
            return super().expand(ids, counts)
        if len(counts) > 1:
            raise InputError(f"prefix fusion takes one image per prompt, got {len(counts)}")
        tid = self.config.image_token_id  # the image goes first, wherever <image> was written
        return [tid] * sum(counts) + [t for t in ids if t != tid]
