"""CLIPModel checkpoint layout -> the clip family's param tree (mmjax.models.clip).

    vision_model.*                  -> vision/* (all layers) + vision_post_norm
    text_model.*                    -> text/*
    visual_projection, text_projection (no bias) -> */kernel;  logit_scale [] -> logit_scale
"""
from __future__ import annotations

from converters.families.common import attention, clip_vision_rules, linear, norm
from converters.rules import Rule
from converters.transforms import embedding, identity

__all__ = ["clip_text_rules", "clip_rules"]


def clip_text_rules(p: str, dst: str) -> list[Rule]:
    """CLIP text tower under prefix p (e.g. 'text_model') -> dst (mmjax.text.clip_text.ClipText)."""
    L, T = f"{p}.encoder.layers.{{i}}", f"{dst}/layers_{{i}}"
    return [
        Rule(f"{p}.embeddings.token_embedding.weight", f"{dst}/token_embed/embedding", embedding),
        Rule(f"{p}.embeddings.position_embedding.weight", f"{dst}/pos_embedding/embedding", embedding),
        Rule(f"{p}.embeddings.position_ids", None),  # arange buffer older exports keep; recomputed
        *norm(f"{p}.final_layer_norm", f"{dst}/final_norm"),
        *norm(f"{L}.layer_norm1", f"{T}/norm1"),
        *norm(f"{L}.layer_norm2", f"{T}/norm2"),
        *attention(f"{L}.self_attn", f"{T}/attn", "out_proj", True, True),
        *linear(f"{L}.mlp.fc1", f"{T}/mlp/fc1"),
        *linear(f"{L}.mlp.fc2", f"{T}/mlp/fc2"),
    ]


def clip_rules(cfg) -> list[Rule]:
    n = cfg.vision.num_layers
    return [
        *clip_vision_rules("vision_model", "vision", n, n, post_norm="vision_post_norm"),
        *clip_text_rules("text_model", "text"),
        *linear("visual_projection", "visual_projection", bias=False),
        *linear("text_projection", "text_projection", bias=False),
        Rule("logit_scale", "logit_scale", identity),
    ]
