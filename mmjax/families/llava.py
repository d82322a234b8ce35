"""LLaVA-1.5: a composed model — CLIP vision tower (hidden states of vision_feature_layer) ->
2-layer MLP projector -> Llama decoder; image features replace the `<image>` tokens in order."""
from __future__ import annotations

from mmjax.components import MLPProjectorConfig
from mmjax.config import ClipVisionConfig, LlamaConfig
from mmjax.families.composed import composed_family
from mmjax.models.composed import ComposedConfig
from mmjax.registry import register
from mmjax.vision.clip_tower import ClipTowerConfig

__all__ = ["config_from_hf", "FAMILY"]


def config_from_hf(hf: dict) -> ComposedConfig:
    v, t = hf["vision_config"], hf["text_config"]
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"llava: vision tower {v.get('model_type')!r} is not supported (clip_vision_model)")
    if t.get("model_type", "llama") != "llama":
        raise ValueError(f"llava: text model {t.get('model_type')!r} is not supported (llama)")
    layer = hf.get("vision_feature_layer", -2)
    vision = ClipTowerConfig(tower=ClipVisionConfig.from_hf(v),
                             feature_layers=tuple(layer) if isinstance(layer, (list, tuple)) else (int(layer),),
                             select_strategy=hf.get("vision_feature_select_strategy", "default"))
    tie = hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    decoder = LlamaConfig.from_hf(t, tie_word_embeddings=tie)
    projector = MLPProjectorConfig(vision.width, decoder.hidden_size, hf.get("projector_hidden_act", "gelu"),
                                   bool(hf.get("multimodal_projector_bias", True)))
    return ComposedConfig("clip", vision, "mlp", projector, "llama", decoder, fusion="tokens",
                          image_token_id=hf.get("image_token_index", hf.get("image_token_id")))


FAMILY = register(composed_family("llava", config_from_hf))
