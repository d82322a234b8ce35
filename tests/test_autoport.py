"""mmjax.autoport on parts no mmjax component covers (tests/autoport_parts.py), one test each:
fp32 outputs within 1e-5 of torch under jax.jit at two values of every dynamic dim; bf16 within
the bf16 row of tests/tolerances.py; an op outside the table named with its node and source
line before anything is written; a saved port loaded and run in a process without torch; the
graph file is JSON data. The whole vision tower as a composed VLM's vision side is
tests/test_autoport_vlm.py.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.export import Dim

import mmjax
from mmjax.kernels.policy import KernelPolicy
from mmjax.autoport.graph import eval_dim
from mmjax.errors import AutoportError, LoadError
from tests.autoport_parts import (AttentionPool, ConvStem, EinsumViTBlock, GatedCrossAttention, GridSampleHead,
                                  LatentResampler, OpZoo, Tower, randomize)
from tests.tolerances import tol

ROOT = Path(__file__).resolve().parents[1]
FP32 = 1e-5  # the bound for fp32 ports (tolerances.py's vision_features row)
assert tol("float32", "vision_features") == FP32


def port_and_compare(module, arg_sets, dynamic_shapes, atol=FP32):
    """Port on the first arg set; every set (a different value of each dynamic dim) through one
    jax.jit of apply must match torch. Returns the port and each set's max |Δ| over its outputs."""
    ported = mmjax.autoport(module, arg_sets[0], dynamic_shapes)
    apply = jax.jit(ported.apply)
    errors = []
    for args in arg_sets:
        with torch.no_grad():
            want = module(*args)
        got = apply(ported.params, *[a.numpy() for a in args])
        err = 0.0
        for w, g in zip(_flat(want), _flat(got)):
            assert tuple(g.shape) == tuple(w.shape)
            w, g = w.float().numpy(), np.asarray(g, np.float32)
            assert (np.isnan(g) == np.isnan(w)).all()
            err = max(err, float(np.nanmax(np.abs(g - w))) if w.size else 0.0)
        errors.append(err)
    print(f"{type(module).__name__}: max |Δ| per shape {['%.1e' % e for e in errors]}")
    assert max(errors) <= atol
    return ported, errors


