"""Text encoders (CLIP dual encoder, BERT) against HF: tiny random CLIPModel / BertModel,
save_pretrained -> converters.torch2flax.convert -> mmjax.load -> encode, fp32.

Tolerances (max |Δ|, fp32) come from tests/tolerances.py: "logits" for the CLIP logits,
"hidden" for embeddings, hidden states and pooled outputs (both 1e-4)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import mmjax
from converters.torch2flax import convert
from mmjax import registry
from mmjax.errors import ConversionError, InputError
from mmjax import encode
from mmjax.text.clip_text import eos_positions
from tests.tolerances import tol

TOL = tol("float32", "hidden")
VOCAB, EOS, PAD = 99, 98, 1


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _convert_and_load(hf_model, tmp_path_factory, name):
    src = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(str(src))
    out = src.parent / f"{name}-flax"
    convert(str(src), str(out), progress=False)
    return mmjax.load(str(out))


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=EOS, pad_token_id=PAD,
                         bos_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    return hf, _convert_and_load(hf, tmp_path_factory, "clip")


def _text_batch():
    """Rows of lengths 4, 7 and 3 (right-padded to 8) and one of 5, left-padded; EOS ends each row."""
    rng = np.random.RandomState(1)
    rows = [(4, "right"), (7, "right"), (3, "right"), (5, "left")]
    ids = np.full((len(rows), 8), PAD, np.int64)
    mask = np.zeros_like(ids)
    for r, (n, side) in enumerate(rows):
        toks = np.append(rng.randint(2, EOS, n - 1), EOS)
        sl = slice(0, n) if side == "right" else slice(8 - n, 8)
        ids[r, sl], mask[r, sl] = toks, 1
    return ids, mask


def _pixels(n=2):
    return np.random.RandomState(2).randn(n, 3, 32, 32).astype(np.float32)


def test_families_registered_without_processor():
    for name in ("clip", "bert"):
        fam = registry.get(name)
        assert fam.name == name and fam.processor is None


def test_clip_parity_padded_text(clip_pair):
    hf, model = clip_pair
    ids, mask = _text_batch()
    px = _pixels()
    out = encode(model, input_ids=ids, attention_mask=mask, pixel_values=px)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px))
    assert out["logits_per_image"].shape == (2, 4) and out["logits_per_text"].shape == (4, 2)
    want = {"logits_per_image": "logits", "logits_per_text": "logits", "text_embeds": "hidden",
            "image_embeds": "hidden"}
    diffs = {k: _max_diff(out[k], getattr(ref, k).numpy()) for k in want}
    print("clip max |d|:", diffs)
    assert all(diffs[k] <= tol("float32", w) for k, w in want.items()), diffs


def test_clip_unnormalized_features_match_hf(clip_pair):
    hf, model = clip_pair
    ids, mask = _text_batch()
    px = _pixels()
    out = encode(model, input_ids=ids, attention_mask=mask, pixel_values=px, normalize=False)
    with torch.no_grad():
        t = hf.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        i = hf.get_image_features(pixel_values=torch.tensor(px))
    t, i = getattr(t, "pooler_output", t).numpy(), getattr(i, "pooler_output", i).numpy()
    assert _max_diff(out["text_embeds"], t) <= TOL
    assert _max_diff(out["image_embeds"], i) <= TOL
    # The logits never depend on `normalize`.
    normed = encode(model, input_ids=ids, attention_mask=mask, pixel_values=px)
    assert _max_diff(out["logits_per_image"], normed["logits_per_image"]) <= TOL


def test_clip_single_tower_and_padding_invariance(clip_pair):
    _, model = clip_pair
    ids, mask = _text_batch()
    batched = encode(model, input_ids=ids, attention_mask=mask)
    assert set(batched) == {"text_embeds"}
    # A right-padded row equals the row alone. (A left-padded one does not, in HF either: its
    # positions still count from the first pad.)
    real = ids[1][mask[1].astype(bool)][None]
    alone = encode(model, input_ids=real)["text_embeds"][0]
    assert _max_diff(batched["text_embeds"][1], alone) <= TOL
    # The mask is what makes the left-padded row right: without it that row changes.
    # (An all-ones mask is "no mask" and reuses the compiled program.)
    unmasked = encode(model, input_ids=ids, attention_mask=np.ones_like(mask))["text_embeds"]
    assert _max_diff(unmasked[3], batched["text_embeds"][3]) > 1e-3
    assert set(encode(model, pixel_values=_pixels(1))) == {"image_embeds"}


def test_eos_positions_follow_hf_rules():
    ids = np.array([[0, 5, 9, 3, 9], [0, 7, 1, 1, 1], [4, 2, 8, 2, 2]])
    # eos_token_id=2 is the pre-#24773 config: pooled at the highest id (first one on ties).
    np.testing.assert_array_equal(np.asarray(eos_positions(ids, 2)), [2, 1, 2])
    # otherwise the first eos; a row without one pools at 0.
    np.testing.assert_array_equal(np.asarray(eos_positions(ids, 9)), [2, 0, 0])
    np.testing.assert_array_equal(np.asarray(eos_positions(ids, 1)), [0, 2, 0])


# ----------------------------------------------------------------------------- BERT


def _bert_config(**kw):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=24, type_vocab_size=3, **kw)


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.BertModel(_bert_config()).eval()
    return hf, _convert_and_load(hf, tmp_path_factory, "bert")


def _bert_batch():
    ids = np.random.RandomState(3).randint(2, VOCAB, (3, 9))
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    mask[1, 8:] = 0
    types = np.zeros_like(ids)
    types[0, 3:5] = 1
    types[1, 4:8] = 2
    types[2, 6:] = 1
    return ids, mask, types


def test_bert_parity_padding_and_token_types(bert_pair):
    hf, model = bert_pair
    ids, mask, types = _bert_batch()
    out = encode(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    diffs = {k: _max_diff(out[k], getattr(ref, k).numpy()) for k in ("last_hidden_state", "pooler_output")}
    print("bert max |d|:", diffs)
    assert all(d <= TOL for d in diffs.values()), diffs
    # Padding and token types both matter: dropping either changes the result.
    # (all-ones mask / all-zero types mean "none given" and reuse the compiled program)
    no_mask = encode(model, input_ids=ids, attention_mask=np.ones_like(mask), token_type_ids=types)
    no_types = encode(model, input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(types))
    no_mask, no_types = no_mask["last_hidden_state"], no_types["last_hidden_state"]
    assert _max_diff(no_mask[0, :5], out["last_hidden_state"][0, :5]) > 1e-3
    assert _max_diff(no_types[1, :8], out["last_hidden_state"][1, :8]) > 1e-3


def test_bert_pool_options(bert_pair):
    hf, model = bert_pair
    ids, mask, types = _bert_batch()
    with torch.no_grad():
        h = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    cls = encode(model, input_ids=ids, attention_mask=mask, token_type_ids=types, pool="cls")["pooler_output"]
    mean = encode(model, input_ids=ids, attention_mask=mask, token_type_ids=types, pool="mean")["pooler_output"]
    assert _max_diff(cls, h[:, 0]) <= TOL
    want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert _max_diff(mean, want) <= TOL
    with pytest.raises(InputError, match="pool="):
        encode(model, input_ids=ids, pool="max")


def test_bert_head_checkpoint_without_pooler(tmp_path_factory):
    """BertForMaskedLM: keys under bert.*, no pooler, cls.* heads dropped."""
    torch.manual_seed(1)
    hf = transformers.BertForMaskedLM(_bert_config()).eval()
    model = _convert_and_load(hf, tmp_path_factory, "bert-mlm")
    assert not model.config.has_pooler
    ids, mask, types = _bert_batch()
    out = encode(model, input_ids=ids, attention_mask=mask, token_type_ids=types, pool="cls")
    with torch.no_grad():
        ref = hf.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    assert _max_diff(out["last_hidden_state"], ref) <= TOL
    default = encode(model, input_ids=ids, attention_mask=mask, token_type_ids=types)["pooler_output"]
    assert _max_diff(default, out["pooler_output"]) == 0.0  # no pooler: the default is [CLS]
    with pytest.raises(InputError, match="no pooler"):
        encode(model, input_ids=ids, pool="pooler")


def test_bert_rules_name_a_missing_tensor(tmp_path):
    """A BertModel saved without its pooler, but claiming to be one: the plan names the gap."""
    torch.manual_seed(0)
    transformers.BertModel(_bert_config(), add_pooling_layer=False).save_pretrained(str(tmp_path))
    with pytest.raises(ConversionError, match="encoder/pooler/kernel"):
        convert(str(tmp_path), dry_run=True, progress=False)


def test_encode_rejects_bad_inputs(bert_pair, clip_pair):
    _, bert = bert_pair
    _, clip = clip_pair
    ids = np.zeros((1, 4), np.int64)
    with pytest.raises(InputError, match="pixel_values"):
        encode(bert, input_ids=ids, pixel_values=_pixels(1))
    with pytest.raises(InputError, match="token_type_ids"):
        encode(clip, input_ids=ids, token_type_ids=ids)
    with pytest.raises(InputError, match="input_ids: values must lie in"):
        encode(bert, input_ids=ids + VOCAB)
    with pytest.raises(InputError, match="token_type_ids: values must lie in"):
        encode(bert, input_ids=ids, token_type_ids=ids + 3)
    with pytest.raises(InputError, match="max_position_embeddings=16"):
        encode(clip, input_ids=np.zeros((1, 17), np.int64))
    with pytest.raises(InputError, match="not an input"):
        encode(clip, input_ids=ids, pool="cls")


def test_encode_keeps_cpu_kernels_off_under_a_mesh(clip_pair):
    # A model loaded with a mesh has a KernelPolicy without the CPU custom calls (they have no
    # sharding rule; mmjax.load applies it); both ways give the same numbers.
    from mmjax.kernels.policy import KernelPolicy, with_kernels
    from mmjax.encode import _run

    _, model = clip_pair
    ids, mask = _text_batch()
    arrays = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32)}
    mesh_module = model.module.clone(cfg=with_kernels(model.module.cfg, KernelPolicy.without_cpu_custom_calls))
    on = _run.lower(model.params, arrays, module=model.module, options=()).as_text()
    off = _run.lower(model.params, arrays, module=mesh_module, options=()).as_text()
    assert "mmjax_" in on and "mmjax_" not in off
    a = _run(model.params, arrays, module=model.module, options=())["text_embeds"]
    b = _run(model.params, arrays, module=mesh_module, options=())["text_embeds"]
    assert _max_diff(a, b) <= 1e-6
