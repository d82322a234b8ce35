"""mmjax.sharding: rule tables, meshes, and multi-device / multi-process generation.

The main pytest process stays single-device: multi-device checks run tests/sharding_cases.py as
a script in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count set before JAX is
imported (one subprocess runs every mesh shape; the two-process test starts two more). Tolerance:
logits of a sharded run within 1e-5 of one device (partial sums are added in another order).
Any mesh must work: tiny LLaVA C and Qwen2-VL Q have head counts 8 does not divide.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from sharding_cases import ENCODER_DATA_MESH, MESHES, NEW_TOKENS, ODD_MESHES, ROOT

WORKERS = Path(__file__).with_name("sharding_cases.py")  # run as a script: `meshes` or `process`
LOGIT_TOL = 1e-5
# tiny LLaVAs: A has every split axis divisible by 8; C has 4 vision heads and 4 kv heads (8 decoder
# heads), so model:8 replicates the tower's attention and the k/v kernels; BIG has a 64 MiB
# embedding (tied: the largest tensor) for the loading checks.
TINY = dict(vocab_size=512, text_hidden=64, text_layers=2, heads=8, inter=128, vision_hidden=64,
            vision_heads=8, vision_inter=128, vision_layers=3)
CONFIGS = {"A": dict(TINY, kv_heads=8), "C": dict(TINY, kv_heads=4, vision_heads=4),
           "BIG": dict(TINY, vocab_size=32768, text_hidden=512, text_layers=1, kv_heads=8, inter=256, tie=True)}
# tiny Qwen2-VL: 6 vision heads (width 48) and the builder's 4 decoder heads / 2 kv heads: on
# model:8 even the decoder's q and o fall back; 6 heads split only on data:4,model:2.
QWEN = dict(vision_width=48, vision_heads=6)


# --------------------------------------------------------------------------------------------
# single-device unit tests (main process)
# --------------------------------------------------------------------------------------------
def fake_mesh(**axes):  # logical_to_spec / param_specs only read mesh.shape
    return types.SimpleNamespace(shape=dict(axes))


def test_parse_mesh_spec_and_errors():
    from mmjax.errors import InputError
    from mmjax.sharding import make_mesh, parse_mesh_spec

    assert parse_mesh_spec("data:2, model:4") == (("data", "model"), (2, 4))
    assert parse_mesh_spec("model:-1") == (("model",), (-1,))
    for bad, says in [("data=2", "'data=2' is not 'name:size'"), ("model:2,model:2", "appears twice"),
                      ("a:-1,b:-1", "only one axis may be -1"), ("model:0", "size 0")]:
        with pytest.raises(InputError, match=re.escape(says)):
            parse_mesh_spec(bad)
    with pytest.raises(InputError, match=r"needs 2 devices \(2\), only 1 are visible"):
        make_mesh("model:2")


def test_make_mesh_has_auto_axes():
    import jax
    from jax.sharding import AxisType

    from mmjax.sharding import make_mesh

    mesh = make_mesh("data:1,model:-1")
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    explicit = jax.make_mesh((1,), ("model",))  # this JAX's default: Explicit
    assert explicit.axis_types == (AxisType.Explicit,)
    assert make_mesh(explicit).axis_types == (AxisType.Auto,)


def test_logical_to_spec_split_replicate_and_errors():
    from jax.sharding import PartitionSpec as P

    from mmjax.sharding import Fallback, ShardingError, logical_to_spec

    mesh = fake_mesh(data=2, model=8)
    assert logical_to_spec("q", (64, 8, 8), "DNH", mesh) == P(None, "model")
    assert logical_to_spec("o", (8, 8, 64), "NHD", mesh) == P("model")
    assert logical_to_spec("k", (64, 2, 8), "DKH", mesh) == P()  # 2 kv heads on 8: replicated
    assert logical_to_spec("cache", (2, 48, 8, 8), "BSKH", mesh) == P("data", None, "model")
    assert logical_to_spec("cache", (1, 48, 8, 8), "BSKH", mesh) == P(None, None, "model")  # 1 row
    assert logical_to_spec("norm", (64,), None, mesh) == P()
    assert logical_to_spec("q", (64, 8, 8), "DNH", fake_mesh(data=8)) == P()  # no model axis
    found = []  # F=100 on 8 devices: kept whole, recorded; the caller logs it
    assert logical_to_spec("gate", (64, 100), "DF", mesh, fallbacks=found) == P()
    assert found == [Fallback(dim=1, letter="F", size=100, wanted=("model",), n=8)]
    found = []  # a letter over two mesh axes keeps the leading run that divides
    rules = {"I": ("data", "model")}
    assert logical_to_spec("px", (16, 3), ("I", None), mesh, rules, found) == P(("data", "model"))
    assert logical_to_spec("px", (6, 3), ("I", None), mesh, rules, found) == P("data")
    assert logical_to_spec("px", (3, 3), ("I", None), mesh, rules, found) == P()
    assert [(f.size, f.kept) for f in found] == [(6, ("data",)), (3, ())]
    with pytest.raises(ShardingError, match=re.escape("x: axis letter 'E' (dimension 1) is not in the legend")):
        logical_to_spec("x", (64, 8), "DE", mesh)
    assert logical_to_spec("x", (64, 8), "DE", mesh, {"E": "model"}) == P(None, "model")  # axis_rules adds E
    with pytest.raises(ShardingError, match=re.escape("x: rule axes 'DF' name 2 dimensions, the parameter "
                                                      "has shape (64, 8, 8)")):
        logical_to_spec("x", (64, 8, 8), "DF", mesh)
    with pytest.raises(ShardingError, match="both map to mesh axis 'model'"):
        logical_to_spec("x", (8, 8), "NF", mesh)


def _llava(**kw):
    from mmjax.families.llava import FAMILY
    from mmjax.testing.checkpoints import tiny_llava_config

    cfg = FAMILY.config_from_hf(tiny_llava_config(**kw).to_dict())
    return FAMILY, cfg, FAMILY.build(cfg).param_shapes()


def test_llava_table_covers_every_parameter():
    from jax.sharding import PartitionSpec as P

    from mmjax.sharding import param_specs
    from mmjax.tree import flatten_params

    family, cfg, shapes = _llava(**CONFIGS["A"])
    specs = param_specs(family.sharding(cfg), flatten_params(shapes), fake_mesh(data=2, model=4))
    assert set(specs) == set(flatten_params(shapes))
    want = {"decoder/embed/embedding": P("model"), "decoder/lm_head/kernel": P(None, "model"),
            "decoder/layers_0/attn/q/kernel": P(None, "model"), "decoder/layers_1/attn/v/kernel": P(None, "model"),
            "decoder/layers_0/attn/o/kernel": P("model"), "decoder/layers_0/mlp/up/kernel": P(None, "model"),
            "decoder/layers_1/mlp/down/kernel": P("model"), "decoder/final_norm/scale": P(),
            "vision/layers_0/attn/k/bias": P("model"), "vision/layers_1/mlp/fc2/kernel": P("model"),
            "vision/layers_1/mlp/fc2/bias": P(), "vision/patch_embed": P(), "projector/mlp/fc1/kernel": P()}
    assert {k: specs[k] for k in want} == want


def test_param_shardings_errors_name_the_parameter():
    import dataclasses

    from mmjax.sharding import ShardingError, param_specs
    from mmjax.sharding.rules import param_shardings
    from mmjax.tree import flatten_params

    family, cfg, shapes = _llava(**CONFIGS["A"])
    flat = flatten_params(shapes)
    with pytest.raises(ShardingError, match=r"no sharding rule matches decoder/final_norm/scale"):
        param_specs([(r"decoder/(?!final_norm).*", None), (r"vision/.*", None), (r"projector/.*", None)],
                    flat, fake_mesh(model=2), family_name="llava")
    with pytest.raises(ShardingError, match=re.escape("decoder/final_norm/scale (rule 'decoder/final_norm/scale'): "
                                                      "rule axes 'DD' name 2 dimensions, the parameter has shape "
                                                      "(64,)")):
        param_specs([(r"decoder/final_norm/scale", "DD"), (r".*", None)], flat, fake_mesh(model=2))
    with pytest.raises(ShardingError, match=re.escape("decoder/embed/embedding (rule 'decoder/embed/embedding'): "
                                                      "axis letter 'X' (dimension 0) is not in the legend")):
        param_specs([(r"decoder/embed/embedding", "XD"), (r".*", None)], flat, fake_mesh(model=2))
    with pytest.raises(ShardingError, match=re.escape("mm_encoder_tp_mode 'date' is not one of 'weights', 'data'")):
        param_specs(family.sharding(cfg), flat, fake_mesh(model=2), mm_encoder_tp_mode="date")
    bare = dataclasses.replace(family, name="bare", sharding=None)
    with pytest.raises(ShardingError, match="family 'bare' has no sharding rules"):
        param_shardings(bare, cfg, fake_mesh(model=2), flat)


def test_fallback_is_logged_once_per_table(caplog):
    from jax.sharding import PartitionSpec as P

    from mmjax.sharding import param_specs
    from mmjax.tree import flatten_params

    family, cfg, shapes = _llava(**CONFIGS["C"])
    flat = flatten_params(shapes)
    caplog.set_level(logging.INFO, logger="mmjax.sharding")
    specs = param_specs(family.sharding(cfg), flat, fake_mesh(model=8), family_name="llava")
    (rec,) = [r for r in caplog.records if r.name == "mmjax.sharding"]
    assert rec.levelno == logging.WARNING  # N fell back: not routine, unlike K
    msg = rec.getMessage()
    assert msg.startswith(f"llava on mesh model:8: 18 of {len(flat)} parameters are replicated"), msg
    assert "K=4 over model=8: decoder/layers_*/attn/k/kernel x2, decoder/layers_*/attn/v/kernel x2; " in msg
    assert "N=4 over model=8: " in msg and "vision/layers_*/attn/o/kernel x2" in msg
    assert specs["vision/layers_0/attn/q/kernel"] == P() and specs["vision/layers_0/attn/o/kernel"] == P()
    assert specs["vision/layers_0/mlp/fc1/kernel"] == P(None, "model")  # F=128 still splits
    assert specs["decoder/layers_0/attn/q/kernel"] == P(None, "model")

    caplog.clear()  # data:4,model:2 divides every split dimension: no line
    param_specs(family.sharding(cfg), flat, fake_mesh(data=4, model=2))
    assert not [r for r in caplog.records if r.name == "mmjax.sharding"]
    caplog.clear()
    param_specs(family.sharding(cfg), flat, fake_mesh(model=8), mm_encoder_tp_mode="data")
    (rec,) = [r for r in caplog.records if r.name == "mmjax.sharding"]
    assert rec.levelno == logging.INFO and "vision" not in rec.getMessage()  # only the routine K


def test_encoder_data_mode_replicates_the_tower_and_splits_images():
    from jax.sharding import AbstractMesh, AxisType
    from jax.sharding import PartitionSpec as P

    from mmjax.sharding import encoder_input_sharding, param_specs
    from mmjax.tree import flatten_params

    family, cfg, shapes = _llava(**CONFIGS["A"])
    flat = flatten_params(shapes)
    weights = param_specs(family.sharding(cfg), flat, fake_mesh(data=2, model=4))
    data = param_specs(family.sharding(cfg), flat, fake_mesh(data=2, model=4), mm_encoder_tp_mode="data")
    for path, spec in data.items():
        encoder = path.startswith(("vision/", "projector/"))
        assert spec == (P() if encoder else weights[path]), path
    assert weights["vision/layers_0/attn/q/kernel"] == P(None, "model")

    mesh = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    for mode, n, want in [("data", 8, P(("data", "model"))), ("data", 2, P("data")), ("data", 3, P()),
                          ("weights", 8, P("data")), ("weights", 3, P())]:
        assert encoder_input_sharding(mesh, (n, 3, 32, 32), mode).spec == want, (mode, n)
    assert encoder_input_sharding(mesh, (64, 1176), "data").spec == P(("data", "model"))  # Qwen2-VL patches


# --------------------------------------------------------------------------------------------
# multi-device (subprocess with 8 host devices)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from converters.torch2flax import convert
    from mmjax.testing.checkpoints import save_tiny_llava, tiny_llava_config
    from mmjax.testing.qwen_checkpoints import save_tiny_qwen2vl, tiny_qwen2vl_config

    root = tmp_path_factory.mktemp("sharding")
    out = {}
    for name, kw in CONFIGS.items():
        save_tiny_llava(root / f"{name}_hf", tiny_llava_config(**kw), seed=1)
        convert(root / f"{name}_hf", root / name, progress=False)
        out[name] = str(root / name)
    save_tiny_qwen2vl(root / "Q_hf", "qwen2_vl", tiny_qwen2vl_config("qwen2_vl", **QWEN), seed=1)
    convert(root / "Q_hf", root / "Q", progress=False)
    out["Q"] = str(root / "Q")
    return out


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HUB_OFFLINE="1",
               MMJAX_COMPILE_CACHE="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("MMJAX_COORDINATOR", "MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, "worker printed no RESULT line"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def mesh_results(folders):
    p = subprocess.run([sys.executable, str(WORKERS), "meshes", json.dumps(folders)], env=_env(8), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    res = _result(p.stdout)
    print(json.dumps(res["report"], indent=1))  # the measured numbers (pytest -s shows them)
    return res


@pytest.mark.slow
def test_sharded_generation_matches_one_device(mesh_results):
    ref = mesh_results["A"]["single"]
    for spec in MESHES:
        got = mesh_results["A"][spec]
        assert got["tokens"] == ref["tokens"], f"{spec}: greedy tokens differ from one device"
        assert got["max_dlogit"] < LOGIT_TOL, f"{spec}: max |dlogits| {got['max_dlogit']:.2e}"
    assert len(ref["tokens"]) == 2 and all(len(t) == NEW_TOKENS for t in ref["tokens"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["C", "Q"])
def test_any_mesh_generates_like_one_device(mesh_results, name):
    ref = mesh_results[name]["single"]
    for key in ODD_MESHES + (f"{ENCODER_DATA_MESH} data",):
        got = mesh_results[name][key]
        assert got["tokens"] == ref["tokens"], f"{name} {key}: greedy tokens differ from one device"
        assert got["max_dlogit"] < LOGIT_TOL, f"{name} {key}: max |dlogits| {got['max_dlogit']:.2e}"
    assert len(ref["tokens"]) == 2 and all(len(t) == NEW_TOKENS for t in ref["tokens"])


@pytest.mark.slow
def test_kv_heads_that_do_not_divide_are_replicated(mesh_results):
    c = mesh_results["C"]["model:8"]
    assert c["k_spec"] == "P()"  # 4 kv heads over 8 devices
    assert c["q_spec"] == "P(None, 'model')"
    assert c["cache_spec"] == "P()"
    assert mesh_results["A"]["data:2,model:4"]["cache_spec"] == "P('data', 'model')"  # [B, K, S, H]


@pytest.mark.slow
def test_heads_that_do_not_divide_fall_back_with_one_log_line(mesh_results):
    c, q = mesh_results["C"], mesh_results["Q"]
    # C on model:8: the 4-head tower's attention is whole on every device, its MLP still split
    assert (c["model:8"]["vision_q_spec"], c["model:8"]["vision_fc1_spec"]) == ("P()", "P(None, 'model')")
    ((level, line),) = c["model:8"]["log"]
    assert level == "WARNING" and "N=4 over model=8: vision/layers_*/attn/k/bias x2" in line, line
    assert "K=4 over model=8: decoder/layers_*/attn/k/kernel x2" in line, line
    assert c["data:4,model:2"]["log"] == [] and c["data:4,model:2"]["vision_q_spec"] == "P(None, 'model')"
    # Q on model:8: 4 decoder heads and 6 vision heads both fall back; on data:4,model:2 both split
    ((level, line),) = q["model:8"]["log"]
    assert "N=4 over model=8: decoder/layers_*/attn/o/kernel x2" in line and "N=6 over model=8: vision/" in line, line
    assert (q["model:8"]["q_spec"], q["model:8"]["vision_q_spec"]) == ("P()", "P()")
    assert q["data:4,model:2"]["vision_q_spec"] == "P(None, 'model')"
    assert q["data:2,model:4"]["vision_q_spec"] == "P()"  # 6 % 4


@pytest.mark.slow
def test_encoder_data_mode_replicates_the_tower(mesh_results):
    for name in ("C", "Q"):
        weights, data = mesh_results[name][ENCODER_DATA_MESH], mesh_results[name][f"{ENCODER_DATA_MESH} data"]
        assert (data["vision_q_spec"], data["vision_fc1_spec"]) == ("P()", "P()"), name
        assert data["q_spec"] == weights["q_spec"], name  # the decoder is split as before
        assert not any("vision/" in line for _, line in data["log"]), name
        # each device encodes its own images: 1/8 of them (LLaVA: 1 of 8 images, Qwen2-VL: 8 of 64
        # patches) instead of the 1/2 its `data` group holds; and the tower's all-reduces are gone
        assert data["tower_rows"] * 4 == weights["tower_rows"], (name, weights["tower_rows"], data["tower_rows"])
        assert (data["prefill_collectives"].get("all-reduce", 0)
                < weights["prefill_collectives"].get("all-reduce", 0)), (name, weights, data)


# which dimension of each parameter the LLaVA table splits over `model` (None: replicated),
# written out here independently of mmjax/families/composed.py
SPLIT_DIM = [(r"decoder/embed/embedding", 0), (r"decoder/lm_head/kernel", 1),
             (r".*/attn/[qkv]/kernel", 1), (r"vision/.*/attn/[qkv]/bias", 0), (r".*/attn/o/kernel", 0),
             (r"decoder/.*/mlp/(gate|up)/kernel", 1), (r"decoder/.*/mlp/down/kernel", 0),
             (r"vision/.*/mlp/fc1/kernel", 1), (r"vision/.*/mlp/fc1/bias", 0), (r"vision/.*/mlp/fc2/kernel", 0)]


@pytest.mark.slow
def test_every_shard_has_the_shape_its_rule_says(mesh_results):
    shards = mesh_results["A"]["data:2,model:4"]["shards"]  # path -> [global shape, shard shapes, devices]
    assert len(shards) == 62
    for path, (shape, shard_shapes, n_devices) in shards.items():
        dim = next((d for pat, d in SPLIT_DIM if re.fullmatch(pat, path)), None)
        want = list(shape)
        if dim is not None:
            want[dim] //= 4
        assert shard_shapes == [want], f"{path}: shards {shard_shapes}, expected {want} (split dim {dim})"
        assert n_devices == 8, path


@pytest.mark.slow
def test_decode_step_collectives(mesh_results):
    # Arrays all-reduced per step (tuple all-reduces counted per array).
    # Megatron split: o and down each end in an all-reduce of [B, 1, D] (2 per layer); one more
    # for the vocab-split embedding lookup and one (bool [B]) for the stop-token lookup; the
    # argmax over vocab shards all-gathers [B, model] values and indices. Nothing touches the cache.
    layers = CONFIGS["A"]["text_layers"]
    for spec in ("model:4", "data:2,model:4"):
        hlo = mesh_results["A"][spec]["decode_collectives"]
        assert hlo["counts"] == {"all-reduce": 2 * layers + 2, "all-gather": 2}, (spec, hlo)
        assert hlo["hidden_all_reduces"] == 2 * layers + 1, (spec, hlo)


@pytest.mark.slow
def test_load_restores_straight_into_shards(mesh_results):
    big = mesh_results["BIG"]
    V, D = CONFIGS["BIG"]["vocab_size"], CONFIGS["BIG"]["text_hidden"]
    assert big["embed_shards"] == [[V // 8, D]] and big["embed_devices"] == 8
    assert big["embed_mib"] == 64.0
    # orbax reads each device's slice; going through a full host copy first costs a copy more
    assert big["peak_sharded_mib"] < big["peak_host_then_shard_mib"], big


@pytest.mark.slow
def test_docs_examples_run(mesh_results):
    docs = mesh_results["docs"]
    assert docs["blocks"] == 3
    assert "P('model',)" in docs["stdout"]
    assert "P(('data', 'model'),)\nP('data',)" in docs["stdout"]


# --------------------------------------------------------------------------------------------
# two processes x 4 devices on localhost (gloo CPU collectives)
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_generate_like_one(folders, mesh_results):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(_env(4), MMJAX_COORDINATOR=f"127.0.0.1:{port}", MMJAX_NUM_PROCESSES="2",
                   MMJAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, str(WORKERS), "process", json.dumps(folders)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    results = [_result(out) for out, _ in outs]
    print(json.dumps(results))
    V, D = CONFIGS["BIG"]["vocab_size"], CONFIGS["BIG"]["text_hidden"]
    for r in results:
        assert (r["process_count"], r["devices"], r["local_devices"]) == (2, 8, 4)
        assert r["tokens"] == mesh_results["A"]["single"]["tokens"], f"process {r['pid']}"
        # each process holds only its 4 of the 8 embedding shards
        assert r["embed_local_shards"] == [[V // 8, D]] * 4 and not r["embed_fully_addressable"]
