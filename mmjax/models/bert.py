"""BertModel: the bidirectional text encoder and its pooler, as the "bert" family.

    model = mmjax.load("bert-flax/")
    out = mmjax.encode(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    out["last_hidden_state"]  # [B, T, D]; out["pooler_output"] [B, D] (pool="pooler" | "cls" | "mean")

Axis legend: B batch, T tokens, D model dim.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.models.base import param_shapes
from mmjax.text.bert import Bert, BertConfig

__all__ = ["BertModel"]


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
