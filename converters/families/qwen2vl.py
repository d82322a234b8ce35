"""Qwen2-VL / Qwen2.5-VL checkpoint layout -> the qwen2_vl family's param tree (mmjax.families.qwen2vl).

Two key layouts are accepted (each source tensor matches exactly one of them):
  hub and transformers 5 save_pretrained:  visual.*,       model.layers.*,                lm_head
  transformers 4.5x save_pretrained:       model.visual.*, model.language_model.layers.*, lm_head

The vision attention's fused `qkv` ([3 * N * H, D] rows ordered (q|k|v, head, dim), as HF's
reshape(seq, 3, heads, -1) reads it) is split here into per-head q/k/v kernels, so the model
uses the same [D, N, H] projection layout as every other attention in mmjax.
"""
from __future__ import annotations

from converters.families.common import linear, llama_rules, norm
from converters.rules import Rule
from converters.transforms import (bias_to_heads, compose, conv3d_oidhw_to_dhwio, heads_to_linear_out, identity,
                                   linear_to_heads, split_qkv)

__all__ = ["qwen2vl_vision_rules", "qwen2vl_rules"]

_QKV = ("q", "k", "v")


def qwen2vl_vision_rules(p: str, dst: str, cfg) -> list[Rule]:
    """The vision tower under prefix p ('visual' or 'model.visual') -> dst; cfg: Qwen2VLVisionConfig."""
    ln = cfg.norm == "layernorm"  # Qwen2-VL LayerNorm has a bias, Qwen2.5-VL RMSNorm has none
    B, T = f"{p}.blocks.{{i}}", f"{dst}/layers_{{i}}"
    mlp = (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")) if cfg.gated_mlp else (
        ("fc1", "fc1"), ("fc2", "fc2"))
    return [
        Rule(f"{p}.patch_embed.proj.weight", f"{dst}/patch_embed", conv3d_oidhw_to_dhwio),
        *norm(f"{B}.norm1", f"{T}/norm1", ln),
        *norm(f"{B}.norm2", f"{T}/norm2", ln),
        Rule(f"{B}.attn.qkv.weight", tuple(f"{T}/attn/{n}/kernel" for n in _QKV), compose(split_qkv, linear_to_heads)),
        Rule(f"{B}.attn.qkv.bias", tuple(f"{T}/attn/{n}/bias" for n in _QKV), compose(split_qkv, bias_to_heads)),
        Rule(f"{B}.attn.proj.weight", f"{T}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{B}.attn.proj.bias", f"{T}/attn/o/bias", identity),
        *[r for src, d in mlp for r in linear(f"{B}.mlp.{src}", f"{T}/mlp/{d}")],
        *norm(f"{p}.merger.ln_q", f"{dst}/merger/norm", ln),
        *linear(f"{p}.merger.mlp.0", f"{dst}/merger/mlp/fc1"),  # mlp.1 is the GELU (no weights)
        *linear(f"{p}.merger.mlp.2", f"{dst}/merger/mlp/fc2"),
        Rule(f"{p}.rotary_pos_emb.inv_freq", None),  # recomputed from the config
    ]


def qwen2vl_rules(cfg) -> list[Rule]:
    rules: list[Rule] = []
    for vis in ("visual", "model.visual"):
        rules += qwen2vl_vision_rules(vis, "vision", cfg.vision)
    # lm_head has the same name in both layouts: its rule comes once, with the first decoder prefix.
    rules += llama_rules("model", "lm_head", "decoder", cfg.text)
    rules += llama_rules("model.language_model", None, "decoder", cfg.text)
    rules.append(Rule("model.rotary_emb.inv_freq", None))
    rules.append(Rule("model.language_model.rotary_emb.inv_freq", None))
    return rules
