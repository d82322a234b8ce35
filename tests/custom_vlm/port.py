"""The mmjax port of AcmeVLM: its config.json -> a composed model, plus the Family that names it.

Everything else (conversion, loading, KV-cache generation, bucketing, sharding rules,
preprocessing) comes with the Family. The tensor-name rules live in rules.py beside this file,
and are registered for the converter here.
"""
from converters.families import register_rules
from mmjax.families.composed import composed_family
from mmjax.models.composed import ComposedConfig
from mmjax.registry import register


def config_from_acme(c: dict) -> ComposedConfig:
    """AcmeVLM's config.json (its own keys) -> the mmjax description of the same network."""
    head_dim = c["d_model"] // c["n_head"]
    return ComposedConfig.from_spec({
        "vision": {"type": "vit", "hidden_size": c["vis_width"], "intermediate_size": c["vis_mlp"],
                   "num_layers": c["vis_depth"], "num_heads": c["vis_heads"], "image_size": c["image_size"],
                   "patch_size": c["patch"], "class_token": True, "position": "learned", "final_norm": True,
                   "norm_eps": 1e-6, "hidden_act": "gelu"},
        "projector": {"type": "resampler", "dim": c["vis_width"], "num_queries": c["n_latents"],
                      "num_layers": c["rs_depth"], "num_heads": c["rs_heads"], "head_dim": c["rs_head_dim"],
                      "intermediate_size": c["rs_ffn"], "gated_mlp": True, "hidden_act": "silu"},
        "decoder": {"type": "neox", "vocab_size": c["vocab"], "hidden_size": c["d_model"],
                    "intermediate_size": c["d_ff"], "num_layers": c["n_layer"], "num_heads": c["n_head"],
                    "rope": {"theta": c["rotary_base"], "partial_rotary_factor": c["rotary_dim"] / head_dim},
                    "max_position_embeddings": c["max_seq"], "parallel_residual": True,
                    "hidden_act": "gelu_pytorch_tanh"},
        "fusion": "prefix",
        "prefix_attention": "bidirectional",
        "image_token_id": c["image_token_id"],
    })


def acme_rules(cfg):
    from tests.custom_vlm.rules import RULES

    return RULES(cfg)


FAMILY = register(composed_family("acme_vlm", config_from_acme))
register_rules("acme_vlm", acme_rules)
