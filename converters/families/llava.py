"""LLaVA checkpoint layout -> mmjax.models.llava param tree.

Four key layouts are accepted (each source tensor matches exactly one of them):
  hub (llava-hf/*):      vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head
  transformers 5:        vision_tower.*,              multi_modal_projector.*, language_model.model.*, language_model.lm_head
  transformers 4.5x:     model.vision_tower.vision_model.*, model.multi_modal_projector.*, model.language_model.*, lm_head
  transformers 5 state_dict() (what torch.save of the live model writes): model.vision_tower.*, ... as 4.5x
"""
from __future__ import annotations

from converters.rules import Rule
from converters.transforms import (bias_to_heads, conv_oihw_to_hwio, embedding, heads_to_linear_out, identity,
                                   linear_to_heads, norm_scale, transpose_linear)

__all__ = ["clip_vision_rules", "llama_rules", "llava_rules"]


def _attn(src: str, dst: str, o: str, bias: bool, o_bias: bool) -> list[Rule]:
    rules = [Rule(f"{src}.{p}_proj.weight", f"{dst}/{p}/kernel", linear_to_heads) for p in "qkv"]
    rules.append(Rule(f"{src}.{o}.weight", f"{dst}/o/kernel", heads_to_linear_out))
    if bias:
        rules += [Rule(f"{src}.{p}_proj.bias", f"{dst}/{p}/bias", bias_to_heads) for p in "qkv"]
    if o_bias:
        rules.append(Rule(f"{src}.{o}.bias", f"{dst}/o/bias", identity))
    return rules


def _linear(src: str, dst: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", transpose_linear)]
    return rules + ([Rule(f"{src}.bias", f"{dst}/bias", identity)] if bias else [])


def _layernorm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/scale", norm_scale), Rule(f"{src}.bias", f"{dst}/bias", identity)]


def clip_vision_rules(p: str, dst: str, num_layers: int, layers_used: int) -> list[Rule]:
    """CLIP vision tower under prefix p (e.g. 'vision_tower.vision_model') -> dst."""
    rules = [
        Rule(f"{p}.embeddings.patch_embedding.weight", f"{dst}/patch_embed", conv_oihw_to_hwio),
        Rule(f"{p}.embeddings.class_embedding", f"{dst}/class_embedding", identity),
        Rule(f"{p}.embeddings.position_embedding.weight", f"{dst}/pos_embedding/embedding", embedding),
        Rule(f"{p}.embeddings.position_ids", None),  # a buffer some exports keep
        *_layernorm(f"{p}.pre_layrnorm", f"{dst}/pre_norm"),  # sic: CLIP's own spelling
        # LLaVA reads hidden states, which never pass through the post-norm.
        Rule(f"{p}.post_layernorm.weight", None),
        Rule(f"{p}.post_layernorm.bias", None),
    ]
    # Layer indices are explicit (not {i}) because blocks past the deepest feature layer
    # cannot change the features: they are not built, and their tensors are dropped.
    for j in range(layers_used):
        L, T = f"{p}.encoder.layers.{j}", f"{dst}/layers_{j}"
        rules += [
            *_layernorm(f"{L}.layer_norm1", f"{T}/norm1"),
            *_layernorm(f"{L}.layer_norm2", f"{T}/norm2"),
            *_attn(f"{L}.self_attn", f"{T}/attn", "out_proj", True, True),
            *_linear(f"{L}.mlp.fc1", f"{T}/mlp/fc1", True),
            *_linear(f"{L}.mlp.fc2", f"{T}/mlp/fc2", True),
        ]
    rules += [Rule(f"{p}.encoder.layers.{j}.*", None) for j in range(layers_used, num_layers)]
    return rules


def llama_rules(p: str, head: str | None, dst: str, cfg) -> list[Rule]:
    """Llama decoder under prefix p (e.g. 'language_model.model'); head = lm_head tensor prefix."""
    L, T = f"{p}.layers.{{i}}", f"{dst}/layers_{{i}}"
    rules = [
        Rule(f"{p}.embed_tokens.weight", f"{dst}/embed/embedding", embedding),
        Rule(f"{p}.norm.weight", f"{dst}/final_norm/scale", norm_scale),
        Rule(f"{L}.input_layernorm.weight", f"{T}/input_norm/scale", norm_scale),
        Rule(f"{L}.post_attention_layernorm.weight", f"{T}/post_norm/scale", norm_scale),
        Rule(f"{L}.self_attn.rotary_emb.inv_freq", None),  # recomputed from the config
        *_attn(f"{L}.self_attn", f"{T}/attn", "o_proj", cfg.qkv_bias, cfg.o_bias),
        *[r for m in ("gate", "up", "down") for r in _linear(f"{L}.mlp.{m}_proj", f"{T}/mlp/{m}", cfg.mlp_bias)],
    ]
    if head is not None:
        # Tied heads reuse the embedding; an exported copy of the tied weight is dropped.
        rules.append(Rule(f"{head}.weight", None if cfg.tie_word_embeddings else f"{dst}/lm_head/kernel",
                          identity if cfg.tie_word_embeddings else transpose_linear))
    return rules


# Each layout's prefixes; the layouts share some, so each list holds distinct prefixes only.
_VISION = ("vision_tower.vision_model", "vision_tower", "model.vision_tower.vision_model", "model.vision_tower")
_PROJECTOR = ("multi_modal_projector", "model.multi_modal_projector")
_DECODER = (("language_model.model", "language_model.lm_head"), ("model.language_model", "lm_head"))


def llava_rules(cfg) -> list[Rule]:
    used = max(cfg.feature_indices)
    rules: list[Rule] = []
    for vis in _VISION:
        rules += clip_vision_rules(vis, "vision", cfg.vision.num_layers, used)
    for proj in _PROJECTOR:
        rules += _linear(f"{proj}.linear_1", "projector/mlp/fc1", cfg.projector_bias)
        rules += _linear(f"{proj}.linear_2", "projector/mlp/fc2", cfg.projector_bias)
    for dec, head in _DECODER:
        rules += llama_rules(dec, head, "decoder", cfg.text)
    return rules
