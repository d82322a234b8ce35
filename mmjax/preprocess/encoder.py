"""Host side of the encoder families (clip, bert): their prepare step checks HF-tokenized arrays
(they have no processor; see docs/text_encoders.md)."""
from __future__ import annotations

import numpy as np

from mmjax.errors import InputError

__all__ = ["check_token_inputs", "prepare_clip", "prepare_bert"]


def check_token_inputs(batch, vocab_size: int, max_positions: int, type_vocab_size: int | None = None) -> None:
    """Shapes agree and ids are in range (jnp.take would clamp them silently)."""
    if "input_ids" not in batch:
        if any(k in batch for k in ("attention_mask", "token_type_ids")):
            raise InputError("attention_mask / token_type_ids given without input_ids")
        return
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise InputError(f"input_ids: expected [B, T], got shape {ids.shape}")
    if ids.shape[1] > max_positions:
        raise InputError(f"input_ids: {ids.shape[1]} tokens exceed max_position_embeddings={max_positions}")
    ranges = {"input_ids": vocab_size, "attention_mask": 2, "token_type_ids": type_vocab_size}
    for name, hi in ranges.items():
        if name not in batch:
            continue
        a = np.asarray(batch[name])
        if a.shape != ids.shape:
            raise InputError(f"{name}: expected shape {ids.shape} (as input_ids), got {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= hi):
            raise InputError(f"{name}: values must lie in [0, {hi}), got {a.min()}..{a.max()}")


def prepare_clip(cfg, batch, buckets=None, rows=None, tokens=None) -> dict:
    check_token_inputs(batch, cfg.text.vocab_size, cfg.text.max_position_embeddings)
    px = batch.get("pixel_values")
    v = cfg.vision
    want = (v.num_channels, v.image_size, v.image_size)
    if px is not None and (np.ndim(px) != 4 or tuple(np.shape(px)[1:]) != want):
        raise InputError(f"pixel_values: expected [I, {', '.join(map(str, want))}], got shape {np.shape(px)}")
    return {}


def prepare_bert(cfg, batch, buckets=None, rows=None, tokens=None) -> dict:
    check_token_inputs(batch, cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size)
    return {}
