"""Rule helpers every family's table is built from: linear, norm, attention, and the two
towers several families share (a Llama-style decoder, a CLIP vision tower).

A helper returns a list of converters.rules.Rule for one torch submodule under prefix `src`,
filling the mmjax subtree `dst`. Layouts follow mmjax.layers: q/k/v kernels [D, N, H] (per
head), o kernel [N, H, D], Linear kernels [in, out].
"""
from __future__ import annotations

from converters.rules import Rule
from converters.transforms import (bias_to_heads, conv_oihw_to_hwio, embedding, heads_to_linear_out, identity,
                                   linear_to_heads, norm_scale, transpose_linear)

__all__ = ["linear", "norm", "attention", "llama_rules", "clip_vision_rules"]


def linear(src: str, dst: str, bias: bool = True) -> list[Rule]:
    """torch Linear (weight [out, in]) -> Einsum kernel [in, out] (+ bias)."""
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", transpose_linear)]
    return rules + ([Rule(f"{src}.bias", f"{dst}/bias", identity)] if bias else [])


def norm(src: str, dst: str, bias: bool = True) -> list[Rule]:
    """LayerNorm (bias=True) or RMSNorm (bias=False): weight -> scale."""
    rules = [Rule(f"{src}.weight", f"{dst}/scale", norm_scale)]
    return rules + ([Rule(f"{src}.bias", f"{dst}/bias", identity)] if bias else [])


def attention(src: str, dst: str, o: str = "o_proj", bias: bool = False, o_bias: bool = False,
              names: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")) -> list[Rule]:
    """Separate q/k/v Linears (`names`) and the output Linear `o` -> per-head kernels."""
    rules = [Rule(f"{src}.{n}.weight", f"{dst}/{p}/kernel", linear_to_heads) for n, p in zip(names, "qkv")]
    rules.append(Rule(f"{src}.{o}.weight", f"{dst}/o/kernel", heads_to_linear_out))
    if bias:
        rules += [Rule(f"{src}.{n}.bias", f"{dst}/{p}/bias", bias_to_heads) for n, p in zip(names, "qkv")]
    if o_bias:
        rules.append(Rule(f"{src}.{o}.bias", f"{dst}/o/bias", identity))
    return rules


def llama_rules(p: str, head: str | None, dst: str, cfg) -> list[Rule]:
    """Llama decoder under prefix p (e.g. 'language_model.model'); head = lm_head tensor prefix;
    cfg: mmjax.config.LlamaConfig."""
    L, T = f"{p}.layers.{{i}}", f"{dst}/layers_{{i}}"
    rules = [
        Rule(f"{p}.embed_tokens.weight", f"{dst}/embed/embedding", embedding),
        Rule(f"{p}.norm.weight", f"{dst}/final_norm/scale", norm_scale),
        Rule(f"{L}.input_layernorm.weight", f"{T}/input_norm/scale", norm_scale),
        Rule(f"{L}.post_attention_layernorm.weight", f"{T}/post_norm/scale", norm_scale),
        Rule(f"{L}.self_attn.rotary_emb.inv_freq", None),  # recomputed from the config
        *attention(f"{L}.self_attn", f"{T}/attn", "o_proj", cfg.qkv_bias, cfg.o_bias),
        *[r for m in ("gate", "up", "down") for r in linear(f"{L}.mlp.{m}_proj", f"{T}/mlp/{m}", cfg.mlp_bias)],
    ]
    if head is not None:
        # Tied heads reuse the embedding; an exported copy of the tied weight is dropped.
        rules.append(Rule(f"{head}.weight", None if cfg.tie_word_embeddings else f"{dst}/lm_head/kernel",
                          identity if cfg.tie_word_embeddings else transpose_linear))
    return rules


def clip_vision_rules(p: str, dst: str, num_layers: int, layers_used: int, post_norm: str | None = None) -> list[Rule]:
    """CLIP vision tower under prefix p (e.g. 'vision_tower.vision_model') -> dst.

    post_norm: where the post-LayerNorm goes (CLIPModel pools through it), or None to drop it
    (LLaVA reads hidden states, which never pass through it)."""
    rules = [
        Rule(f"{p}.embeddings.patch_embedding.weight", f"{dst}/patch_embed", conv_oihw_to_hwio),
        Rule(f"{p}.embeddings.class_embedding", f"{dst}/class_embedding", identity),
        Rule(f"{p}.embeddings.position_embedding.weight", f"{dst}/pos_embedding/embedding", embedding),
        Rule(f"{p}.embeddings.position_ids", None),  # a buffer some exports keep
        *norm(f"{p}.pre_layrnorm", f"{dst}/pre_norm"),  # sic: CLIP's own spelling
    ]
    if post_norm is None:
        rules += [Rule(f"{p}.post_layernorm.weight", None), Rule(f"{p}.post_layernorm.bias", None)]
    else:
        rules += norm(f"{p}.post_layernorm", post_norm)
    # Layer indices are explicit (not {i}) because blocks past the deepest feature layer
    # cannot change the features: they are not built, and their tensors are dropped.
    for j in range(layers_used):
        L, T = f"{p}.encoder.layers.{j}", f"{dst}/layers_{j}"
        rules += [
            *norm(f"{L}.layer_norm1", f"{T}/norm1"),
            *norm(f"{L}.layer_norm2", f"{T}/norm2"),
            *attention(f"{L}.self_attn", f"{T}/attn", "out_proj", True, True),
            *linear(f"{L}.mlp.fc1", f"{T}/mlp/fc1"),
            *linear(f"{L}.mlp.fc2", f"{T}/mlp/fc2"),
        ]
    rules += [Rule(f"{p}.encoder.layers.{j}.*", None) for j in range(layers_used, num_layers)]
    return rules
