"""Converter rules for AcmeVLM: its tensor names -> the mmjax parameter tree of the port.

Every tensor of the checkpoint matches exactly one rule (or is dropped by one), every mmjax
parameter is filled exactly once, and every shape is checked before any data is read.
"""
import functools

import numpy as np

from converters.rules import Rule
from converters.transforms import (bias_to_heads, compose, conv_oihw_to_hwio, embedding, heads_to_linear_out,
                                   identity, linear_to_heads, norm_scale, permute_rotary_interleaved_to_half,
                                   reshape, split_gate_up, split_kv, split_qkv, transpose_linear)


def acme_qkv(x, shape, *, rotary_dim):
    """AcmeVLM's c_attn, rows per head [N, 3, H] (q_h | k_h | v_h), rotary pairs interleaved
    -> q, k, v kernels [D, N, H] (weight) or biases [N, H], rotary pairs half-split."""
    N, H = shape[0][-2:]
    parts = x.reshape((N, 3, H) + tuple(x.shape[1:]))  # [N, 3, H] (+ [D] for the weight)
    # Which source dim each half-split rotary dim comes from: the stock permutation, applied
    # to the indices of the rotated dims only (the rest of the head does not rotate).
    perm = np.concatenate([permute_rotary_interleaved_to_half(np.arange(rotary_dim), head_dim=rotary_dim),
                           np.arange(rotary_dim, H)])
    q, k, v = parts[:, 0][:, perm], parts[:, 1][:, perm], parts[:, 2]  # [N, H] (+ [D])
    if x.ndim == 1:
        return q, k, v
    return tuple(t.transpose(2, 0, 1) for t in (q, k, v))  # [D, N, H]


def _norm(src, dst):
    return [Rule(f"{src}.weight", f"{dst}/scale", norm_scale), Rule(f"{src}.bias", f"{dst}/bias", identity)]


def _linear(src, dst, bias=True):
    return [Rule(f"{src}.weight", f"{dst}/kernel", transpose_linear)] + (
        [Rule(f"{src}.bias", f"{dst}/bias", identity)] if bias else [])


def _qkv(dst, what):
    return tuple(f"{dst}/{p}/{what}" for p in "qkv")


def RULES(cfg):
    """cfg: the port's ComposedConfig (the rotary width comes from it)."""
    d = cfg.decoder
    rotary_dim = int(d.dim_per_head * d.rope.partial_rotary_factor)
    V, v = "vis.blocks.{i}", "vision/layers_{i}"
    B, b = "bridge.blocks.{i}", "projector/layers_{i}"
    L, l = "lm.{i}", "decoder/layers_{i}"
    qkv = functools.partial(acme_qkv, rotary_dim=rotary_dim)
    return [
        # vision tower
        Rule("vis.stem.weight", "vision/patch_embed/kernel", conv_oihw_to_hwio),
        Rule("vis.stem.bias", "vision/patch_embed/bias", identity),
        Rule("vis.cls", "vision/class_embedding", reshape),  # [1, 1, W] -> [W]
        Rule("vis.pos", "vision/pos_embedding/embedding", reshape),  # [1, P+1, W] -> [P+1, W]
        *_norm(f"{V}.ln_a", f"{v}/norm1"),
        *_norm(f"{V}.ln_b", f"{v}/norm2"),
        Rule(f"{V}.attn.qkv.weight", _qkv(f"{v}/attn", "kernel"), compose(split_qkv, linear_to_heads)),
        Rule(f"{V}.attn.qkv.bias", _qkv(f"{v}/attn", "bias"), compose(split_qkv, bias_to_heads)),
        Rule(f"{V}.attn.proj.weight", f"{v}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{V}.attn.proj.bias", f"{v}/attn/o/bias", identity),
        *_linear(f"{V}.mlp.0", f"{v}/mlp/fc1"),
        *_linear(f"{V}.mlp.2", f"{v}/mlp/fc2"),
        *_norm("vis.ln_out", "vision/final_norm"),
        # perceiver resampler
        Rule("bridge.latents", "projector/latents", identity),
        *_norm(f"{B}.ln_media", f"{b}/norm_media"),
        *_norm(f"{B}.ln_latents", f"{b}/norm_latents"),
        *_norm(f"{B}.ff_ln", f"{b}/norm_mlp"),
        Rule(f"{B}.to_q.weight", f"{b}/attn/q/kernel", linear_to_heads),
        Rule(f"{B}.to_kv.weight", (f"{b}/attn/k/kernel", f"{b}/attn/v/kernel"), compose(split_kv, linear_to_heads)),
        Rule(f"{B}.to_out.weight", f"{b}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{B}.ff_w12.weight", (f"{b}/mlp/gate/kernel", f"{b}/mlp/up/kernel"),
             compose(split_gate_up, transpose_linear)),
        Rule(f"{B}.ff_w3.weight", f"{b}/mlp/down/kernel", transpose_linear),
        *_norm("bridge.ln_final", "projector/final_norm"),
        *_linear("bridge.proj", "projector/out_proj"),
        # decoder
        Rule("tok.weight", "decoder/embed/embedding", embedding),
        *_norm(f"{L}.ln_attn", f"{l}/norm1"),
        *_norm(f"{L}.ln_mlp", f"{l}/norm2"),
        Rule(f"{L}.attn.c_attn.weight", _qkv(f"{l}/attn", "kernel"), qkv),
        Rule(f"{L}.attn.c_attn.bias", _qkv(f"{l}/attn", "bias"), qkv),
        Rule(f"{L}.attn.c_proj.weight", f"{l}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{L}.attn.c_proj.bias", f"{l}/attn/o/bias", identity),
        *_linear(f"{L}.up", f"{l}/mlp/fc1"),
        *_linear(f"{L}.down", f"{l}/mlp/fc2"),
        *_norm("ln_f", "decoder/final_norm"),
        Rule("head.weight", "decoder/lm_head/kernel", transpose_linear),
        Rule("rotary_inv_freq", None),  # recomputed from the config
    ]
