"""The components a custom VLM is composed from (tests/test_custom_model.py ports a whole one),
each against a reference: NeoXDecoder vs HF GPT-NeoX (partial rotary, parallel residual), GPT-2
(learned positions, sequential, tied head), GPT-J and Phi (one norm for both branches); the
attention-only resampler vs its torch module; ViT vs SigLIP, and fused qkv == separate qkv; a
token-fusion Llama with pixel shuffle composed and sharded; hand-computed cases (2-D sincos
positions, pixel shuffle) and the config dataclass register_component requires.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.rules import Rule, build_plan
from converters.transforms import (bias_to_heads, compose, conv_oihw_to_hwio, embedding, heads_to_linear_out,
                                   identity, linear_to_heads, norm_scale, permute_rotary_interleaved_to_half,
                                   reshape, split_kv, split_qkv, transpose_linear)
from mmjax.families.composed import composed_sharding
from mmjax.models.composed import ComposedConfig, ComposedVLM
from mmjax.decoders.neox import NeoXConfig, NeoXDecoder
from mmjax.kernels.attention import MaskSpec
from mmjax.projectors.pixel_shuffle import pixel_shuffle
from mmjax.vision.vit import ViT, ViTConfig, posemb_sincos_2d
from tests.tolerances import tol


# ---------------------------------------------------------------- composed and sharded

def test_token_fusion_llama_and_pixel_shuffle_compose_and_shard():
    from mmjax.sharding import make_mesh, param_specs

    cfg = ComposedConfig.from_spec({
        "vision": {"type": "vit", "hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                   "image_size": 16, "patch_size": 4, "position": "sincos2d", "norm": "rmsnorm",
                   "hidden_act": "quick_gelu", "fused_qkv": True},
        "projector": {"type": "pixel_shuffle", "scale": 2, "hidden_size": 48, "norm": "layernorm"},
        "decoder": {"type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                    "num_heads": 4, "num_kv_heads": 2, "head_dim": 8},
        "fusion": "tokens", "image_token_id": 3})
    assert cfg.image_seq_length == 4  # 16 patches folded 2x2
    module = ComposedVLM(cfg)
    shapes = module.param_shapes()
    assert shapes["projector/mlp/fc1/kernel"].shape == (64, 48)
    assert shapes["vision/layers_0/attn/qkv/kernel"].shape == (16, 3, 2, 8)
    assert "vision/layers_0/norm1/bias" not in shapes and "vision/pos_embedding/embedding" not in shapes
    batch = module.example_batch()
    logits = jax.eval_shape(lambda: module.apply(module.init(jax.random.PRNGKey(0), batch), batch))
    assert logits.shape == (1, 6, 64)
    specs = param_specs(composed_sharding(cfg), shapes, make_mesh("data:1,model:1"))
    assert set(specs) == set(shapes)


# ---------------------------------------------------------------- components vs HF references

class _Reader:
    def __init__(self, sd):
        self.sd = {k: v.detach().numpy() for k, v in sd.items()}

    def read(self, name):
        return self.sd[name]


def _port(torch_module, rules, shapes):
    """Convert a live torch module in memory through the same rule engine."""
    sd = torch_module.state_dict()
    plan = build_plan({k: (tuple(v.shape), "float32") for k, v in sd.items()}, rules, shapes)
    return plan.execute(_Reader(sd))


def _decoder_logits(cfg, params, ids):
    def run(m, ids):
        T = ids.shape[1]
        h, _ = m(m.embed_tokens(ids), jnp.broadcast_to(jnp.arange(T), ids.shape), MaskSpec(causal=True))
        return m.logits(h)

    module = NeoXDecoder(cfg)
    if params is None:
        return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, method=run))["params"]
    return np.asarray(jax.jit(lambda p, ids: module.apply({"params": p}, ids, method=run))(params, ids))


def _assert_logits_match(hf, cfg, params, ids):
    """Our decoder's float32 logits against the HF torch model's on the same ids."""
    ours = _decoder_logits(cfg, params, ids)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    print(f"{type(hf).__name__} logits max |Δ| = {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() <= tol("float32", "logits")


def _neox_qkv(x, shape):
    """HF GPT-NeoX query_key_value: rows per head [N, 3, H] -> q, k, v (rotary already half-split)."""
    N, H = shape[0][-2:]
    parts = x.reshape((N, 3, H) + tuple(x.shape[1:]))
    out = (parts[:, 0], parts[:, 1], parts[:, 2])
    return out if x.ndim == 1 else tuple(t.transpose(2, 0, 1) for t in out)


def _norm(src, dst):
    return [Rule(f"{src}.weight", f"{dst}/scale", norm_scale), Rule(f"{src}.bias", f"{dst}/bias", identity)]


def _qkv(dst, what):
    return tuple(f"{dst}/attn/{p}/{what}" for p in "qkv")


def test_neox_decoder_matches_hf_gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    hf_cfg = GPTNeoXConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, rotary_pct=0.25, max_position_embeddings=64, initializer_range=0.1)
    hf = GPTNeoXForCausalLM(hf_cfg).eval()
    cfg = NeoXConfig.from_hf_gpt_neox(hf_cfg.to_dict())
    assert cfg.rope.partial_rotary_factor == 0.25 and cfg.parallel_residual
    L, T = "gpt_neox.layers.{i}", "layers_{i}"
    rules = [
        Rule("gpt_neox.embed_in.weight", "embed/embedding", embedding),
        *_norm(f"{L}.input_layernorm", f"{T}/norm1"), *_norm(f"{L}.post_attention_layernorm", f"{T}/norm2"),
        Rule(f"{L}.attention.query_key_value.weight", _qkv(T, "kernel"), _neox_qkv),
        Rule(f"{L}.attention.query_key_value.bias", _qkv(T, "bias"), _neox_qkv),
        Rule(f"{L}.attention.dense.weight", f"{T}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{L}.attention.dense.bias", f"{T}/attn/o/bias", identity),
        Rule(f"{L}.mlp.dense_h_to_4h.weight", f"{T}/mlp/fc1/kernel", transpose_linear),
        Rule(f"{L}.mlp.dense_h_to_4h.bias", f"{T}/mlp/fc1/bias", identity),
        Rule(f"{L}.mlp.dense_4h_to_h.weight", f"{T}/mlp/fc2/kernel", transpose_linear),
        Rule(f"{L}.mlp.dense_4h_to_h.bias", f"{T}/mlp/fc2/bias", identity),
        *_norm("gpt_neox.final_layer_norm", "final_norm"),
        Rule("lm_head.weight", "lm_head/kernel", transpose_linear),  # embed_out before transformers 5
        Rule("gpt_neox.rotary_emb.inv_freq", None),
    ]
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    params = _port(hf, rules, _decoder_logits(cfg, None, ids))
    _assert_logits_match(hf, cfg, params, ids)


def test_neox_decoder_learned_positions_match_hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32, initializer_range=0.1)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    cfg = NeoXConfig.from_hf_gpt2(hf_cfg.to_dict())
    assert cfg.position == "learned" and not cfg.parallel_residual and cfg.tie_word_embeddings
    L, T = "transformer.h.{i}", "layers_{i}"
    rules = [  # GPT-2's Conv1D stores weights [in, out], the transpose of a Linear
        Rule("transformer.wte.weight", "embed/embedding", embedding),
        Rule("transformer.wpe.weight", "pos_embed/embedding", embedding),
        *_norm(f"{L}.ln_1", f"{T}/norm1"), *_norm(f"{L}.ln_2", f"{T}/norm2"),
        Rule(f"{L}.attn.c_attn.weight", _qkv(T, "kernel"), compose(transpose_linear, split_qkv, linear_to_heads)),
        Rule(f"{L}.attn.c_attn.bias", _qkv(T, "bias"), compose(split_qkv, bias_to_heads)),
        Rule(f"{L}.attn.c_proj.weight", f"{T}/attn/o/kernel", reshape),
        Rule(f"{L}.attn.c_proj.bias", f"{T}/attn/o/bias", identity),
        Rule(f"{L}.mlp.c_fc.weight", f"{T}/mlp/fc1/kernel", identity),
        Rule(f"{L}.mlp.c_fc.bias", f"{T}/mlp/fc1/bias", identity),
        Rule(f"{L}.mlp.c_proj.weight", f"{T}/mlp/fc2/kernel", identity),
        Rule(f"{L}.mlp.c_proj.bias", f"{T}/mlp/fc2/bias", identity),
        *_norm("transformer.ln_f", "final_norm"),
        Rule("lm_head.weight", None),  # tied to wte
        Rule(f"{L}.attn.bias", None), Rule(f"{L}.attn.masked_bias", None),  # causal-mask buffers of older exports
    ]
    ids = np.random.default_rng(1).integers(0, 96, (2, 10)).astype(np.int32)
    params = _port(hf, rules, _decoder_logits(cfg, None, ids))
    _assert_logits_match(hf, cfg, params, ids)


def _gptj_qk(x, shape, *, rotary_dim):
    """GPT-J q_proj / k_proj [N*H, D], rotary pairs interleaved on the first rotary_dim dims of a
    head -> [D, N, H] with those pairs half-split (the rest of the head does not rotate)."""
    H = shape[-1]
    perm = np.concatenate([permute_rotary_interleaved_to_half(np.arange(rotary_dim), head_dim=rotary_dim),
                           np.arange(rotary_dim, H)])
    return linear_to_heads(x.reshape((-1, H) + tuple(x.shape[1:]))[:, perm].reshape(x.shape), shape)


def test_neox_shared_norm_matches_hf_gptj():
    """GPT-J: one LayerNorm (ln_1) feeds attention and MLP of a parallel residual, interleaved
    partial rotary, no attention biases, an lm_head with a bias."""
    import functools

    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    hf_cfg = GPTJConfig(vocab_size=96, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                        initializer_range=0.1)
    hf = GPTJForCausalLM(hf_cfg).eval()
    cfg = NeoXConfig.from_hf_gptj(hf_cfg.to_dict())
    assert cfg.shared_norm and cfg.parallel_residual and cfg.rope.partial_rotary_factor == 0.5
    L, T = "transformer.h.{i}", "layers_{i}"
    qk = functools.partial(_gptj_qk, rotary_dim=hf_cfg.rotary_dim)
    rules = [
        Rule("transformer.wte.weight", "embed/embedding", embedding),
        *_norm(f"{L}.ln_1", f"{T}/norm1"),  # the only norm of the block: there is no norm2
        Rule(f"{L}.attn.q_proj.weight", f"{T}/attn/q/kernel", qk),
        Rule(f"{L}.attn.k_proj.weight", f"{T}/attn/k/kernel", qk),
        Rule(f"{L}.attn.v_proj.weight", f"{T}/attn/v/kernel", linear_to_heads),
        Rule(f"{L}.attn.out_proj.weight", f"{T}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{L}.mlp.fc_in.weight", f"{T}/mlp/fc1/kernel", transpose_linear),
        Rule(f"{L}.mlp.fc_in.bias", f"{T}/mlp/fc1/bias", identity),
        Rule(f"{L}.mlp.fc_out.weight", f"{T}/mlp/fc2/kernel", transpose_linear),
        Rule(f"{L}.mlp.fc_out.bias", f"{T}/mlp/fc2/bias", identity),
        *_norm("transformer.ln_f", "final_norm"),
        Rule("lm_head.weight", "lm_head/kernel", transpose_linear),
        Rule("lm_head.bias", "lm_head/bias", identity),
    ]
    ids = np.random.default_rng(2).integers(0, 96, (2, 12)).astype(np.int32)
    shapes = _decoder_logits(cfg, None, ids)
    assert "norm2" not in shapes["layers_0"]
    params = _port(hf, rules, shapes)
    _assert_logits_match(hf, cfg, params, ids)


def test_neox_shared_norm_matches_hf_phi():
    """Phi-2: one input_layernorm for both branches, half-split partial rotary, biases everywhere."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    hf_cfg = PhiConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=64,
                       initializer_range=0.1)
    hf = PhiForCausalLM(hf_cfg).eval()
    cfg = NeoXConfig.from_hf_phi(hf_cfg.to_dict())
    assert cfg.shared_norm and cfg.lm_head_bias
    L, T = "model.layers.{i}", "layers_{i}"
    rules = [
        Rule("model.embed_tokens.weight", "embed/embedding", embedding),
        *_norm(f"{L}.input_layernorm", f"{T}/norm1"),
        *[Rule(f"{L}.self_attn.{p}_proj.weight", f"{T}/attn/{p}/kernel", linear_to_heads) for p in "qkv"],
        *[Rule(f"{L}.self_attn.{p}_proj.bias", f"{T}/attn/{p}/bias", bias_to_heads) for p in "qkv"],
        Rule(f"{L}.self_attn.dense.weight", f"{T}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{L}.self_attn.dense.bias", f"{T}/attn/o/bias", identity),
        Rule(f"{L}.mlp.fc1.weight", f"{T}/mlp/fc1/kernel", transpose_linear),
        Rule(f"{L}.mlp.fc1.bias", f"{T}/mlp/fc1/bias", identity),
        Rule(f"{L}.mlp.fc2.weight", f"{T}/mlp/fc2/kernel", transpose_linear),
        Rule(f"{L}.mlp.fc2.bias", f"{T}/mlp/fc2/bias", identity),
        *_norm("model.final_layernorm", "final_norm"),
        Rule("lm_head.weight", "lm_head/kernel", transpose_linear),
        Rule("lm_head.bias", "lm_head/bias", identity),
    ]
    ids = np.random.default_rng(3).integers(0, 96, (2, 11)).astype(np.int32)
    params = _port(hf, rules, _decoder_logits(cfg, None, ids))
    _assert_logits_match(hf, cfg, params, ids)


