"""converters.torch2flax end to end on a toy 2-layer family: the written folder, and the
guarantees (dry run writes nothing, existing output refused, failures leave no output, the
source is never modified)."""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import converters.writer as writer
from converters.families import register_rules
from converters import transforms as T
from converters.rules import Rule, flatten
from converters.torch2flax import convert, main
from mmjax import registry
from mmjax.checkpoint import param_shapes, restore_params
from mmjax.errors import CheckpointError, ConversionError, UnknownModelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab: int = 11
    dim: int = 8    # D
    heads: int = 2  # N
    head_dim: int = 4  # H
    layers: int = 2  # L

    @classmethod
    def from_hf(cls, c):
        return cls(c["vocab_size"], c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["num_hidden_layers"])


class ToyBlock(nn.Module):
    cfg: ToyConfig

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        c = self.cfg
        h = nn.RMSNorm(name="norm")(x)
        q = nn.DenseGeneral((c.heads, c.head_dim), use_bias=False, name="q")(h)  # [B, T, N, H]
        return x + nn.DenseGeneral(c.dim, axis=(-2, -1), use_bias=False, name="o")(q)


class Toy(nn.Module):
    cfg: ToyConfig

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.cfg.vocab, self.cfg.dim, name="embed")(ids)
        for i in range(self.cfg.layers):
            x = ToyBlock(self.cfg, name=f"layers_{i}")(x)
        return nn.RMSNorm(name="final_norm")(x)

    def param_shapes(self):
        return jax.eval_shape(self.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]


def toy_rules(cfg):
    return [
        Rule("model.embed_tokens.weight", "embed/embedding", T.embedding),
        Rule("model.norm.weight", "final_norm/scale", T.norm_scale),
        Rule("model.layers.{i}.input_layernorm.weight", "layers_{i}/norm/scale", T.norm_scale),
        Rule("model.layers.{i}.self_attn.q_proj.weight", "layers_{i}/q/kernel", T.linear_to_heads),
        Rule("model.layers.{i}.self_attn.o_proj.weight", "layers_{i}/o/kernel", T.heads_to_linear_out),
        Rule("model.layers.{i}.self_attn.rotary_emb.inv_freq", None),
    ]


TOY = registry.Family(name="toy", config_from_hf=ToyConfig.from_hf, config_cls=ToyConfig, build=Toy)
register_rules("toy", toy_rules)  # the family's rules live on the converters side
SPEC = f"{__name__}:TOY"


def toy_tensors(cfg=ToyConfig(), seed=0):
    rng = np.random.default_rng(seed)
    D, NH = cfg.dim, cfg.heads * cfg.head_dim
    t = {"model.embed_tokens.weight": rng.standard_normal((cfg.vocab, D)),
         "model.norm.weight": rng.standard_normal(D)}
    for i in range(cfg.layers):
        t[f"model.layers.{i}.input_layernorm.weight"] = rng.standard_normal(D)
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.standard_normal((NH, D))
        t[f"model.layers.{i}.self_attn.o_proj.weight"] = rng.standard_normal((D, NH))
        t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = rng.standard_normal(cfg.head_dim // 2)
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_ckpt(folder, tensors=None, cfg=ToyConfig()):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else toy_tensors(cfg), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "toy", "vocab_size": cfg.vocab, "hidden_size": cfg.dim,
        "num_attention_heads": cfg.heads, "head_dim": cfg.head_dim, "num_hidden_layers": cfg.layers}))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


def tree_digest(folder):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, folder).encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
            h.update(str(os.stat(p).st_mtime_ns).encode())
    return h.hexdigest()


def leftovers(parent):
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


@pytest.fixture
def ckpt(tmp_path):
    return write_ckpt(tmp_path / "hf")


