"""converters.rules + converters.transforms: hand-computed layouts, and a plan that reports every
problem (with candidates) before reading any data."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from converters import transforms as T
from converters.rules import Rule, build_plan, flatten, unflatten
from mmjax.errors import ConversionError

D, N, K, H, L = 6, 2, 1, 4, 3
RNG = np.random.default_rng(0)


def sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


class DictReader:
    """A reader over a dict of arrays that records which tensors were read."""

    def __init__(self, arrays):
        self.arrays, self.reads = arrays, []

    def tensors(self):
        return {n: (a.shape, a.dtype.name) for n, a in self.arrays.items()}

    def read(self, name):
        self.reads.append(name)
        return self.arrays[name]


# ---------------------------------------------------------------- transforms, hand-checked

def test_linear_to_heads_matches_torch_linear():
    w = RNG.standard_normal((N * H, D)).astype(np.float32)  # torch [N*H, D]
    x = RNG.standard_normal((D,)).astype(np.float32)
    k = T.linear_to_heads(w, shape=(D, N, H))
    torch_out = (w @ x).reshape(N, H)  # torch: y = W x, then view as heads
    np.testing.assert_allclose(np.einsum("D,DNH->NH", x, k), torch_out, rtol=1e-6)


def test_heads_to_linear_out_and_bias():
    w = RNG.standard_normal((D, N * H)).astype(np.float32)  # torch o_proj [D, N*H]
    a = RNG.standard_normal((N, H)).astype(np.float32)
    k = T.heads_to_linear_out(w, shape=(N, H, D))
    np.testing.assert_allclose(np.einsum("NH,NHD->D", a, k), w @ a.reshape(-1), rtol=1e-6)
    b = np.arange(N * H, dtype=np.float32)
    np.testing.assert_array_equal(T.bias_to_heads(b, shape=(N, H)), b.reshape(N, H))
    with pytest.raises(ValueError, match=r"\[D, N\*H\]"):
        T.heads_to_linear_out(w, shape=(N, H, D + 1))


def test_transpose_and_convs():
    w = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(T.transpose_linear(w), [[0, 3], [1, 4], [2, 5]])
    c = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # O I kH kW
    assert T.conv_oihw_to_hwio(c)[1, 2, 0, 1] == c[1, 0, 1, 2]
    c3 = np.arange(2 * 3 * 2 * 2 * 2).reshape(2, 3, 2, 2, 2)
    assert T.conv3d_oidhw_to_dhwio(c3)[1, 0, 1, 2, 1] == c3[1, 2, 1, 0, 1]
    assert T.conv1d_oiw_to_wio(np.zeros((2, 3, 5))).shape == (5, 3, 2)


def test_split_qkv_gqa_unequal_parts():
    q, k, v = (RNG.standard_normal((n * H, D)) for n in (N, K, K))
    fused = np.concatenate([q, k, v])
    shapes = ((D, N, H), (D, K, H), (D, K, H))
    parts = T.compose(T.split_qkv, T.linear_to_heads)(fused, shape=shapes)
    for p, want, s in zip(parts, (q, k, v), shapes):
        np.testing.assert_array_equal(p, T.linear_to_heads(want, shape=s))
    eq = T.split_gate_up(np.arange(8).reshape(4, 2))
    np.testing.assert_array_equal(eq[1], [[4, 5], [6, 7]])
    with pytest.raises(ValueError, match="need 13 rows"):
        T.split_kv(np.zeros((12, 1)), shape=((6,), (7,)))


def test_rotary_permutation_hand_example_and_inverse():
    # one head of dim 4, interleaved pairs (x0,x1),(x2,x3) -> halves (x0,x2 | x1,x3)
    rows = np.array([10, 11, 12, 13, 20, 21, 22, 23])[:, None]  # 2 heads x H=4, one column
    half = T.permute_rotary_interleaved_to_half(rows, shape=(2, 4))
    np.testing.assert_array_equal(half[:, 0], [10, 12, 11, 13, 20, 22, 21, 23])
    np.testing.assert_array_equal(T.permute_rotary_half_to_interleaved(half, shape=(2, 4)), rows)
    f = functools.partial(T.permute_rotary_interleaved_to_half, head_dim=4)
    np.testing.assert_array_equal(f(rows), half)


def test_stacked_and_concat():
    ws = [RNG.standard_normal((N * H, D)) for _ in range(L)]
    out = T.stacked(T.linear_to_heads)(ws, shape=(L, D, N, H))
    for i in range(L):
        np.testing.assert_array_equal(out[i], ws[i].T.reshape(D, N, H))
    np.testing.assert_array_equal(T.stack([np.ones(2), np.zeros(2)]), [[1, 1], [0, 0]])
    np.testing.assert_array_equal(T.concat(np.ones((1, 2)), np.zeros((2, 2))).sum(axis=1), [2, 0, 0])


# ---------------------------------------------------------------- plans

def _toy():
    arrays = {"embed.weight": RNG.standard_normal((10, D)).astype(np.float32),
              "rot.inv_freq": np.ones(2, np.float32),
              "step": np.array(7, dtype=np.int64)}
    for i in range(2):
        arrays[f"layers.{i}.q.weight"] = RNG.standard_normal((N * H, D)).astype(np.float32)
        arrays[f"layers.{i}.norm.weight"] = RNG.standard_normal((D,)).astype(ml_dtypes.bfloat16)
    targets = {"embed/embedding": sds(10, D), "step": sds(dtype=jnp.int32)}
    for i in range(2):
        targets[f"layers_{i}/q/kernel"] = sds(D, N, H)
        targets[f"layers_{i}/norm/scale"] = sds(D)
    rules = [Rule("embed.weight", "embed/embedding", T.embedding),
             Rule("layers.{i}.q.weight", "layers_{i}/q/kernel", T.linear_to_heads),
             Rule("layers.{i}.norm.weight", "layers_{i}/norm/scale", T.norm_scale),
             Rule("step", "step"),
             Rule("*.inv_freq", None)]
    return arrays, targets, rules


def test_plan_executes_with_casts_and_never_reads_dropped():
    arrays, targets, rules = _toy()
    reader = DictReader(arrays)
    plan = build_plan(reader.tensors(), rules, targets)
    assert reader.reads == []  # planning reads no data
    params = plan.execute(reader, dtype="bfloat16")
    assert "rot.inv_freq" not in reader.reads and len(reader.reads) == 6
    q = params["layers_1"]["q"]["kernel"]
    assert q.dtype == ml_dtypes.bfloat16 and q.flags.c_contiguous
    np.testing.assert_array_equal(q, arrays["layers.1.q.weight"].T.reshape(D, N, H).astype(ml_dtypes.bfloat16))
    assert params["step"].dtype == np.int64  # integers are never cast
    f32 = plan.execute(DictReader(arrays), dtype="float32")
    assert f32["layers_0"]["norm"]["scale"].dtype == np.float32
    table = plan.table()
    assert "'layers.0.q.weight' (8, 6)" in table and "layers_0/q/kernel" in table and "linear_to_heads" in table
    assert any(line.split() == ["'rot.inv_freq'", "(2,)", "(dropped)"] for line in table.splitlines())


def _problems(sources, rules, targets):
    with pytest.raises(ConversionError) as ei:
        build_plan(sources, rules, targets)
    return ei.value, {(p.kind, p.name): p for p in ei.value.problems}


def test_every_problem_is_reported_at_once_with_candidates():
    arrays, targets, rules = _toy()
    sources = DictReader(arrays).tensors()
    del sources["layers.1.q.weight"]                      # missing tensor
    sources["layers.0.k.weight"] = ((N * H, D), "float32")  # extra tensor
    targets["layers_0/norm/scale"] = sds(D + 1)            # wrong shape
    rules.append(Rule("embed.weight", "embed/embedding"))  # duplicate match
    err, probs = _problems(sources, rules, targets)
    assert set(probs) == {("unmatched_source", "layers.0.k.weight"), ("unfilled_target", "layers_1/q/kernel"),
                          ("shape_mismatch", "layers_0/norm/scale"), ("ambiguous_source", "embed.weight")}
    # the extra tensor and the unfilled target name each other as the closest candidate
    assert probs[("unmatched_source", "layers.0.k.weight")].candidates[0] == "layers_1/q/kernel (6, 2, 4)"
    assert probs[("unfilled_target", "layers_1/q/kernel")].candidates[0] == "layers.0.k.weight (8, 6)"
    msg = str(err)
    assert "4 problem(s)" in msg
    assert ("layers_0/norm/scale: expected shape (7,), transform norm_scale of "
            "'layers.0.norm.weight' (6,) gives (6,)") in msg
    assert "embed.weight: matched by 2 rules" in msg
    assert "closest: layers.0.k.weight (8, 6)" in msg


def test_shape_mismatch_message_names_transform_and_source():
    sources = {"model.layers.0.self_attn.q_proj.weight": ((64, 64), "float32")}
    targets = {"decoder/layers_0/attn/q/kernel": sds(64, 8, 16)}
    rules = [Rule("model.layers.{i}.self_attn.q_proj.weight", "decoder/layers_{i}/attn/q/kernel", T.transpose_linear)]
    err, probs = _problems(sources, rules, targets)
    assert ("decoder/layers_0/attn/q/kernel: expected shape (64, 8, 16), transform transpose_linear of "
            "'model.layers.0.self_attn.q_proj.weight' (64, 64) gives (64, 64)") in str(err)
    rules = [Rule("model.layers.{i}.self_attn.q_proj.weight", "decoder/layers_{i}/attn/q/kernel", T.linear_to_heads)]
    err, probs = _problems(sources, rules, targets)  # the transform itself refuses: reported, not raised raw
    assert list(probs) == [("transform_error", "decoder/layers_0/attn/q/kernel")]
    assert "cannot turn a [N*H, D] weight of shape (64, 64) into [D, N, H] (64, 8, 16)" in str(err)


def test_duplicate_fill_and_unknown_target():
    sources = {"a.weight": ((4,), "float32"), "b.weight": ((4,), "float32"), "c.weight": ((4,), "float32")}
    targets = {"x/scale": sds(4), "y/scale": sds(4)}
    rules = [Rule("a.weight", "x/scale"), Rule("b.weight", "x/scale"), Rule("c.weight", "y/scael")]
    _, probs = _problems(sources, rules, targets)
    assert set(probs) == {("duplicate_target", "x/scale"), ("unknown_target", "y/scael"), ("unfilled_target", "y/scale")}
    assert probs[("unknown_target", "y/scael")].candidates[0] == "y/scale (4,)"


def test_fused_qkv_split_rule():
    q, k, v = (RNG.standard_normal((n * H, D)).astype(np.float32) for n in (N, K, K))
    arrays = {"l.0.qkv.weight": np.concatenate([q, k, v])}
    targets = {"l_0/q/kernel": sds(D, N, H), "l_0/k/kernel": sds(D, K, H), "l_0/v/kernel": sds(D, K, H)}
    rule = Rule("l.{i}.qkv.weight", ("l_{i}/q/kernel", "l_{i}/k/kernel", "l_{i}/v/kernel"),
                T.compose(T.split_qkv, T.linear_to_heads))
    params = flatten(build_plan(DictReader(arrays).tensors(), [rule], targets).execute(DictReader(arrays)))
    for name, w in zip("qkv", (q, k, v)):
        np.testing.assert_array_equal(params[f"l_0/{name}/kernel"], w.T.reshape(D, -1, H))
    # a wrong target count is caught on shapes
    bad = Rule("l.{i}.qkv.weight", ("l_{i}/q/kernel", "l_{i}/k/kernel"), T.compose(T.split_qkv, T.linear_to_heads))
    _, probs = _problems(DictReader(arrays).tensors(), [bad], {p: targets[p] for p in list(targets)[:2]})
    assert [p.kind for p in probs.values()] == ["transform_error"]


def test_stacking_rule_and_missing_layer():
    ws = [RNG.standard_normal((N * H, D)).astype(np.float32) for _ in range(L)]
    bs = [RNG.standard_normal((N * H,)).astype(np.float32) for _ in range(L)]
    arrays = {f"m.layers.{i}.q.weight": ws[i] for i in range(L)} | {f"m.layers.{i}.q.bias": bs[i] for i in range(L)}
    targets = {"dec/layers/q/kernel": sds(L, D, N, H), "dec/layers/q/bias": sds(L, N, H)}
    rules = [Rule("m.layers.{i}.q.weight", "dec/layers/q/kernel", T.stacked(T.linear_to_heads)),
             Rule("m.layers.{i}.q.bias", "dec/layers/q/bias", T.stacked(T.bias_to_heads))]
    plan = build_plan(DictReader(arrays).tensors(), rules, targets)
    assert "'m.layers.{0..2}.q.weight' (8, 6) x3" in plan.table()
    p = plan.execute(DictReader(arrays))["dec"]["layers"]["q"]
    for i in range(L):
        np.testing.assert_array_equal(p["kernel"][i], ws[i].T.reshape(D, N, H))
        np.testing.assert_array_equal(p["bias"][i], bs[i].reshape(N, H))
    del arrays["m.layers.1.q.weight"]
    _, probs = _problems(DictReader(arrays).tensors(), rules, targets)
    assert list(probs) == [("missing_source", "m.layers.1.q.weight")]


def test_several_sources_into_one_target():
    k, v = RNG.standard_normal((K * H, D)), RNG.standard_normal((K * H, D))
    arrays = {"a.0.k.weight": k, "a.0.v.weight": v}
    targets = {"a_0/kv/kernel": sds(D, 2 * K * H)}
    rule = Rule(("a.{i}.k.weight", "a.{i}.v.weight"), "a_{i}/kv/kernel", T.compose(T.concat, T.transpose_linear))
    out = build_plan(DictReader(arrays).tensors(), [rule], targets).execute(DictReader(arrays))
    np.testing.assert_array_equal(out["a_0"]["kv"]["kernel"], np.concatenate([k, v]).T)
    del arrays["a.0.v.weight"]
    _, probs = _problems(DictReader(arrays).tensors(), [rule], targets)
    assert list(probs) == [("missing_source", "a.0.v.weight")]


def test_user_lambda_without_shape_parameter():
    arrays = {"w": np.arange(6.0).reshape(2, 3)}
    plan = build_plan(DictReader(arrays).tensors(), [Rule("w", "w/kernel", lambda x: x.T * 2)], {"w/kernel": sds(3, 2)})
    np.testing.assert_array_equal(plan.execute(DictReader(arrays))["w"]["kernel"], arrays["w"].T * 2)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(source="a.*.w", target="x"), r"'\*' is allowed only in drop rules"),
    (dict(source="a.w", target="x_{i}"), r"target placeholder\(s\) \['i'\] do not appear"),
    (dict(source=("a.{i}.w", "b.w"), target="x"), "same placeholders"),
    (dict(source="a.{i}.{j}.w", target="x"), "at most one placeholder"),
    (dict(source="a.{i.w", target="x"), "braces"),
    (dict(source="a.w", target="x", transform=3), "not callable"),
    (dict(source="a.w", target="/"), "none empty"),  # found by test_fuzz: flattened to ''
    (dict(source="a.w", target="x//kernel"), "none empty"),
])
def test_bad_rules_fail_at_construction(kwargs, pattern):
    with pytest.raises(ConversionError, match=pattern):
        Rule(**kwargs)


def test_placeholder_matches_only_decimal_indices():
    sources = {"layers.01.w": ((2,), "float32"), "layers.x.w": ((2,), "float32")}
    _, probs = _problems(sources, [Rule("layers.{i}.w", "l_{i}/w")], {"l_1/w": sds(2)})
    assert ("unmatched_source", "layers.01.w") in probs and ("unmatched_source", "layers.x.w") in probs


def test_flatten_unflatten_roundtrip():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert flatten(tree) == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert unflatten(flatten(tree)) == tree
    with pytest.raises(ConversionError, match="both a parameter and a parent"):
        unflatten({"a": 1, "a/b": 2})
    with pytest.raises(ConversionError, match="empty name"):
        unflatten({"a/": 1})
