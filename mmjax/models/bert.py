"""BertModel: the bidirectional text encoder and its pooler, as the "bert" family.

    model = mmjax.load("bert-flax/")
    out = encode(model, input_ids=ids, attention_mask=mask, token_type_ids=types)  # mmjax.models.clip.encode
    out["last_hidden_state"]  # [B, T, D]; out["pooler_output"] [B, D] (pool="pooler" | "cls" | "mean")

Axis legend: B batch, T tokens, D model dim.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.models.base import param_shapes
from mmjax.models.clip import check_token_inputs
from mmjax.registry import Family, register
from mmjax.text.bert import Bert, BertConfig

__all__ = ["BertModel", "FAMILY"]


class BertModel(nn.Module):
    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    encoder_inputs = ("input_ids", "attention_mask", "token_type_ids")
    encoder_options = ("pool",)

    @nn.compact
    def __call__(self, batch, pool: str | None = None):
        """batch: input_ids [B, T] (+ attention_mask, token_type_ids [B, T]) ->
        {"last_hidden_state": [B, T, D], "pooler_output": [B, D]}; pool: see mmjax.text.bert.POOLS
        (None = HF's pooler, or the raw [CLS] state for checkpoints without one)."""
        h, pooled = Bert(self.cfg, self.dtype, name="encoder")(
            batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), pool)
        return {"last_hidden_state": h, "pooler_output": pooled}

    def example_batch(self):
        return {"input_ids": np.zeros((1, 2), np.int32)}

    def param_shapes(self):
        return param_shapes(self)


def _check_inputs(cfg: BertConfig, batch) -> None:
    check_token_inputs(batch, cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size)


def _rules(cfg):
    from converters.families.bert import bert_rules

    return bert_rules(cfg)


FAMILY = register(Family(
    name="bert",
    config_from_hf=BertConfig.from_hf,
    config_cls=BertConfig,
    build=lambda cfg, dtype=jnp.float32: BertModel(cfg, dtype),
    rules=_rules,
    processor=None,  # encoders take HF-tokenized arrays (see docs/text_encoders.md)
    check_inputs=_check_inputs,
))