def test_neox_shared_norm_needs_a_parallel_residual():
    with pytest.raises(ValueError, match="shared_norm=True needs parallel_residual=True"):
        NeoXConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                   parallel_residual=False, shared_norm=True)


def test_resampler_without_feed_forward_matches_torch():
    """Attention-only perceiver layers (tests/autoport_parts.LatentResampler: the latents carry the
    residual, no feed-forward): intermediate_size=None, and the param tree has no norm_mlp / mlp."""
    from mmjax.projectors.resampler import PerceiverResampler, ResamplerConfig
    from tests.autoport_parts import LatentResampler, randomize

    torch_module = randomize(LatentResampler(dim=32, latents=6, depth=2, heads=4, out=48))
    cfg = ResamplerConfig(in_features=32, out_features=48, dim=32, num_queries=6, num_layers=2, num_heads=4,
                          intermediate_size=None, o_bias=True)
    module = PerceiverResampler(cfg)
    media = np.random.default_rng(4).normal(size=(3, 10, 32)).astype(np.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), media))["params"]
    assert set(shapes["layers_0"]) == {"norm_media", "norm_latents", "attn"}
    L, T = "layers.{i}", "layers_{i}"
    rules = [
        Rule("latents", "latents", identity),
        *_norm(f"{L}.norm_media", f"{T}/norm_media"),
        *_norm(f"{L}.norm_latents", f"{T}/norm_latents"),
        Rule(f"{L}.to_q.weight", f"{T}/attn/q/kernel", linear_to_heads),
        Rule(f"{L}.to_kv.weight", (f"{T}/attn/k/kernel", f"{T}/attn/v/kernel"), compose(split_kv, linear_to_heads)),
        Rule(f"{L}.to_out.weight", f"{T}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{L}.to_out.bias", f"{T}/attn/o/bias", identity),
        *_norm("norm", "final_norm"),
        Rule("proj.weight", "out_proj/kernel", transpose_linear),
        Rule("proj.bias", "out_proj/bias", identity),
    ]
    params = _port(torch_module, rules, shapes)
    ours = np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x))(params, media))
    with torch.no_grad():
        ref = torch_module(torch.from_numpy(media)).numpy()
    print(f"attention-only resampler max |Δ| = {np.abs(ours - ref).max():.2e}")
    assert ours.shape == (3, 6, 48)
    assert np.abs(ours - ref).max() <= tol("float32", "hidden")
    with pytest.raises(ValueError, match="gated_mlp=True needs a feed-forward"):
        cfg.replace(gated_mlp=True)


