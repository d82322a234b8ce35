"""converters.parity.compare: clean on the tutorial model (AcmeVLM) and on LLaVA; with q and k swapped
in one decoder layer by a wrong rule it names that layer as the first divergence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmjax
from converters.rules import Rule
from converters.torch2flax import convert
from mmjax.errors import InputError
from converters.parity import _align, compare, default_points
from tests.custom_vlm.checkpoint import save_acme_checkpoint
from tests.custom_vlm.rules import RULES
from tests.custom_vlm.torch_model import AcmeVLM, build_acme

FAMILY = "tests.custom_vlm.port:FAMILY"
QKV = "lm.{i}.attn.c_attn.weight"


def _image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (36, 30, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def acme(tmp_path_factory):
    root = tmp_path_factory.mktemp("acme")
    torch_model = build_acme(seed=1)
    ckpt = save_acme_checkpoint(root / "ckpt", torch_model)
    convert(ckpt, root / "flax", model=FAMILY, progress=False)
    model = mmjax.load(root / "flax")
    inputs = model.preprocess(_image(), "What is in the picture?")
    q = model.config.image_seq_length
    torch_inputs = {"pixels": torch.from_numpy(inputs["pixel_values"]),
                    "text_ids": torch.from_numpy(inputs["input_ids"][:, q:]).long()}
    return root, ckpt, torch_model, model, inputs, torch_inputs


def swapped_qk_rules(layer: int):
    """The tutorial's rules, except that layer `layer` writes c_attn's q rows into k and k into q."""
    def rules(cfg):
        base = RULES(cfg)
        (fused,) = [r for r in base if r.source == QKV]
        out = [r for r in base if r.source != QKV]
        for j in range(cfg.decoder.num_layers):
            q, k, v = (t.replace("{i}", str(j)) for t in fused.targets)
            out.append(Rule(QKV.replace("{i}", str(j)), (k, q, v) if j == layer else (q, k, v), fused.transform))
        return out
    return rules


def test_tutorial_model_is_within_tolerance(acme):
    _, _, torch_model, model, inputs, torch_inputs = acme
    report = compare(torch_model, torch_inputs, model, inputs, atol=1e-4, rtol=1e-4)
    assert report.ok, report.table()
    worst = max(report.points, key=lambda p: p.max_abs)
    print(f"AcmeVLM: {len(report.points)} points, worst {worst.name} max|Δ| {worst.max_abs:.2e}")
    assert len(report.points) > 40
    # one skipped pair, for a reason it states: torch embeds the text only, mmjax the prefix ids too
    assert [(n, t) for n, t, _ in report.skipped] == [("decoder/embed", "tok")]
    assert "do not align" in report.skipped[0][2]


def test_swapped_q_and_k_in_one_layer_is_named_first(acme):
    root, ckpt, torch_model, _, inputs, torch_inputs = acme
    convert(ckpt, root / "flax-bad", model=FAMILY, rules=swapped_qk_rules(1), progress=False)
    bad = mmjax.load(root / "flax-bad")
    report = compare(torch_model, torch_inputs, bad, inputs, atol=1e-4, rtol=1e-4)
    first = report.first_divergence
    assert first is not None and first.name.startswith("decoder/layers_1/attn"), report.table()
    assert first.torch_name.startswith("lm.1.attn")
    before = report.points[: report.points.index(first)]
    assert all(p.ok for p in before)
    assert {"vision", "projector", "decoder/layers_0", "decoder/layers_1/norm1"} <= {p.name for p in before}
    assert not report["decoder/layers_1"].ok and not report["logits"].ok
    assert "first divergence: decoder/layers_1/attn" in report.table()


def test_llava_is_within_tolerance(tiny_llava):
    hf = tiny_llava.hf_model
    model = mmjax.load(tiny_llava.flax)
    inputs = model.preprocess(_image(), "<image>\nWhat is this?")
    torch_inputs = {k: torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "pixel_values")}
    torch_inputs["input_ids"] = torch_inputs["input_ids"].long()
    report = compare(hf, torch_inputs, model, inputs, atol=1e-4, rtol=1e-4)
    assert report.ok, report.table()
    worst = max(report.points, key=lambda p: p.max_abs)
    print(f"LLaVA: {len(report.points)} points, worst {worst.name} max|Δ| {worst.max_abs:.2e}")
    names = {p.name: p.torch_name for p in report.points}
    assert names["decoder/layers_1"] == "model.language_model.layers.1"
    assert names["vision/layers_0/attn/q"] == "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    # the decoder's q|k|v and gate|up run fused (mmjax.layers.fusion): compared by their stored names
    assert names["decoder/layers_0/attn/k"] == "model.language_model.layers.0.self_attn.k_proj"
    assert names["decoder/layers_1/mlp/up"] == "model.language_model.layers.1.mlp.up_proj"
    assert names["projector/mlp"] == "model.multi_modal_projector"


def test_user_points_and_sown_values(acme):
    _, _, torch_model, model, inputs, torch_inputs = acme
    points = {"image_features": "bridge", "vision/hidden_states/1": "vis.blocks.0", "decoder/layers_1": "lm.1"}
    report = compare(torch_model, torch_inputs, model, inputs, points=points, verbose=False)
    assert [p.name for p in report.points] == ["vision/hidden_states/1", "image_features", "decoder/layers_1", "logits"]
    assert report.ok
    with pytest.raises(InputError, match=r"torch model has no module\(s\) \['lm.9'\]"):
        compare(torch_model, torch_inputs, model, inputs, points={"decoder/layers_1": "lm.9"}, verbose=False)


class TextOnlyAcme(AcmeVLM):
    """AcmeVLM returning the logits of the text positions only (many research models do)."""

    def forward(self, pixels, text_ids):
        logits = super().forward(pixels, text_ids)
        return logits[:, logits.shape[1] - text_ids.shape[1]:]


def test_positions_compare_a_model_that_returns_text_positions_only(acme):
    _, _, torch_model, model, inputs, torch_inputs = acme
    text_only = TextOnlyAcme().eval()
    text_only.load_state_dict(torch_model.state_dict())
    q = model.config.image_seq_length
    before = compare(text_only, torch_inputs, model, inputs, verbose=False)
    assert {n for n, _, _ in before.skipped} == {"logits", "decoder/embed"}
    for positions in (slice(q, None), q):
        report = compare(text_only, torch_inputs, model, inputs, positions=positions, verbose=False)
        assert report.ok and not report.skipped, report.table()
        assert report["logits"].positions == report["decoder/embed"].positions == f"{q}:"
        assert report["decoder/layers_1"].positions == ""  # same length on both sides: not sliced
        assert report["logits"].shape == tuple(torch_inputs["text_ids"].shape) + (model.config.decoder.vocab_size,)
    assert f"logits[:, {q}:]" in report.table()
    wrong = compare(text_only, torch_inputs, model, inputs, positions=slice(0, 2), verbose=False)
    assert "nor do mmjax positions [0:2]" in dict(((n, w) for n, _, w in wrong.skipped))["logits"]
    with pytest.raises(InputError, match="positions must be a slice"):
        compare(text_only, torch_inputs, model, inputs, positions=[q], verbose=False)


def test_default_points_pair_modules_by_their_tensors(acme):
    _, _, torch_model, model, _, _ = acme
    pts = default_points(torch_model, RULES(model.config), model.checkpoint_params())
    assert pts["decoder/layers_1"] == "lm.1" and pts["decoder/layers_1/attn"] == "lm.1.attn"
    assert pts["vision/patch_embed"] == "vis.stem" and pts["projector"] == "bridge"
    # a fused torch Linear fills q, k and v: it pairs with none of them
    assert not any(k.endswith(("attn/q", "attn/k", "attn/v")) for k in pts if k.startswith(("vision", "decoder")))
    assert "projector/layers_0/attn/k" not in pts and pts["projector/layers_0/attn/q"] == "bridge.blocks.0.to_q"


def test_align_handles_head_splits_and_channels_first():
    x = np.arange(24.0).reshape(1, 2, 3, 4)  # [B, T, N, H]
    a, b = _align(x, x.reshape(1, 2, 12))
    assert a.shape == b.shape == (1, 2, 12)
    conv = np.arange(24.0).reshape(1, 6, 2, 2)  # [B, C, y, x]
    tokens = conv.reshape(1, 6, 4).transpose(0, 2, 1)  # [B, y*x, C]
    a, b = _align(tokens, conv)
    np.testing.assert_array_equal(a, b)
    assert _align(np.zeros((1, 5, 4)), np.zeros((1, 4, 5))) is None
