"""From (images, prompt) to model inputs, the same way for every family.

  prompt --(chat template, optional)--> text with one image marker per image
         --(tokenizer)--> ids --(family.expand)--> ids with each image's token run
  images --(family image processor)--> pixel_values (+ family extras, e.g. image_grid_thw)

Users write "<image>" where an image goes, for every family. A prompt without "<image>" but
with images gets the images first. The output uses HF's names and layouts, right-padded.

A model with its own tokenization gives token ids instead of text (prompt_token_ids: one row or
one per row); they skip the chat template and the tokenizer, and an image goes where the ids hold
the family's image token id (images first when they hold none). Its folder may have no
tokenizer files at all: the processor then has tokenizer None and refuses text prompts.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mmjax.errors import InputError
from mmjax.preprocess.chat import find_chat_template, prompt_to_messages, render_chat_template
from mmjax.preprocess.tokenizer import Tokenizer, generation_eos_ids

__all__ = ["IMAGE_PLACEHOLDER", "VLMProcessor", "normalize_requests", "normalize_token_requests", "is_one_row"]

IMAGE_PLACEHOLDER = "<image>"


def normalize_requests(images, prompt) -> list[tuple[list, str]]:
    """(images, prompt) in any accepted form -> [(images of the row, prompt of the row)]."""
    def as_images(x) -> list:
        if x is None:
            return []
        return list(x) if isinstance(x, (list, tuple)) else [x]

    if isinstance(prompt, (bytes, bytearray)):
        try:
            prompt = bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"prompt: bytes are not valid UTF-8 ({e})") from None
    if isinstance(prompt, str):
        imgs = as_images(images)
        if any(isinstance(i, (list, tuple)) for i in imgs):
            raise InputError("images: a list of image lists needs a list of prompts (one per row)")
        return [(imgs, prompt)]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InputError(f"prompt must be a str or a non-empty list of str, got {type(prompt).__name__}")
    if images is None:
        images = [None] * len(prompt)
    if not isinstance(images, (list, tuple)) or len(images) != len(prompt):
        raise InputError(f"images: a batch of {len(prompt)} prompts needs a list of {len(prompt)} image lists")
    rows = []
    for i, (im, p) in enumerate(zip(images, prompt)):
        if not isinstance(p, str):
            raise InputError(f"prompt[{i}] must be a str, got {type(p).__name__}")
        rows.append((as_images(im), p))
    return rows


def is_one_row(prompt_token_ids) -> bool:
    """One prompt of token ids (a non-empty flat list / 1-D array of ints), not a batch of them."""
    if isinstance(prompt_token_ids, np.ndarray):
        return prompt_token_ids.ndim == 1 and prompt_token_ids.size > 0 and prompt_token_ids.dtype.kind in "iu"
    return isinstance(prompt_token_ids, (list, tuple)) and bool(prompt_token_ids) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt_token_ids)


def normalize_token_requests(images, prompt_token_ids) -> list[tuple[list, list[int]]]:
    """(images, prompt_token_ids) -> [(images of the row, ids of the row)]; images in the same
    forms as with text prompts (one row: its images; a batch: one image list per row)."""
    if is_one_row(prompt_token_ids):
        rows, prompts = [prompt_token_ids], ""
    else:
        rows = list(prompt_token_ids) if isinstance(prompt_token_ids, (list, tuple, np.ndarray)) else []
        if not rows or not all(is_one_row(r) for r in rows):
            raise InputError("prompt_token_ids must be a non-empty list of token ids (one prompt) or a list of such "
                             f"lists (a batch), got {prompt_token_ids!r:.80}")
        prompts = [""] * len(rows)
    images_per_row = [imgs for imgs, _ in normalize_requests(images, prompts)]
    return [(imgs, [int(t) for t in r]) for imgs, r in zip(images_per_row, rows)]


class VLMProcessor:
    """Shared flow; a family overrides `image_text`, `image_inputs` and `expand`."""

    def __init__(self, folder: str | os.PathLike, tokenizer: Tokenizer | None = None, image_processor=None):
        self.folder = os.fspath(folder)
        # None for a model with its own tokenization (no tokenizer files): prompts are then token ids
        self.tokenizer = tokenizer or Tokenizer.from_folder_if_any(self.folder)
        self.chat_template = find_chat_template(self.folder)
        self.image_processor = image_processor

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Stop tokens: the tokenizer's EOS ids, or generation_config.json's without a tokenizer."""
        if self.tokenizer is not None:
            return self.tokenizer.eos_token_ids
        return tuple(generation_eos_ids(self.folder))

    # --- family hooks ---------------------------------------------------------------------
    image_text = IMAGE_PLACEHOLDER  # what one image becomes in the text before tokenizing
    image_token = IMAGE_PLACEHOLDER  # the token whose id marks an image in the ids
    mm_kwargs_accepted: tuple[str, ...] = ()  # per-request image settings (vLLM's mm_processor_kwargs)

    def image_inputs(self, images: list, **mm_kwargs) -> tuple[dict, list[int]]:
        """Images of the whole batch -> (arrays, tokens each image expands to). mm_kwargs: the
        caller's per-request image settings (mm_processor_kwargs); a family that takes none
        refuses them with check_mm_kwargs."""
        raise NotImplementedError

    def check_mm_kwargs(self, mm_kwargs: dict, accepted: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(mm_kwargs) - set(accepted))
        if unknown:
            raise InputError(f"mm_processor_kwargs: {', '.join(unknown)} not accepted by this model's processor"
                             + (f" (it takes {', '.join(accepted)})" if accepted else " (it takes none)"))

    @property
    def image_token_id(self) -> int | None:
        """The id that marks an image in the ids (a family whose config names it overrides this)."""
        return None if self.tokenizer is None else self.tokenizer.token_to_id(self.image_token)

    @property
    def image_marker_ids(self) -> list[int]:
        """What one image is in token ids before expansion: put first in a prompt of ids that marks none."""
        return [self.image_token_id]

    def expand(self, ids: list[int], counts: list[int]) -> list[int]:
        """Replace the k-th image token of the row by counts[k] copies of it."""
        tid = self.image_token_id
        out, k = [], 0
        for t in ids:
            if t == tid:
                out.extend([tid] * counts[k])
                k += 1
            else:
                out.append(t)
        return out

    # --- the flow --------------------------------------------------------------------------
    def format_prompt(self, prompt: str, n_images: int, use_template: bool) -> str:
        n_marks = prompt.count(IMAGE_PLACEHOLDER)
        if n_marks and n_marks != n_images:
            raise InputError(f"prompt has {n_marks} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s) "
                             "were given")
        if use_template:
            messages = prompt_to_messages(prompt, n_images)
            tok = self.tokenizer
            return render_chat_template(self.chat_template, messages, add_generation_prompt=True,
                                        bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        if not n_marks:
            prompt = (IMAGE_PLACEHOLDER + "\n") * n_images + prompt
        return prompt.replace(IMAGE_PLACEHOLDER, self.image_text)

    def __call__(self, images=None, prompt: str | Sequence[str] = "", *, chat_template: bool | None = None,
                 mm_processor_kwargs: dict | None = None, prompt_token_ids=None) -> dict:
        """prompt (text) or prompt_token_ids (ids of a model's own tokenization; no chat template)."""
        mm_kwargs = dict(mm_processor_kwargs or {})
        self.check_mm_kwargs(mm_kwargs, self.mm_kwargs_accepted)
        if prompt_token_ids is not None:
            if chat_template:
                raise InputError("chat_template=True applies to text prompts; prompt_token_ids are used as given")
            rows = normalize_token_requests(images, prompt_token_ids)
        else:
            if self.tokenizer is None:
                raise InputError(f"{self.folder} has no tokenizer files (tokenizer.json ...), so a text prompt cannot "
                                 "be tokenized: pass prompt_token_ids=[...] (your model's own token ids; one list, "
                                 "or one per row) instead")
            rows = normalize_requests(images, prompt)
            if chat_template and self.chat_template is None:
                raise InputError(f"chat_template=True but {self.folder} has no chat template")
        use_template = self.chat_template is not None and chat_template is not False
        all_images = [im for imgs, _ in rows for im in imgs]
        arrays, counts = self.image_inputs(all_images, **mm_kwargs) if all_images else ({}, [])
        tid = self.image_token_id
        seqs, k = [], 0
        for r, (imgs, p) in enumerate(rows):
            if isinstance(p, str):
                ids = self.tokenizer.encode(self.format_prompt(p, len(imgs), use_template))
                what = f"image token(s) {self.image_token!r} after formatting"
            else:
                if imgs and tid is None:
                    raise InputError(f"{self.folder}: images with prompt_token_ids need the image token's id, and "
                                     "neither a tokenizer nor the config gives it")
                ids = p if tid in p or not imgs else self.image_marker_ids * len(imgs) + p  # images first
                what = f"image token id(s) {tid}"
            found = sum(1 for t in ids if t == tid)
            if found != len(imgs):
                raise InputError(f"prompt {r}: {found} {what}, but {len(imgs)} image(s) were given")
            ids = self.expand(ids, counts[k:k + len(imgs)])
            k += len(imgs)
            if not ids:
                raise InputError(f"prompt {r}: empty after tokenization (nothing to condition on)")
            seqs.append(ids)
        T = max(len(s) for s in seqs)
        pad = (self.tokenizer.pad_token_id if self.tokenizer is not None else None) or 0
        input_ids = np.full((len(seqs), T), pad, np.int32)
        mask = np.zeros((len(seqs), T), np.int32)
        for r, s in enumerate(seqs):
            input_ids[r, :len(s)] = s
            mask[r, :len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, **arrays}
