"""CLIPModel checkpoint layout -> mmjax.models.clip param tree.

    vision_model.*                  -> vision/* (all layers) + vision_post_norm
    text_model.*                    -> text/*
    visual_projection, text_projection (no bias) -> */kernel;  logit_scale [] -> logit_scale
"""
from __future__ import annotations

from converters.families.llava import clip_vision_rules
from converters.rules import Rule
from converters.transforms import (bias_to_heads, embedding, heads_to_linear_out, identity, linear_to_heads,
                                   norm_scale, transpose_linear)

__all__ = ["clip_text_rules", "clip_rules"]


def _layernorm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/scale", norm_scale), Rule(f"{src}.bias", f"{dst}/bias", identity)]


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", transpose_linear), Rule(f"{src}.bias", f"{dst}/bias", identity)]


def clip_text_rules(p: str, dst: str) -> list[Rule]:
    """CLIP text tower under prefix p (e.g. 'text_model') -> dst (mmjax.text.clip_text.ClipText)."""
    L, T = f"{p}.encoder.layers.{{i}}", f"{dst}/layers_{{i}}"
    return [
        Rule(f"{p}.embeddings.token_embedding.weight", f"{dst}/token_embed/embedding", embedding),
        Rule(f"{p}.embeddings.position_embedding.weight", f"{dst}/pos_embedding/embedding", embedding),
        Rule(f"{p}.embeddings.position_ids", None),  # arange buffer older exports keep; recomputed
        *_layernorm(f"{p}.final_layer_norm", f"{dst}/final_norm"),
        *_layernorm(f"{L}.layer_norm1", f"{T}/norm1"),
        *_layernorm(f"{L}.layer_norm2", f"{T}/norm2"),
        *[Rule(f"{L}.self_attn.{q}_proj.weight", f"{T}/attn/{q}/kernel", linear_to_heads) for q in "qkv"],
        *[Rule(f"{L}.self_attn.{q}_proj.bias", f"{T}/attn/{q}/bias", bias_to_heads) for q in "qkv"],
        Rule(f"{L}.self_attn.out_proj.weight", f"{T}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{L}.self_attn.out_proj.bias", f"{T}/attn/o/bias", identity),
        *_linear(f"{L}.mlp.fc1", f"{T}/mlp/fc1"),
        *_linear(f"{L}.mlp.fc2", f"{T}/mlp/fc2"),
    ]


def clip_rules(cfg) -> list[Rule]:
    n = cfg.vision.num_layers
    # LLaVA's vision rules drop post_layernorm (its features skip it); CLIPModel pools through it.
    vision = [r for r in clip_vision_rules("vision_model", "vision", n, n) if ".post_layernorm." not in r.sources[0]]
    return [
        *vision,
        *_layernorm("vision_model.post_layernorm", "vision_post_norm"),
        *clip_text_rules("text_model", "text"),
        Rule("visual_projection.weight", "visual_projection/kernel", transpose_linear),
        Rule("text_projection.weight", "text_projection/kernel", transpose_linear),
        Rule("logit_scale", "logit_scale", identity),
    ]
