"""From (images, prompt) to model inputs, the same way for every family.

  prompt --(chat template, optional)--> text with one image marker per image
         --(tokenizer)--> ids --(family.expand)--> ids with each image's token run
  images --(family image processor)--> pixel_values (+ family extras, e.g. image_grid_thw)

Users write "<image>" where an image goes, for every family. A prompt without "<image>" but
with images gets the images first. The output uses HF's names and layouts, right-padded.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mmjax.errors import InputError
from mmjax.preprocess.chat import find_chat_template, prompt_to_messages, render_chat_template
from mmjax.preprocess.tokenizer import Tokenizer

__all__ = ["IMAGE_PLACEHOLDER", "VLMProcessor", "normalize_requests"]

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


class VLMProcessor:
    """Shared flow; a family overrides `image_text`, `image_inputs` and `expand`."""

    def __init__(self, folder: str | os.PathLike, tokenizer: Tokenizer | None = None, image_processor=None):
        self.folder = os.fspath(folder)
        self.tokenizer = tokenizer or Tokenizer.from_folder(self.folder)
        self.chat_template = find_chat_template(self.folder)
        self.image_processor = image_processor

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

    def expand(self, ids: list[int], counts: list[int]) -> list[int]:
        """Replace the k-th image token of the row by counts[k] copies of it."""
        tid = self.tokenizer.token_to_id(self.image_token)
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
                 mm_processor_kwargs: dict | None = None) -> dict:
        rows = normalize_requests(images, prompt)
        mm_kwargs = dict(mm_processor_kwargs or {})
        self.check_mm_kwargs(mm_kwargs, self.mm_kwargs_accepted)
        if chat_template and self.chat_template is None:
            raise InputError(f"chat_template=True but {self.folder} has no chat template")
        use_template = self.chat_template is not None and chat_template is not False
        all_images = [im for imgs, _ in rows for im in imgs]
        arrays, counts = self.image_inputs(all_images, **mm_kwargs) if all_images else ({}, [])
        tid = self.tokenizer.token_to_id(self.image_token)
        seqs, k = [], 0
        for r, (imgs, p) in enumerate(rows):
            text = self.format_prompt(p, len(imgs), use_template)
            ids = self.tokenizer.encode(text)
            found = sum(1 for t in ids if t == tid)
            if found != len(imgs):
                raise InputError(f"prompt {r}: {found} image token(s) {self.image_token!r} after formatting, "
                                 f"but {len(imgs)} image(s) were given")
            ids = self.expand(ids, counts[k:k + len(imgs)])
            k += len(imgs)
            if not ids:
                raise InputError(f"prompt {r}: empty after tokenization (nothing to condition on)")
            seqs.append(ids)
        T = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(seqs), T), pad, np.int32)
        mask = np.zeros((len(seqs), T), np.int32)
        for r, s in enumerate(seqs):
            input_ids[r, :len(s)] = s
            mask[r, :len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, **arrays}
