"""Fused projections (mmjax/layers/fusion.py): q|k|v and gate|up as one product each, made by
mmjax.load where it packs the decoder for the CPU. The tree rewrite and its inverse on their
own, then a loaded model: which params it fuses, the checkpoint layout given back exactly, and
the same logits and tokens as the model left as stored."""
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax
from mmjax.layers import fusion
from mmjax.tree import flatten_params

GROUPS = {"blk/attn": (("qkv", ("q", "k", "v")),), "blk/mlp": (("gate_up", ("gate", "up")),)}
CONTRACTIONS = {f"blk/attn/{m}/kernel": 1 for m in "qkv"} | {f"blk/mlp/{m}/kernel": 1 for m in ("gate", "up")}


def _tree(rng):
    def member(n_out, bias):
        out = {"kernel": jnp.asarray(rng.integers(-127, 128, (8, *n_out), dtype=np.int8)),
               "kernel_scale": jnp.asarray(rng.random(n_out, np.float32))}
        if bias:
            out["bias"] = jnp.asarray(rng.standard_normal(n_out).astype(np.float32))
        return out
    return {"blk": {"attn": {"q": member((4, 2), True), "k": member((2, 2), True), "v": member((2, 2), True),
                             "o": member((8,), False)},
                    "mlp": {"gate": member((6,), False), "up": member((6,), False)}}}


def test_fuse_concatenates_members_and_unfuse_gives_them_back():
    rng = np.random.default_rng(0)
    tree = _tree(rng)
    before = {k: np.asarray(v) for k, v in flatten_params(tree).items()}
    shapes = {k: v.shape for k, v in before.items()}
    fused, contractions = fusion.fuse_params(tree, GROUPS, CONTRACTIONS)
    flat = flatten_params(fused)
    assert contractions == {"blk/attn/qkv/kernel": 1, "blk/mlp/gate_up/kernel": 1}
    assert set(fused["blk"]["attn"]) == {"qkv", "o"} and set(fused["blk"]["mlp"]) == {"gate_up"}
    assert flat["blk/attn/qkv/kernel"].shape == (8, 8 + 4 + 4) and flat["blk/mlp/gate_up/kernel"].shape == (8, 12)
    # columns in member order: q's 8, then k's 4, then v's 4; scales and biases alike
    np.testing.assert_array_equal(flat["blk/attn/qkv/kernel"][:, 8:12], before["blk/attn/k/kernel"].reshape(8, 4))
    np.testing.assert_array_equal(flat["blk/attn/qkv/bias"][12:], before["blk/attn/v/bias"].reshape(4))
    np.testing.assert_array_equal(flat["blk/mlp/gate_up/kernel_scale"][6:], before["blk/mlp/up/kernel_scale"])
    assert fusion.fused_shapes(fused, GROUPS, shapes, CONTRACTIONS) == {"blk/attn/qkv/kernel": (8, 16),
                                                                         "blk/mlp/gate_up/kernel": (8, 12)}
    back = flatten_params(fusion.unfuse_params(fused, GROUPS, shapes))
    assert set(back) == set(before)
    for k, v in before.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k


def test_members_that_differ_stay_apart():
    rng = np.random.default_rng(1)
    tree = _tree(rng)
    del tree["blk"]["attn"]["v"]["bias"]  # q and k have a bias, v none: not one product
    tree["blk"]["mlp"]["up"]["kernel"] = tree["blk"]["mlp"]["up"]["kernel"].astype(jnp.float32)  # mixed dtypes
    fused, contractions = fusion.fuse_params(tree, GROUPS, CONTRACTIONS)
    assert contractions == {} and set(fused["blk"]["attn"]) == {"q", "k", "v", "o"}
    assert set(fused["blk"]["mlp"]) == {"gate", "up"}
    # a path the selection turns down stays as it is too
    _, contractions = fusion.fuse_params(_tree(rng), GROUPS, CONTRACTIONS, select=lambda p: p.endswith("mlp"))
    assert list(contractions) == ["blk/mlp/gate_up/kernel"]


def test_split_cuts_at_member_sizes():
    y = jnp.arange(2 * 16, dtype=jnp.float32).reshape(2, 16)
    q, k, v = fusion.split(y, ((4, 2), (2, 2), (2, 2)))
    assert q.shape == (2, 4, 2) and k.shape == (2, 2, 2) and float(v[1, 0, 0]) == 16 + 12
    with pytest.raises(ValueError, match="hold 15 features"):
        fusion.split(y, ((4, 2), (2, 2), (3,)))


def test_load_fuses_the_decoder_and_runs_the_same(tiny_llava):
    fused, plain = mmjax.load(tiny_llava.flax), mmjax.load(tiny_llava.flax, pack_weights=False)
    p, q = flatten_params(fused.params), flatten_params(plain.params)
    # float32 kernels are fused, not packed, by default: one [D, F] kernel per group
    assert p["decoder/layers_0/attn/qkv/kernel"].shape == (64, (4 + 2 + 2) * 16)
    assert p["decoder/layers_1/mlp/gate_up/kernel"].shape == (64, 2 * 128)
    assert "decoder/layers_0/attn/q/kernel" not in p and "decoder/layers_0/attn/o/kernel" in p
    assert "vision/layers_0/attn/q/kernel" in p  # the tower is left as stored
    assert len(p) == len(q) - 2 * 3  # 2 layers: q, k, v -> qkv and gate, up -> gate_up
    back = flatten_params(fused.checkpoint_params())
    assert set(back) == set(q) and all(np.array_equal(back[k], q[k]) for k in q)

    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    inputs = fused.preprocess([image], "Describe it.")
    a, b = np.asarray(mmjax.forward(fused, **inputs)), np.asarray(mmjax.forward(plain, **inputs))
    # one [D, F] GEMM instead of three may block the sums differently: float32 rounding only
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    kw = dict(max_new_tokens=16, min_new_tokens=16)
    x = mmjax.generate(fused, None, ["describe it", "hi there"], **kw)
    y = mmjax.generate(plain, None, ["describe it", "hi there"], **kw)
    assert x.token_ids == y.token_ids


def test_packing_with_a_mesh_is_refused(tiny_llava):
    with pytest.raises(mmjax.errors.InputError, match="pack_weights=True: the panel layout is for one CPU device"):
        mmjax.load(tiny_llava.flax, mesh="data:1", pack_weights=True)
    on_mesh = flatten_params(mmjax.load(tiny_llava.flax, mesh="data:1").params)  # default: stored layout
    assert "decoder/layers_0/attn/q/kernel" in on_mesh and "decoder/layers_0/attn/qkv/kernel" not in on_mesh
