"""A custom VLM ported through the public API only, and the components it is built from.

* docs/custom_models.md is executed block by block (its file includes must equal the files in
  tests/custom_vlm/), which exports AcmeVLM, converts it with --model/--rules, loads, runs
  forward and generate, and runs the parity tool. The tests then check the numbers against
  the torch model: fp32 logits, and 32 greedy tokens against a torch greedy loop written here.
* The dry run names the closest candidates for a missing rule and writes nothing.
* The components are checked against HF references: NeoXDecoder vs GPT-NeoX (partial rotary,
  parallel residual) and GPT-2 (learned positions, sequential, tied head); ViT vs SigLIP, and
  fused qkv == separate qkv.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.rules import Rule, build_plan
from converters.torch2flax import main as convert_cli
from converters.transforms import (bias_to_heads, compose, conv_oihw_to_hwio, embedding, heads_to_linear_out,
                                   identity, linear_to_heads, norm_scale, permute_rotary_interleaved_to_half,
                                   reshape, split_kv, split_qkv, transpose_linear)
from mmjax.families.composed import composed_sharding
from mmjax.models.composed import ComposedConfig, ComposedVLM
from mmjax.preprocess.composed import check_composed_inputs
from mmjax.decoders.neox import NeoXConfig, NeoXDecoder
from mmjax.errors import InputError
from mmjax.kernels.attention import MaskSpec
from mmjax.projectors.pixel_shuffle import pixel_shuffle
from mmjax.vision.vit import ViT, ViTConfig, posemb_sincos_2d
from tests.custom_vlm.torch_model import torch_greedy
from tests.tolerances import tol

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "custom_models.md"
FAMILY = "tests.custom_vlm.port:FAMILY"
RULES = "tests/custom_vlm/rules.py"
_BLOCK = re.compile(r"(?:<!-- file: (?P<file>\S+) -->\n)?```python\n(?P<code>.*?)```", re.S)


def doc_blocks() -> list[tuple[str | None, str]]:
    return [(m.group("file"), m.group("code")) for m in _BLOCK.finditer(DOC.read_text())]


@pytest.fixture(scope="module")
def tutorial():
    """Run every ```python block of the tutorial (not the file includes) in one namespace."""
    ns: dict = {"__name__": "custom_models_tutorial"}
    cwd = os.getcwd()
    os.chdir(ROOT)  # the tutorial names tests/custom_vlm/rules.py relative to the repository
    try:
        for k, (file, code) in enumerate(doc_blocks()):
            if file is None:
                exec(compile(code, f"{DOC}:python-block-{k}", "exec"), ns)
    finally:
        os.chdir(cwd)
    yield ns
    shutil.rmtree(ns["work"], ignore_errors=True)


def test_doc_includes_the_files_verbatim():
    included = {f: code for f, code in doc_blocks() if f is not None}
    assert set(included) == {"tests/custom_vlm/checkpoint.py", "tests/custom_vlm/port.py", "tests/custom_vlm/rules.py"}
    for f, code in included.items():
        assert code == (ROOT / f).read_text(), f"docs/custom_models.md: the block for {f} differs from the file"


def test_tutorial_logits_match_torch(tutorial):
    model, torch_model, inputs = tutorial["model"], tutorial["torch_model"], tutorial["inputs"]
    q = model.config.image_seq_length
    assert (inputs["input_ids"][:, :q] == model.config.image_token_id).all()
    logits = tutorial["logits"]
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(inputs["pixel_values"]), torch.from_numpy(inputs["input_ids"][:, q:]).long())
    assert logits.shape == tuple(ref.shape) == (1, inputs["input_ids"].shape[1], 384)
    err = float(np.abs(logits - ref.numpy()).max())
    print(f"AcmeVLM fp32 logits max |Δ| = {err:.2e}")
    assert err <= tol("float32", "logits")


def test_tutorial_autoported_bridge_matches_torch(tutorial):
    """The last section swaps the resampler component for an auto-port of the torch bridge."""
    assert tutorial["ported_vlm"].cfg.projector_type == "autoport"
    assert np.abs(tutorial["ported_logits"] - tutorial["ref"].numpy()).max() <= tol("float32", "logits")


def test_tutorial_greedy_matches_torch_loop(tutorial):
    model, torch_model, image = tutorial["model"], tutorial["torch_model"], tutorial["image"]
    prompt = "Describe the image."
    out = mmjax_generate(model, image, prompt)
    inputs = model.preprocess(image, prompt)
    q = model.config.image_seq_length
    eos = list(model.tokenizer.eos_token_ids)
    px = torch.from_numpy(inputs["pixel_values"])
    ids = torch.from_numpy(inputs["input_ids"][:, q:]).long()
    ref = torch_greedy(torch_model, px, ids, eos)
    print("AcmeVLM greedy:", out.token_ids)
    assert out.token_ids == ref
    assert len(set(ref)) > 3  # a decisive, non-constant continuation


def mmjax_generate(model, image, prompt):
    import mmjax

    return mmjax.generate(model, image, prompt, max_new_tokens=32, min_new_tokens=32)


def test_batched_generation_rows_match_single_rows(tutorial):
    """Rows of different lengths, padded to the batch and prompt buckets: each row's image prefix,
    prefix-LM mask and positions stay its own."""
    import mmjax
    from PIL import Image

    model = tutorial["model"]
    images = [tutorial["image"], Image.fromarray(np.random.default_rng(5).integers(0, 256, (20, 64, 3), np.uint8))]
    prompts = ["Describe the image.", "What color is the small cat next to the window?"]
    batch = mmjax.generate(model, [[im] for im in images], prompts, max_new_tokens=32, min_new_tokens=32)
    for image, prompt, row in zip(images, prompts, batch.token_ids):
        assert row == mmjax_generate(model, image, prompt).token_ids


def test_tutorial_parity_report_is_clean(tutorial):
    report = tutorial["report"]
    assert report.ok, report.table()
    names = [p.name for p in report.points]
    for want in ("vision/patch_embed", "vision/layers_1", "projector/layers_0/attn/q", "decoder/layers_1/attn",
                 "decoder/layers_1", "logits"):
        assert want in names
    assert names[-1] == "logits" and len(names) > 40
    sliced = tutorial["sliced"]  # positions=Q: torch's text-only token embedding is compared too
    assert sliced.ok and not sliced.skipped and sliced["decoder/embed"].positions == "6:", sliced.table()


def test_conversion_exercises_the_custom_transforms(tutorial, capsys):
    ckpt = tutorial["ckpt"]
    assert convert_cli([str(ckpt), "--dry-run", "--model", FAMILY, "--rules", str(ROOT / RULES)]) == 0
    table = capsys.readouterr().out
    for transform in ("conv_oihw_to_hwio", "compose(split_qkv, linear_to_heads)", "compose(split_qkv, bias_to_heads)",
                      "compose(split_kv, linear_to_heads)", "compose(split_gate_up, transpose_linear)",
                      "heads_to_linear_out", "acme_qkv(rotary_dim=8)", "reshape"):
        assert transform in table, transform
    assert "'rotary_inv_freq' (4,)" in table and "(dropped)" in table
    assert "would convert 85 tensors (1 dropped)" in table


def _dry_run_missing_head_rule(ckpt, tmp_path, capsys):
    src = (ROOT / RULES).read_text()
    line = '        Rule("head.weight", "decoder/lm_head/kernel", transpose_linear),\n'
    assert line in src
    bad = tmp_path / "rules_missing_head.py"
    bad.write_text(src.replace(line, ""))
    out = tmp_path / "never-written"
    rc = convert_cli([str(ckpt), "--dry-run", "--out", str(out), "--model", FAMILY, "--rules", str(bad)])
    captured = capsys.readouterr()
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]  # nothing written
    return rc, captured.out + captured.err


def test_dry_run_with_a_missing_rule_names_the_closest_candidates(tutorial, tmp_path, capsys):
    rc, text = _dry_run_missing_head_rule(tutorial["ckpt"], tmp_path, capsys)
    assert rc == 1
    assert "head.weight (384, 64): no rule matches it" in text
    assert "closest: decoder/lm_head/kernel (64, 384)" in text
    assert "decoder/lm_head/kernel (64, 384): no rule fills it" in text
    assert "closest: head.weight (384, 64)" in text


def test_failed_dry_run_still_prints_the_mapping_table(tutorial, tmp_path, capsys):
    """The rest of the mapping is shown beside the problems, so the one hole is seen in context.
    (Needs converters/torch2flax.py to print the partial plan when build_plan fails.)"""
    _, text = _dry_run_missing_head_rule(tutorial["ckpt"], tmp_path, capsys)
    assert "vis.stem.weight" in text and "acme_qkv(rotary_dim=8)" in text, text


def test_composed_config_round_trips_and_names_mistakes(tutorial):
    cfg = tutorial["cfg"]
    assert ComposedConfig.from_dict(dataclasses.asdict(cfg)) == cfg == ComposedConfig.from_spec(cfg.to_spec())
    spec = cfg.to_spec()
    with pytest.raises(ValueError, match=r"unknown projector component 'perceiver'; registered: autoport, identity, "
                                         r"linear, mlp, pixel_shuffle, resampler"):
        ComposedConfig.from_spec({**spec, "projector": {**spec["projector"], "type": "perceiver"}})
    with pytest.raises(ValueError, match=r"projector.out_features 32 != decoder.hidden_size 64"):
        ComposedConfig.from_spec({**spec, "projector": {**spec["projector"], "out_features": 32}})
    ids = np.full((1, 10), 7, np.int32)
    with pytest.raises(InputError, match="every row needs an image"):
        check_composed_inputs(cfg, {"input_ids": ids})
    ids[0, :5] = cfg.image_token_id  # one short of Q = 6
    with pytest.raises(InputError, match="must start with exactly 6 image tokens"):
        check_composed_inputs(cfg, {"input_ids": ids, "pixel_values": np.zeros((1, 3, 32, 32))})


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
    ours = _decoder_logits(cfg, params, ids)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    print(f"{type(hf).__name__} logits max |Δ| = {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() <= tol("float32", "logits")


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
    ours = _decoder_logits(cfg, params, ids)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    print(f"{type(hf).__name__} logits max |Δ| = {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() <= tol("float32", "logits")


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
    ours = _decoder_logits(cfg, params, ids)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    print(f"{type(hf).__name__} logits max |Δ| = {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() <= tol("float32", "logits")


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
    ours = _decoder_logits(cfg, params, ids)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    print(f"{type(hf).__name__} logits max |Δ| = {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() <= tol("float32", "logits")


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


def test_serving_engine_answers_as_generate_alone(tutorial):
    """The tutorial's AcmeVLM (image prefix, prefix-LM mask, NeoX decoder) served with continuous
    batching: 32 mixed requests, each equal to mmjax.generate on it alone."""
    from PIL import Image

    from mmjax.serving import ServingEngine
    from serving_cases import assert_served_like_alone, mixed_cases

    model = tutorial["model"]
    images = [tutorial["image"]] + [Image.fromarray(np.random.default_rng(i).integers(0, 256, (20 + 9 * i, 64, 3),
                                                                                      np.uint8)) for i in range(3)]
    cases = mixed_cases(images, ["Describe the image.", "What color is the cat?", "Hi."], max_new=(2, 14))
    for kw in cases:  # the image prefix is added by the processor: no marker in the prompt
        kw["prompt"] = kw["prompt"].replace("<image>", "")
        if kw["images"] is None:
            kw["images"] = [images[0]]  # AcmeVLM always has its image prefix
    eng = ServingEngine(model, max_num_seqs=8, page_size=8)
    assert_served_like_alone(model, eng, cases)
