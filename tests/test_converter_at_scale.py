"""The converter at scale: parameters written as they are converted (peak memory a small multiple
of the largest tensor, whatever the model size), its time against a plain copy of the same bytes,
the default output folder, and the pieces that make it fast (tiled transposes, NaN/Inf through
the bits).

The slow test builds a >= 2 GB sharded safetensors LLaVA with 7B-wide Llama layers (hidden 4096,
intermediate 11008) and a tiny vision tower, written shard by shard from numpy, and converts it
in a subprocess that reports VmHWM against its RSS after imports."""
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from converters import transforms as T
from converters.readers import _all_finite, nonfinite
from converters.torch2flax import convert, default_out, main
import mmjax.checkpoint as C
from mmjax.checkpoint import restore_params, save_params
from mmjax.errors import ConversionError
from mmjax.tree import flatten_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


# ---------------------------------------------------------------- pieces

def test_views_are_gathered_a_chunk_at_a_time(tmp_path):
    """The converter hands save_params the transforms' views; each chunk is gathered (a
    transposed block in tiles) and the stored parameter equals the C-contiguous array."""
    rng = np.random.default_rng(0)
    views = {  # what the transforms return, and (tiled?) layouts they do not
        "transpose_linear": (T.transpose_linear(rng.standard_normal((1300, 900)).astype(np.float32)), True),
        "linear_to_heads": (rng.standard_normal((8 * 16, 1100)).astype(ml_dtypes.bfloat16).T.reshape(1100, 8, 16), True),
        "heads_to_linear_out": (rng.standard_normal((96, 8 * 16)).astype(np.float16).T.reshape(8, 16, 96), True),
        "size-1 axes": (rng.standard_normal((1, 40, 1, 30)).astype(np.float32).transpose(3, 2, 1, 0), True),
        "bool": ((rng.standard_normal((50, 3000)) > 0).T, True),
        "conv_oihw_to_hwio": (T.conv_oihw_to_hwio(rng.standard_normal((32, 3, 4, 4)).astype(np.float32)), False),
        "split rows": (rng.standard_normal((3000, 700)).astype(np.float32)[1000:2000], False),
        "strided": (rng.standard_normal((10, 10)).astype(np.float32)[:, ::2], False),
        "reversed": (rng.standard_normal((10, 10)).astype(np.float32)[::-1], False),
        "0-d": (np.asarray(np.float32(3)), False),
        "empty": (np.zeros((0, 5), np.float32).T, False),
    }
    for name, (a, tiled) in views.items():
        m = C._as_matrix(a)
        assert (m is not None and m.strides[0] < m.strides[1]) == tiled, name
        g = C._gather(a)
        assert g.flags.c_contiguous and g.shape == a.shape and g.dtype == a.dtype, name
        np.testing.assert_array_equal(g, a, err_msg=name)
    same = np.ones((3, 4), np.float32)
    assert C._gather(same) is same
    save_params(tmp_path / "p", ((k.replace(" ", "_"), a) for k, (a, _) in views.items()))
    got = flatten_params(restore_params(tmp_path / "p"))
    for k, (a, _) in views.items():
        np.testing.assert_array_equal(got[k.replace(" ", "_")], a, strict=True, err_msg=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nonfinite_through_the_bits(dtype):
    finfo = ml_dtypes.finfo(dtype)
    a = np.linspace(-100, 100, 3 << 20).astype(dtype)  # more than one block
    assert _all_finite(a) and _all_finite(np.array([finfo.max, -finfo.max, finfo.tiny, 0], dtype))
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[-1] = bad
        if np.isfinite(b[-1]):  # float8_e4m3fn has no Inf (it casts to NaN there)
            continue
        assert not _all_finite(b), bad
        assert nonfinite([("b", b)]) == [("b", int(np.isnan(b).sum()), int(np.isinf(b).sum()))]


# ---------------------------------------------------------------- default output folder

def test_default_output_is_beside_the_source(tiny_llava, tmp_path, capsys):
    src = tmp_path / "llava"
    shutil.copytree(tiny_llava.hf, src)
    assert default_out(str(src) + "/") == str(tmp_path / "llava-flax")
    s = convert(src, dry_run=True)
    assert s.out == str(tmp_path / "llava-flax") and sorted(os.listdir(tmp_path)) == ["llava"]
    assert main([str(src), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"-> {tmp_path / 'llava-flax'}")
    assert (tmp_path / "llava-flax" / "params" / "params_manifest.json").is_file()
    assert main([str(src), "--quiet"]) == 1  # refused: it exists now
    assert f"{tmp_path / 'llava-flax'}: already exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="already exists"):
        convert(src)
    assert convert(src, overwrite=True, progress=False).out == str(tmp_path / "llava-flax")
    assert sorted(os.listdir(tmp_path)) == ["llava", "llava-flax"]


# ---------------------------------------------------------------- at scale

LAYERS, VOCAB, HIDDEN, INTER = 4, 32000, 4096, 11008


def write_big_llava(folder, layers=LAYERS, shard_bytes=300 << 20) -> tuple[int, int]:
    """A LLaVA checkpoint with `layers` Llama layers of 7B width in float16, written shard by
    shard (only one shard's tensors in memory). Returns (total bytes, largest tensor bytes)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import LlavaForConditionalGeneration

    from mmjax.testing.checkpoints import tiny_llava_config

    cfg = tiny_llava_config(vocab_size=VOCAB, text_hidden=HIDDEN, text_layers=layers, heads=32, kv_heads=32,
                            inter=INTER, max_positions=4096)
    with torch.device("meta"):  # names and shapes, no memory
        shapes = {k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(cfg).state_dict().items()}
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(cfg.to_json_string())
    rng = np.random.default_rng(0)
    weight_map, shard, size = {}, {}, 0

    def flush():
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        weight_map.update({k: name for k in shard})

    for name, shape in shapes.items():
        # random bits with the top exponent bit cleared: finite float16 below 2 in magnitude,
        # and as incompressible as real weights' mantissas
        a = np.frombuffer(bytearray(rng.bytes(2 * int(np.prod(shape)))), np.uint16)
        a &= 0xBFFF
        if size + a.nbytes > shard_bytes and shard:
            flush()
            shard, size = {}, 0
        shard[name] = a.view(np.float16).reshape(shape)
        size += a.nbytes
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    sizes = [int(np.prod(s)) * 2 for s in shapes.values()]
    return sum(sizes), max(sizes)


_CONVERT_WORKER = """
import json, sys, time
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
from converters.torch2flax import convert
import numpy, jax, tensorstore, ml_dtypes, tqdm, mmjax.checkpoint  # what a conversion imports
base = status("VmRSS")
t = time.perf_counter()
s = convert(sys.argv[1], sys.argv[2], progress=False)
print("RESULT " + json.dumps({"base": base, "peak": status("VmHWM"), "seconds": time.perf_counter() - t,
                              "bytes": s.bytes, "arrays": s.arrays}))
"""


def _copy_seconds(src, dst) -> float:
    """Read every byte of the checkpoint's files and write it once: a plain file copy."""
    os.makedirs(dst)
    t = time.perf_counter()
    buf = memoryview(bytearray(64 << 20))
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            while n := f.readinto(buf):
                g.write(buf[:n])
    return time.perf_counter() - t


@pytest.mark.slow
def test_convert_2gb_checkpoint_in_bounded_memory_and_time(tmp_path_factory):
    root = tmp_path_factory.mktemp("at_scale")
    src, out = root / "llava7b", root / "llava7b-flax"
    try:
        total, largest = write_big_llava(str(src))
        assert total >= 2 << 30 and largest == VOCAB * HIDDEN * 2
        # Both runs start with no dirty pages to write back (the checkpoint was just written), so
        # neither is throttled by the other's writeback; both read the source from the page cache.
        os.sync()
        copy_s = _copy_seconds(src, root / "copy")
        shutil.rmtree(root / "copy")
        os.sync()
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
        r = subprocess.run([sys.executable, "-c", _CONVERT_WORKER, str(src), str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])
        above, bound = res["peak"] - res["base"], 3 * largest + (256 << 20)
        report = {"checkpoint_mib": total >> 20, "largest_mib": largest >> 20, "peak_above_baseline_mib": above >> 20,
                  "bound_mib": bound >> 20, "convert_s": round(res["seconds"], 1), "copy_s": round(copy_s, 2),
                  "ratio": round(res["seconds"] / copy_s, 1)}
        print(json.dumps(report))  # pytest -s shows the measured numbers
        assert res["bytes"] > total - (1 << 20), report  # all but a few dropped vision tensors
        assert above <= bound, report
        # The goal is 2x; the transposes and the hashing the copy does not do bound it (0.9-2.3x
        # measured on the shared 2-core box, docs/converters.md). The bound leaves room for an idle
        # machine, where the copy gains most; the old converter took 55 s here.
        assert res["seconds"] <= 6 * copy_s + 5, report
        manifest = json.loads((out / "params" / "params_manifest.json").read_text())
        assert len(manifest["params"]) == res["arrays"]
        assert manifest["params"]["decoder/lm_head/kernel"]["shape"] == [HIDDEN, VOCAB]
    finally:
        shutil.rmtree(root, ignore_errors=True)
