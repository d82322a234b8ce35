"""LLaVA-1.5: CLIP ViT -> 2-layer MLP projector -> Llama decoder; image features replace the
`<image>` token embeddings in order.

Axis legend: B batch rows, I images, T tokens, P patches per image, D decoder dim,
Dv vision dim, V vocab.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.config import ClipVisionConfig, ConfigBase, LlamaConfig
from mmjax.decoders.llama import LlamaDecoder
from mmjax.errors import InputError
from mmjax.models.base import merge_at_tokens, param_shapes, prefill_logits
from mmjax.projectors.mlp import MLPProjector
from mmjax.registry import Family, register
from mmjax.sharding.rules import block_rules
from mmjax.vision.clip import ClipVision

__all__ = ["LlavaConfig", "Llava", "FAMILY"]


@dataclasses.dataclass(frozen=True)
class LlavaConfig(ConfigBase):
    vision: ClipVisionConfig
    text: LlamaConfig
    image_token_id: int
    vision_feature_layer: tuple[int, ...] = (-2,)  # one or several hidden-state indices
    vision_feature_select_strategy: str = "default"  # default: drop the class token; full: keep
    projector_act: str = "gelu"
    projector_bias: bool = True

    @classmethod
    def from_hf(cls, hf: dict) -> "LlavaConfig":
        v, t = hf["vision_config"], hf["text_config"]
        if v.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"llava: vision tower {v.get('model_type')!r} is not supported (clip_vision_model)")
        if t.get("model_type", "llama") != "llama":
            raise ValueError(f"llava: text model {t.get('model_type')!r} is not supported (llama)")
        layer = hf.get("vision_feature_layer", -2)
        strategy = hf.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not default or full")
        tie = hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        return cls(
            vision=ClipVisionConfig.from_hf(v),
            text=LlamaConfig.from_hf(t, tie_word_embeddings=tie),
            image_token_id=hf.get("image_token_index", hf.get("image_token_id")),
            vision_feature_layer=tuple(layer) if isinstance(layer, (list, tuple)) else (int(layer),),
            vision_feature_select_strategy=strategy,
            projector_act=hf.get("projector_hidden_act", "gelu"),
            projector_bias=bool(hf.get("multimodal_projector_bias", True)),
        )

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """vision_feature_layer as non-negative indices into the L+1 hidden states."""
        n = self.vision.num_layers + 1
        out = []
        for k in self.vision_feature_layer:
            if not -n <= k < n:
                raise ValueError(f"vision_feature_layer {k} is out of range for {self.vision.num_layers} layers")
            out.append(k % n)
        return tuple(out)

    @property
    def image_seq_length(self) -> int:
        """Tokens each image expands to."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)


class Llava(nn.Module):
    cfg: LlavaConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        self.vision = ClipVision(c.vision, max(c.feature_indices), self.dtype)
        self.projector = MLPProjector(c.vision.hidden_size * len(c.feature_indices), c.text.hidden_size,
                                      c.projector_act, c.projector_bias, self.dtype, c.text.kernels)
        self.decoder = LlamaDecoder(c.text, self.dtype)

    # --- components -------------------------------------------------------------------------
    def image_features(self, pixel_values):
        """pixel_values [I, C, Hi, Wi] -> projected features [I, P, D] (HF get_image_features)."""
        hidden = self.vision(pixel_values)
        sel = [hidden[k] for k in self.cfg.feature_indices]
        if self.cfg.vision_feature_select_strategy == "default":
            sel = [h[:, 1:] for h in sel]
        feats = jnp.concatenate(sel, axis=-1) if len(sel) > 1 else sel[0]
        self.sow("intermediates", "vision_features", feats)
        out = self.projector(feats)
        self.sow("intermediates", "image_features", out)
        return out

    # --- the VLM protocol (mmjax.models.base) -------------------------------------------------
    def embed(self, batch):
        ids = batch["input_ids"]  # [B, T]
        x = self.decoder.embed_tokens(ids)  # [B, T, D]
        if batch.get("pixel_values") is not None:
            feats = self.image_features(batch["pixel_values"])  # [I, P, D]
            x = merge_at_tokens(x, feats.reshape(-1, feats.shape[-1]), ids == self.cfg.image_token_id)
        B, T = ids.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return x, positions, jnp.zeros((B,), jnp.int32)

    def embed_tokens(self, ids):
        return self.decoder.embed_tokens(ids)

    def decode(self, x, positions, mask, cache=None, write_index=None):
        return self.decoder(x, positions, mask, cache, write_index)

    def logits(self, h):
        return self.decoder.logits(h)

    def __call__(self, batch):
        return prefill_logits(self, batch)

    def example_batch(self):
        c = self.cfg
        n = c.image_seq_length
        ids = np.zeros((1, n + 2), np.int32)
        ids[0, 1:n + 1] = c.image_token_id
        px = np.zeros((1, c.vision.num_channels, c.vision.image_size, c.vision.image_size), np.float32)
        return {"input_ids": ids, "pixel_values": px}

    def param_shapes(self):
        return param_shapes(self)

    def cache_shape(self):
        t = self.cfg.text
        return t.num_layers, t.num_kv_heads, t.head_dim


def check_image_tokens(input_ids, n_images: int, per_image: int, image_token_id: int) -> None:
    """Host-side: the image-token count must equal the features the images produce."""
    found = int((np.asarray(input_ids) == image_token_id).sum())
    if found != n_images * per_image:
        raise InputError(f"input_ids hold {found} image tokens (id {image_token_id}) but {n_images} image(s) give "
                         f"{n_images * per_image} features ({per_image} each)")


def _check_inputs(cfg: LlavaConfig, batch) -> None:
    px = batch.get("pixel_values")
    check_image_tokens(batch["input_ids"], 0 if px is None else px.shape[0], cfg.image_seq_length,
                       cfg.image_token_id)


def _rules(cfg):
    from converters.families.llava import llava_rules

    return llava_rules(cfg)


def _processor(folder, cfg):
    from mmjax.preprocess.processor import LlavaProcessor

    return LlavaProcessor(folder, cfg)


def _sharding(cfg: LlavaConfig) -> list:
    """Param path regex -> axes in the legend (mmjax.sharding.rules maps letters to mesh axes).

    Decoder: Megatron split (q/k/v, gate/up by heads / F columns; o, down by rows: two
    all-reduces per layer), embedding and lm_head over V. The vision tower is split the same
    way (measured against replicated: docs/sharding.md); the projector, norms, patch and
    position embeddings are small and replicated."""
    return [
        (r"decoder/embed/embedding", "VD"),
        (r"decoder/lm_head/kernel", "DV"),
        *block_rules(r"decoder/layers_\d+"),
        *block_rules(r"vision/layers_\d+", kv="N"),  # CLIP has no GQA: k/v have N heads too
        (r".*", None),
    ]


FAMILY = register(Family(
    name="llava",
    config_from_hf=LlavaConfig.from_hf,
    config_cls=LlavaConfig,
    build=lambda cfg, dtype=jnp.float32: Llava(cfg, dtype),
    rules=_rules,
    processor=_processor,
    check_inputs=_check_inputs,
    sharding=_sharding,
))
