"""CLIP text transformer: token + learned position embeddings, causal pre-LN blocks
(quick_gelu MLP), final LayerNorm, pooled at the EOS token.

Axis legend: B batch, T tokens, D model dim, F MLP hidden, N heads, H head dim, V vocab,
P positions (max_position_embeddings).

Param tree: token_embed/embedding [V, D]; pos_embedding/embedding [P, D];
layers_{i}/{norm1, attn/{q,k,v,o}, norm2, mlp/{fc1,fc2}}; final_norm.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import ConfigBase
from mmjax.errors import InputError
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.linear import Embed
from mmjax.layers.norms import LayerNorm
from mmjax.text.bert import padding_mask
from mmjax.vision.clip import ClipVisionBlock

__all__ = ["ClipTextConfig", "ClipText", "eos_positions"]

LEGACY_EOS_ID = 2  # see eos_positions


@dataclasses.dataclass(frozen=True)
class ClipTextConfig(ConfigBase):
    # The field names the vision block reads (hidden_size ... kernels) match
    # ClipVisionConfig's, so the text tower reuses ClipVisionBlock as is.
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    max_position_embeddings: int = 77  # P
    eos_token_id: int = 49407  # HF CLIPTextConfig's default
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    kernels: KernelPolicy = KernelPolicy()  # mmjax/kernels/policy.py

    @classmethod
    def from_hf(cls, t: dict) -> "ClipTextConfig":
        eos = t.get("eos_token_id", 49407)
        if not isinstance(eos, int) or isinstance(eos, bool):
            raise ValueError(f"clip text: eos_token_id {eos!r} must be one integer")
        return cls(
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_layers=t["num_hidden_layers"],
            num_heads=t["num_attention_heads"],
            max_position_embeddings=t.get("max_position_embeddings", 77),
            eos_token_id=eos,
            layer_norm_eps=t.get("layer_norm_eps", 1e-5),
            hidden_act=t.get("hidden_act", "quick_gelu"),
        )


def eos_positions(input_ids, eos_token_id: int):
    """input_ids [B, T] -> [B] int index of the token each row is pooled at, as HF picks it.

    Checkpoints saved before transformers PR #24773 carry eos_token_id=2, and for them HF keeps
    the original rule: the EOS is the highest id in the row (OpenAI's vocab puts it last).
    Otherwise it is the first token equal to eos_token_id (pad may equal eos, so not the last);
    a row without one gets index 0, as HF's argmax of an all-False row does."""
    if eos_token_id == LEGACY_EOS_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class ClipText(nn.Module):
    cfg: ClipTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """input_ids [B, T], attention_mask [B, T] or None -> (last_hidden_state [B, T, D]
        after the final norm, pooled [B, D] at each row's EOS)."""
        c = self.cfg
        B, T = input_ids.shape
        if T > c.max_position_embeddings:
            raise InputError(f"input_ids: {T} tokens exceed max_position_embeddings={c.max_position_embeddings}")
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="token_embed")(input_ids)
        pos = Embed(c.max_position_embeddings, c.hidden_size, self.dtype, name="pos_embedding")
        # Positions are 0..T-1 whatever the padding (HF's position_ids buffer).
        x = x + pos.embedding[:T].astype(self.dtype)[None]
        mask = padding_mask(attention_mask, causal=True)
        for i in range(c.num_layers):
            x = ClipVisionBlock(c, self.dtype, name=f"layers_{i}")(x, mask)
            self.sow("intermediates", "hidden_states", x)  # a tuple, one entry per block
        x = LayerNorm(c.layer_norm_eps, self.dtype, name="final_norm")(x)
        pooled = x[jnp.arange(B), eos_positions(input_ids, c.eos_token_id)]  # [B, D]
        return x, pooled
