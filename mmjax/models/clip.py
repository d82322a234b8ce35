"""CLIPModel: a ViT image tower and a causal text tower, each pooled and projected into one
embedding space; logits are scaled cosine similarities. An encoder family: run it with
mmjax.encode (it has no decoder, so no mmjax.generate).

    model = mmjax.load("clip-flax/")
    out = mmjax.encode(model, input_ids=ids, attention_mask=mask, pixel_values=px)
    out["logits_per_image"]  # [I, B]; also logits_per_text [B, I], text_embeds [B, E], image_embeds [I, E]

Axis legend: B texts, I images, T tokens, D tower width (Dv vision, Dt text), E projection dim,
C channels.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.config import ClipVisionConfig, ConfigBase
from mmjax.layers.linear import Einsum
from mmjax.layers.norms import LayerNorm
from mmjax.models.base import param_shapes
from mmjax.text.clip_text import ClipText, ClipTextConfig
from mmjax.vision.clip import ClipVision

__all__ = ["ClipConfig", "Clip"]


@dataclasses.dataclass(frozen=True)
class ClipConfig(ConfigBase):
    vision: ClipVisionConfig
    text: ClipTextConfig
    projection_dim: int = 512  # E

    @classmethod
    def from_hf(cls, hf: dict) -> "ClipConfig":
        return cls(vision=ClipVisionConfig.from_hf(hf["vision_config"]),
                   text=ClipTextConfig.from_hf(hf["text_config"]),
                   projection_dim=hf.get("projection_dim", 512))


def l2_normalize(x):  # [..., E]
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class Clip(nn.Module):
    cfg: ClipConfig
    dtype: jnp.dtype = jnp.float32

    # What `encode` may pass: arrays (by HF name) and static options of __call__.
    encoder_inputs = ("input_ids", "attention_mask", "pixel_values")
    encoder_options = ("normalize",)

    def setup(self):
        c = self.cfg
        E = c.projection_dim
        self.vision = ClipVision(c.vision, c.vision.num_layers, self.dtype)
        # HF's vision post_layernorm acts on the pooled class token only. ClipVision does not
        # own it: LLaVA reads raw hidden states, which never pass through it.
        self.vision_post_norm = LayerNorm(c.vision.layer_norm_eps, self.dtype)
        self.text = ClipText(c.text, self.dtype)
        self.visual_projection = Einsum((c.vision.hidden_size, E), "ID,DE->IE", None, self.dtype,
                                        kernels=c.vision.kernels)
        self.text_projection = Einsum((c.text.hidden_size, E), "BD,DE->BE", None, self.dtype, kernels=c.text.kernels)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.dtype)

    def image_embeds(self, pixel_values, normalize: bool = True):
        """pixel_values [I, C, Hi, Wi] -> [I, E]; normalize=False is HF get_image_features."""
        hidden = self.vision(pixel_values)[-1]  # [I, P+1, Dv]
        e = self.visual_projection(self.vision_post_norm(hidden[:, 0]))
        return l2_normalize(e) if normalize else e

    def text_embeds(self, input_ids, attention_mask=None, normalize: bool = True):
        """input_ids [B, T] -> [B, E]; normalize=False is HF get_text_features."""
        _, pooled = self.text(input_ids, attention_mask)
        e = self.text_projection(pooled)
        return l2_normalize(e) if normalize else e

    def __call__(self, batch, normalize: bool = True):
        """Either tower or both: text_embeds [B, E] if input_ids, image_embeds [I, E] if
        pixel_values, and with both logits_per_text [B, I] and logits_per_image [I, B]."""
        out = {}
        if batch.get("pixel_values") is not None:
            out["image_embeds"] = self.image_embeds(batch["pixel_values"], normalize)
        if batch.get("input_ids") is not None:
            out["text_embeds"] = self.text_embeds(batch["input_ids"], batch.get("attention_mask"), normalize)
        if len(out) == 2:
            img, txt = out["image_embeds"], out["text_embeds"]
            if not normalize:
                img, txt = l2_normalize(img), l2_normalize(txt)
            logits = jnp.exp(self.logit_scale) * jnp.einsum("BE,IE->BI", txt, img)
            out["logits_per_text"], out["logits_per_image"] = logits, logits.T
        return out

    def example_batch(self):
        v = self.cfg.vision
        return {"input_ids": np.zeros((1, 2), np.int32),
                "pixel_values": np.zeros((1, v.num_channels, v.image_size, v.image_size), np.float32)}

    def param_shapes(self):
        return param_shapes(self)