def test_convert_writes_a_complete_folder(ckpt, tmp_path):
    before = tree_digest(ckpt)
    out = tmp_path / "flax"
    s = convert(ckpt, out, model=SPEC, dtype="bfloat16", progress=False)
    assert tree_digest(ckpt) == before  # the source is only read
    assert (s.tensors, s.dropped, s.arrays) == (8, 2, 8)
    assert s.parameters == 11 * 8 + 8 + 2 * (8 + 64 + 64) and s.bytes == 2 * s.parameters
    assert "converted 8 tensors (2 dropped) into 8 arrays" in s.line()
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "mmjax_config.json", "params",
                                       "source_config.json", "tokenizer.json"]
    meta = json.loads((out / "mmjax_config.json").read_text())
    assert meta["family"] == "toy" and meta["family_spec"] == SPEC and meta["dtype"] == "bfloat16"
    assert ToyConfig(**meta["config"]) == ToyConfig()
    assert meta["source"]["format"] == "safetensors" and meta["source"]["files"] == ["model.safetensors"]
    assert (out / "source_config.json").read_text() == (ckpt / "config.json").read_text()
    params = flatten(restore_params(out / "params"))
    src = toy_tensors()
    np.testing.assert_array_equal(params["layers_1/q/kernel"],
                                  src["model.layers.1.self_attn.q_proj.weight"].T.reshape(8, 2, 4).astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(params["layers_0/o/kernel"],
                                  src["model.layers.0.self_attn.o_proj.weight"].T.reshape(2, 4, 8).astype(ml_dtypes.bfloat16))
    assert all(a.dtype == ml_dtypes.bfloat16 for a in params.values())
    # the converted params run in the module
    tree = jax.tree.map(jnp.asarray, restore_params(out / "params"))
    y = Toy(ToyConfig()).apply({"params": tree}, jnp.array([[1, 2, 3]]))
    assert y.shape == (1, 3, 8) and bool(jnp.isfinite(y.astype(jnp.float32)).all())
    assert leftovers(tmp_path) == []


def test_dry_run_writes_nothing(ckpt, tmp_path, capsys):
    assert main([str(ckpt), "--out", str(tmp_path / "flax"), "--model", SPEC, "--dry-run"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if "layers_0/q/kernel" in line)
    assert row == ["'model.layers.0.self_attn.q_proj.weight'", "(8,", "8)", "layers_0/q/kernel", "linear_to_heads",
                   "->", "(8,", "2,", "4)"]
    assert "nothing written (dry run)" in out
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_existing_out_refused_and_overwrite_replaces(ckpt, tmp_path, capsys):
    out = tmp_path / "flax"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([str(ckpt), "--out", str(out), "--model", SPEC, "--quiet"]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert main([str(ckpt), "--out", str(out), "--model", SPEC, "--quiet", "--overwrite"]) == 0
    assert "mmjax_config.json" in os.listdir(out) and "keep.txt" not in os.listdir(out)
    assert leftovers(tmp_path) == []


def test_failed_conversion_leaves_no_output(ckpt, tmp_path, capsys):
    tensors = toy_tensors()
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((16, 8), np.float32)
    bad = write_ckpt(tmp_path / "bad", tensors)
    assert main([str(bad), "--out", str(tmp_path / "flax"), "--model", SPEC, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.up_proj.weight (16, 8): no rule matches it" in err
    assert "layers_1/o/kernel (2, 4, 8): no rule fills it" in err
    assert not (tmp_path / "flax").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_mid_write_failure_leaves_no_output(ckpt, tmp_path, monkeypatch, exc):
    real = writer.shutil.copyfile

    def failing_copy(src, dst, *a, **k):  # params are on disk by now; the tokenizer copy fails
        if src.endswith("tokenizer.json"):
            assert os.path.isdir(os.path.join(os.path.dirname(dst), "params"))
            raise exc
        return real(src, dst, *a, **k)

    monkeypatch.setattr(writer.shutil, "copyfile", failing_copy)
    before = tree_digest(ckpt)
    if isinstance(exc, KeyboardInterrupt):
        assert main([str(ckpt), "--out", str(tmp_path / "flax"), "--model", SPEC, "--quiet"]) == 130
    else:
        with pytest.raises(OSError, match="disk full"):
            convert(ckpt, tmp_path / "flax", model=SPEC, progress=False)
    assert not (tmp_path / "flax").exists() and leftovers(tmp_path) == []
    assert tree_digest(ckpt) == before


def test_failed_overwrite_keeps_the_old_output(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "flax"
    convert(ckpt, out, model=SPEC, progress=False)
    before = tree_digest(out)
    monkeypatch.setattr(writer, "save_params", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        convert(ckpt, out, model=SPEC, progress=False, overwrite=True)
    assert tree_digest(out) == before and leftovers(tmp_path) == []


def test_config_json_problems(tmp_path):
    folder = write_ckpt(tmp_path / "hf")
    os.remove(folder / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        convert(folder, tmp_path / "o", model=SPEC)
    (folder / "config.json").write_text("{nope")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        convert(folder, tmp_path / "o", model=SPEC)
    (folder / "config.json").write_text('{"model_type": "toy"}')
    with pytest.raises(CheckpointError, match=r"config\.json: family 'toy' cannot read it: KeyError"):
        convert(folder, tmp_path / "o", model=SPEC)
    assert not (tmp_path / "o").exists()


def test_family_from_model_type_and_unknown_model(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", ())
    monkeypatch.setitem(registry._REGISTRY, "toy", TOY)
    s = convert(ckpt, tmp_path / "flax", progress=False)
    assert s.family == "toy" and (tmp_path / "flax" / "params").is_dir()
    cfg = json.loads((ckpt / "config.json").read_text())
    other = write_ckpt(tmp_path / "other")
    (other / "config.json").write_text(json.dumps(dict(cfg, model_type="nope")))
    with pytest.raises(UnknownModelError, match=r"unknown model_type 'nope'; supported: .*toy"):
        convert(other, tmp_path / "o2")
    with pytest.raises(UnknownModelError, match="cannot import"):
        convert(other, tmp_path / "o2", model="no_such_module_xyz:FAMILY")


def test_rules_file(ckpt, tmp_path):
    rules_py = tmp_path / "my_rules.py"
    rules_py.write_text(
        "from converters.rules import Rule\n"
        "from converters.transforms import linear_to_heads, heads_to_linear_out\n"
        "def RULES(cfg):\n"
        "    return [Rule('model.embed_tokens.weight', 'embed/embedding'),\n"
        "            Rule('model.norm.weight', 'final_norm/scale'),\n"
        "            Rule('model.layers.{i}.input_layernorm.weight', 'layers_{i}/norm/scale'),\n"
        "            Rule('model.layers.{i}.self_attn.q_proj.weight', 'layers_{i}/q/kernel', linear_to_heads),\n"
        "            Rule('model.layers.{i}.self_attn.o_proj.weight', 'layers_{i}/o/kernel', heads_to_linear_out),\n"
        "            Rule('*.inv_freq', None)]\n")
    s = convert(ckpt, tmp_path / "flax", model=SPEC, rules=str(rules_py), progress=False)
    assert s.tensors == 8
    meta = json.loads((tmp_path / "flax" / "mmjax_config.json").read_text())
    assert meta["source"]["rules"] == str(rules_py)
    rules_py.write_text("RULES = [1, 2]\n")
    with pytest.raises(ConversionError, match="RULES must be a list of converters.rules.Rule"):
        convert(ckpt, tmp_path / "flax2", model=SPEC, rules=str(rules_py))


def test_nonfinite_warns_or_fails_with_strict(tmp_path):
    tensors = toy_tensors()
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = np.nan
    folder = write_ckpt(tmp_path / "hf", tensors)
    with pytest.raises(CheckpointError, match=r"layers_1/q/kernel \(from model.layers.1.self_attn.q_proj.weight\): 1 NaN"):
        convert(folder, tmp_path / "strict", model=SPEC, strict=True, progress=False)
    assert not (tmp_path / "strict").exists()
    with pytest.warns(UserWarning, match="layers_1/q/kernel"):
        s = convert(folder, tmp_path / "lenient", model=SPEC, progress=False)
    assert s.nonfinite == [("layers_1/q/kernel", 1, 0)] and (tmp_path / "lenient" / "params").is_dir()


def test_output_inside_source_is_refused(ckpt):
    before = tree_digest(ckpt)
    for out in (ckpt, ckpt / "flax", ckpt.parent):
        with pytest.raises(ConversionError, match="must not be, contain, or lie inside"):
            convert(ckpt, out, model=SPEC, overwrite=True)
    assert tree_digest(ckpt) == before


def test_bin_checkpoint_and_float32_dtype(tmp_path):
    folder = tmp_path / "hf"
    write_ckpt(folder)
    os.remove(folder / "model.safetensors")
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in toy_tensors().items()}
    torch.save(sd, folder / "pytorch_model.bin")
    convert(folder, tmp_path / "flax", model=SPEC, dtype="float32", progress=False)
    shapes = flatten(param_shapes(tmp_path / "flax" / "params"))
    assert {str(s.dtype) for s in shapes.values()} == {"float32"}
    got = flatten(restore_params(tmp_path / "flax" / "params"))["embed/embedding"]
    np.testing.assert_array_equal(got, sd["model.embed_tokens.weight"].float().numpy())


def test_help(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--out", "--dtype", "--overwrite", "--dry-run", "--model", "--rules", "--strict"))


def test_cli_subprocess_dry_run(ckpt, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.dirname(__file__)]), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "converters.torch2flax", str(ckpt), "--dry-run",
                        "--model", "test_converter_cli:TOY"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "layers_1/o/kernel" in r.stdout and "heads_to_linear_out" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_checkpoint_roundtrip_shardings_and_errors(tmp_path):
    from mmjax.checkpoint import save_params
    from mmjax.errors import LoadError

    params = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
              "b": np.ones(4, ml_dtypes.bfloat16), "ids": np.arange(3, dtype=np.int32)}
    save_params(tmp_path / "p", params)
    shapes = param_shapes(tmp_path / "p")
    assert jax.tree.map(lambda s: (s.shape, str(s.dtype)), shapes) == {
        "a": {"kernel": ((2, 3), "float32")}, "b": ((4,), "bfloat16"), "ids": ((3,), "int32")}
    host = restore_params(tmp_path / "p")
    np.testing.assert_array_equal(host["a"]["kernel"], params["a"]["kernel"])
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    target["a"]["kernel"] = jax.ShapeDtypeStruct((2, 3), jnp.bfloat16, sharding=sharding)  # cast on restore
    dev = restore_params(tmp_path / "p", target)
    assert isinstance(dev["b"], jax.Array) and dev["b"].sharding == sharding
    assert dev["a"]["kernel"].dtype == jnp.bfloat16
    target["a"]["kernel"] = jax.ShapeDtypeStruct((3, 3), jnp.float32)
    del target["ids"]
    with pytest.raises(LoadError, match=r"a/kernel: expected shape \(3, 3\), checkpoint has \(2, 3\)") as ei:
        restore_params(tmp_path / "p", target)
    assert "ids: in the checkpoint, not expected by the model" in str(ei.value)
    with pytest.raises(LoadError, match="already exists"):
        save_params(tmp_path / "p", params)
    with pytest.raises(LoadError, match="no orbax checkpoint folder"):
        param_shapes(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("hi")
    with pytest.raises(LoadError, match="junk"):
        restore_params(tmp_path / "junk")
