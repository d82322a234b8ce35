"""BertModel (bidirectional text encoder and pooler): an encoder family, run with mmjax.encode."""
from __future__ import annotations

import jax.numpy as jnp

from mmjax.models.bert import BertModel
from mmjax.preprocess.encoder import prepare_bert
from mmjax.registry import Family, register
from mmjax.text.bert import BertConfig

__all__ = ["FAMILY"]

FAMILY = register(Family(
    name="bert",
    config_from_hf=BertConfig.from_hf,
    config_cls=BertConfig,
    build=lambda cfg, dtype=jnp.float32: BertModel(cfg, dtype),
    processor=None,  # encoders take HF-tokenized arrays (see docs/text_encoders.md)
    prepare=prepare_bert,
))
