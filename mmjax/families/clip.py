"""CLIPModel (image and text towers, contrastive logits): an encoder family, run with mmjax.encode."""
from __future__ import annotations

import jax.numpy as jnp

from mmjax.models.clip import Clip, ClipConfig
from mmjax.preprocess.encoder import prepare_clip
from mmjax.registry import Family, register

__all__ = ["FAMILY"]

FAMILY = register(Family(
    name="clip",
    config_from_hf=ClipConfig.from_hf,
    config_cls=ClipConfig,
    build=lambda cfg, dtype=jnp.float32: Clip(cfg, dtype),
    processor=None,  # encoders take HF-tokenized arrays (see docs/text_encoders.md)
    prepare=prepare_clip,
))