def test_vit_matches_hf_siglip_and_fused_qkv_is_the_same_network():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    hf_cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    hf = SiglipVisionModel(hf_cfg).eval()
    cfg = ViTConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=8,
                    position="learned", final_norm=True, norm_eps=hf_cfg.layer_norm_eps,
                    hidden_act=hf_cfg.hidden_act)
    p, v = "encoder.layers.{i}", "layers_{i}"
    rules = [
        Rule("embeddings.patch_embedding.weight", "patch_embed/kernel", conv_oihw_to_hwio),
        Rule("embeddings.patch_embedding.bias", "patch_embed/bias", identity),
        Rule("embeddings.position_embedding.weight", "pos_embedding/embedding", embedding),
        *_norm(f"{p}.layer_norm1", f"{v}/norm1"), *_norm(f"{p}.layer_norm2", f"{v}/norm2"),
        *[Rule(f"{p}.self_attn.{n}_proj.weight", f"{v}/attn/{n}/kernel", linear_to_heads) for n in "qkv"],
        *[Rule(f"{p}.self_attn.{n}_proj.bias", f"{v}/attn/{n}/bias", bias_to_heads) for n in "qkv"],
        Rule(f"{p}.self_attn.out_proj.weight", f"{v}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{p}.self_attn.out_proj.bias", f"{v}/attn/o/bias", identity),
        *[Rule(f"{p}.mlp.{n}.weight", f"{v}/mlp/{n}/kernel", transpose_linear) for n in ("fc1", "fc2")],
        *[Rule(f"{p}.mlp.{n}.bias", f"{v}/mlp/{n}/bias", identity) for n in ("fc1", "fc2")],
        *_norm("post_layernorm", "final_norm"),
        Rule("head.*", None),  # attention-pooling head: not part of the patch features
    ]
    px = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    vit = ViT(cfg)
    params = _port(hf, rules, jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), px))["params"])
    ours = np.asarray(jax.jit(lambda p, x: vit.apply({"params": p}, x))(params, px))
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(px)).last_hidden_state.numpy()
    print(f"SigLIP vision max |Δ| = {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() <= tol("float32", "vision_features")

    fused = ViT(dataclasses.replace(cfg, fused_qkv=True))
    fp = jax.tree.map(lambda x: x, params)
    for i in range(cfg.num_layers):
        a = fp[f"layers_{i}"]["attn"]
        a["qkv"] = {"kernel": np.stack([a.pop(n)["kernel"] for n in "qkv"], axis=1),
                    "bias": np.stack([params[f"layers_{i}"]["attn"][n]["bias"] for n in "qkv"], axis=0)}
    same = np.asarray(jax.jit(lambda p, x: fused.apply({"params": p}, x))(fp, px))
    assert np.abs(same - ours).max() <= 1e-6


# ---------------------------------------------------------------- hand-computed cases

def test_posemb_sincos_2d_by_hand():
    s, c = np.sin(1.0), np.cos(1.0)
    want = [[0, 1, 0, 1], [s, c, 0, 1], [0, 1, s, c], [s, c, s, c]]  # rows (y, x) = 00, 01, 10, 11
    np.testing.assert_allclose(posemb_sincos_2d(2, 4), want, rtol=1e-6)


def test_pixel_shuffle_by_hand():
    grid = np.arange(16, dtype=np.float32).reshape(4, 4)  # value = 4 * y + x
    out = np.asarray(pixel_shuffle(jnp.asarray(grid.reshape(1, 16, 1)), 2))
    assert out.shape == (1, 4, 4)
    # output token (Y, X) holds the 2x2 block at rows 2Y.., cols 2X.., in (h, w) order
    np.testing.assert_array_equal(out[0], [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
    with pytest.raises(ValueError, match="not a square grid"):
        pixel_shuffle(jnp.zeros((1, 17, 2)), 2)


def test_register_component_needs_a_config_dataclass():
    from mmjax.components import register_component
    from mmjax.errors import InputError

    from mmjax.config import ConfigBase

    class NotAConfig:
        pass

    @dataclasses.dataclass(frozen=True)
    class PlainDataclass:  # a config without ConfigBase used to fail later, at from_dict (AttributeError)
        in_features: int

    @dataclasses.dataclass
    class NotFrozen(ConfigBase):  # unhashable: it could not be a static argument of jit
        in_features: int

    for cls in (NotAConfig, PlainDataclass, NotFrozen):
        with pytest.raises(InputError, match="must be a frozen dataclass subclassing mmjax.config.ConfigBase"):
            register_component("projector", "oops", cls, object)