def _flat(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _dims_vary(arg_sets, dynamic_shapes: dict, names) -> None:
    """Each dynamic dim takes at least two values across the arg sets."""
    for name, axes in dynamic_shapes.items():
        i = names.index(name)
        for axis in axes:
            assert len({args[i].shape[axis] for args in arg_sets}) >= 2, (name, axis)


B, P, T = Dim("B", min=1, max=64), Dim("P", min=2, max=4096), Dim("T", min=2, max=4096)


def test_perceiver_resampler_without_ffn():
    torch.manual_seed(0)
    sets = [(torch.randn(2, 10, 32),), (torch.randn(3, 17, 32),)]
    dyn = {"media": {0: B, 1: P}}
    _dims_vary(sets, dyn, ["media"])
    ported, _ = port_and_compare(randomize(LatentResampler()), sets, dyn)
    assert ported.graph.inputs[0]["shape"] == ["B", "P", 32]
    assert set(ported.params) == set(LatentResampler().state_dict())


def test_conv_stem_groupnorm_silu():
    torch.manual_seed(1)
    H, W = Dim("H", min=8, max=512), Dim("W", min=8, max=512)
    sets = [(torch.randn(2, 3, 16, 24),), (torch.randn(1, 3, 32, 20),)]
    dyn = {"x": {0: B, 2: H, 3: W}}
    _dims_vary(sets, dyn, ["x"])
    ported, _ = port_and_compare(randomize(ConvStem()), sets, dyn)
    ops = ported.graph.op_counts()
    assert ops["aten.group_norm.default"] == 2 and ops["aten.silu.default"] == 2
    # the token count is an expression of H and W, kept symbolic in the graph
    tokens = ported.graph.nodes[-1]["out"]["shape"][1]
    assert "H" in tokens and "W" in tokens and eval_dim(tokens, {"H": 16, "W": 24}) == 4 * 6


def test_gated_cross_attention_tanh_gates():
    torch.manual_seed(2)
    sets = [(torch.randn(2, 5, 32), torch.randn(2, 7, 24)), (torch.randn(3, 9, 32), torch.randn(3, 4, 24))]
    dyn = {"x": {0: B, 1: T}, "media": {0: B, 1: P}}
    _dims_vary(sets, dyn, ["x", "media"])
    ported, _ = port_and_compare(randomize(GatedCrossAttention()), sets, dyn)
    assert ported.graph.op_counts()["aten.tanh.default"] == 2
    assert "aten.scaled_dot_product_attention.default" in ported.graph.op_counts()  # -> mmjax's attention


def test_attention_pooling_learned_query():
    torch.manual_seed(3)
    sets = [(torch.randn(2, 9, 32), torch.rand(2, 9) > 0.3), (torch.randn(4, 5, 32), torch.rand(4, 5) > 0.3)]
    for _, mask in sets:
        mask[:, 0] = True  # every row sees a patch (torch gives NaN for none, mmjax's kernels 0)
    dyn = {"x": {0: B, 1: P}, "mask": {0: B, 1: P}}
    _dims_vary(sets, dyn, ["x", "mask"])
    ported, _ = port_and_compare(randomize(AttentionPool()), sets, dyn)
    assert [i["dtype"] for i in ported.graph.inputs] == ["float32", "bool"]


def test_vit_block_einsum_and_sdpa():
    torch.manual_seed(4)
    sets = [(torch.randn(2, 9, 32),), (torch.randn(1, 33, 32),)]
    dyn = {"x": {0: B, 1: P}}
    _dims_vary(sets, dyn, ["x"])
    ported, _ = port_and_compare(randomize(EinsumViTBlock(layer_scale=0.5)), sets, dyn)
    ops = ported.graph.op_counts()
    assert ops["aten.einsum.default"] == 2 and ops["aten.scaled_dot_product_attention.default"] == 1


def test_vision_tower_and_its_attention_kernel_choice():
    torch.manual_seed(5)
    tower = randomize(Tower())
    sets = [(torch.randn(2, 3, 32, 32),), (torch.randn(5, 3, 32, 32),)]
    ported, _ = port_and_compare(tower, sets, {"pixels": {0: B}})
    # the attention implementation is the port's setting, passed to mmjax.kernels.attention
    pallas = jax.jit(dataclasses.replace(ported, kernels=KernelPolicy(attention_cpu="pallas")).apply)
    with torch.no_grad():
        want = tower(sets[0][0]).numpy()
    assert np.abs(np.asarray(pallas(ported.params, sets[0][0].numpy())) - want).max() <= FP32


def test_op_zoo_two_shapes():
    """Pooling, interpolation, pads, transposed/grouped convs, gathers, scatters, sorts, ..."""
    module = randomize(OpZoo())
    with torch.no_grad():
        module.bn.running_mean.normal_()
        module.bn.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(6)
    H, W, K = Dim("H", min=5, max=64), Dim("W", min=5, max=64), Dim("K", min=1, max=8)
    sets = [(torch.randn(2, 4, 6, 8), torch.randint(0, 2, (2, 3))),
            (torch.randn(3, 4, 10, 6), torch.randint(0, 3, (3, 5)))]
    dyn = {"x": {0: B, 2: H, 3: W}, "idx": {0: B, 1: K}}
    _dims_vary(sets, dyn, ["x", "idx"])
    ported, _ = port_and_compare(module, sets, dyn)
    assert "freqs" in ported.graph.constants  # a non-persistent buffer travels in the graph
    assert len(ported.graph.op_counts()) > 60


def test_bf16_within_the_bf16_row():
    """An fp32 export run with bf16 params and inputs, and (the tower) a module exported in bf16,
    against the torch module in bf16. The outputs reach |x| ~ 3 (bf16 ulp 0.0156 there), the
    scale of tolerances.py's "hidden" entry."""
    torch.manual_seed(7)
    for module, args in ((randomize(Tower()), (torch.randn(2, 3, 32, 32),)),
                         (randomize(LatentResampler()), (torch.randn(2, 16, 32),)),
                         (randomize(ConvStem()), (torch.randn(2, 3, 16, 16),))):
        bf16_module, bf16_args = copy.deepcopy(module).to(torch.bfloat16), [a.to(torch.bfloat16) for a in args]
        with torch.no_grad():
            want = bf16_module(*bf16_args).float().numpy()
        ports = [mmjax.autoport(module, args).astype(jnp.bfloat16)]
        if isinstance(module, Tower):
            ports.append(mmjax.autoport(bf16_module, tuple(bf16_args)))
        for ported in ports:
            got = jax.jit(ported.apply)(ported.params, *[jnp.asarray(a.numpy(), jnp.bfloat16) for a in args])
            assert got.dtype == jnp.bfloat16
            err = float(np.abs(np.asarray(got, np.float32) - want).max())
            print(f"{type(module).__name__} ({ported.graph.inputs[0]['dtype']} export) bf16 max |Δ| = {err:.3g} "
                  f"at max |x| = {np.abs(want).max():.2f}")
            assert err <= tol("bfloat16", "hidden")


def test_unknown_op_names_op_node_and_source_line(tmp_path):
    line = next(i for i, text in enumerate(inspect.getsource(GridSampleHead).splitlines())
                if "F.grid_sample(x" in text) + inspect.getsourcelines(GridSampleHead)[1]
    out = tmp_path / "port"
    with pytest.raises(AutoportError) as err:
        mmjax.autoport(GridSampleHead(), (torch.randn(1, 4, 6, 6), torch.rand(1, 3, 3, 2) * 2 - 1)).save(out)
    text = str(err.value)
    print(text)
    assert "GridSampleHead: 1 op(s) have no JAX lowering" in text
    assert "aten.grid_sampler_2d.default at node 'grid_sampler_2d'" in text
    assert f"autoport_parts.py:{line} in forward: sampled = F.grid_sample(x, grid, align_corners=False)" in text
    assert not out.exists()


def test_inputs_that_do_not_fit_the_port_are_named():
    ported = mmjax.autoport(randomize(LatentResampler()), (torch.randn(2, 10, 32),), {"media": {0: B, 1: P}})
    with pytest.raises(AutoportError, match=r"input 'media' has shape \(2, 10, 16\), the port takes \[B, P, 32\]"):
        ported(np.zeros((2, 10, 16), np.float32))
    with pytest.raises(AutoportError, match=r"dim 1 \(P\) = 1 is outside the range it was exported for \[2, 4096\]"):
        ported(np.zeros((2, 1, 32), np.float32))
    fixed = mmjax.autoport(randomize(LatentResampler()), (torch.randn(2, 10, 32),))  # no dynamic dims
    with pytest.raises(AutoportError, match=r"the port takes \[2, 10, 32\] \(dim 0 must be 2\)"):
        fixed(np.zeros((3, 10, 32), np.float32))


_LOAD_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
import jax, numpy as np
import mmjax
ported = mmjax.autoport.load(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(jax.jit(ported.apply)(ported.params, x)))
print(repr(ported))
"""


def test_save_load_round_trip_without_torch(tmp_path):
    module = randomize(LatentResampler())
    ported = mmjax.autoport(module, (torch.randn(2, 10, 32),), {"media": {0: B, 1: P}})
    folder = ported.save(tmp_path / "bridge")
    assert sorted(p.name for p in Path(folder).iterdir()) == ["graph.json", "params.safetensors"]
    graph = json.loads((tmp_path / "bridge" / "graph.json").read_text())  # data: JSON, no pickle, no code
    assert graph["format"] == "mmjax.autoport/1" and set(graph["params"]) == set(module.state_dict())
    x = np.random.default_rng(0).standard_normal((3, 21, 32)).astype(np.float32)  # a shape it was not exported at
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_TORCH, folder, tmp_path / "x.npy", tmp_path / "y.npy"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Ported(LatentResampler" in run.stdout
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert np.abs(np.load(tmp_path / "y.npy") - want).max() <= FP32
    with pytest.raises(LoadError, match="already exists"):
        ported.save(folder)


def test_load_names_a_bad_folder(tmp_path):
    ported = mmjax.autoport(randomize(EinsumViTBlock()), (torch.randn(1, 4, 32),))
    folder = Path(ported.save(tmp_path / "block"))
    graph = json.loads((folder / "graph.json").read_text())
    graph["nodes"][3]["op"] = "aten.not_a_real_op.default"
    (folder / "graph.json").write_text(json.dumps(graph))
    with pytest.raises(LoadError, match=r"no lowering for .*aten.not_a_real_op.default \(node '"):
        mmjax.autoport.load(folder)
    with pytest.raises(LoadError, match="no graph.json here"):
        mmjax.autoport.load(tmp_path)
