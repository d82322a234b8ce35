"""mmjax.checkpoint: the streaming writer (orbax's StandardCheckpointer layout, one parameter at
a time), the CRC-32 manifest beside it, and the check restore_params / mmjax.load make with it.

A damaged byte is put where a parameter's bytes lie in the OCDBT data files: chunks are stored
uncompressed, so a window of the parameter's bytes is found verbatim. The converter at scale
(peak memory, time) is tests/test_convert_at_scale.py."""
import json
import os
import shutil
import subprocess
import sys
import weakref
import zlib

import jax
import ml_dtypes
import numpy as np
import pytest

import mmjax
import mmjax.checkpoint as C
from mmjax.checkpoint import MANIFEST, restore_params, save_params, verify_params
from mmjax.errors import LoadError
from mmjax.tree import flatten_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = "decoder/layers_1/mlp/up/kernel"  # a tiny LLaVA parameter to damage


def tree():
    rng = np.random.default_rng(0)
    return {"a": {"kernel": rng.standard_normal((300, 5000)).astype(np.float32)},  # 6 MB: two chunks
            "m": {"x": rng.standard_normal((7, 1100, 64)).astype(ml_dtypes.bfloat16)},
            "b": np.ones(4, ml_dtypes.bfloat16), "ids": np.arange(3, dtype=np.int32),
            "s": np.asarray(np.float32(2.5)), "flag": np.array([True, False])}


def flip_byte(params_dir, name: str) -> str:
    """Flip one bit in the middle of parameter `name`'s stored bytes; returns the file changed."""
    data = flatten_params(restore_params(params_dir, verify=False))[name].tobytes()
    needle = data[len(data) // 2: len(data) // 2 + 64]
    hits = []
    for root, _, files in os.walk(params_dir):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                at = fh.read().find(needle)
            if at >= 0:
                hits.append((os.path.join(root, f), at))
    assert len(hits) == 1, hits
    file, at = hits[0]
    with open(file, "r+b") as fh:
        fh.seek(at + 32)
        b = fh.read(1)[0]
        fh.seek(at + 32)
        fh.write(bytes([b ^ 0x10]))
    return file


def test_layout_is_orbax_standard_checkpointer(tmp_path):
    """The same tree through orbax's own StandardCheckpointer (how save_params wrote before) and
    through save_params: same tree metadata, same zarr arrays (but for compression), same values."""
    import orbax.checkpoint as ocp
    import tensorstore as ts

    params = tree()
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "orbax", params,
            save_args=jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=C.CHUNK_BYTES), params))
    ck.wait_until_finished()
    save_params(tmp_path / "ours", params)
    read = lambda d, f: json.loads((tmp_path / d / f).read_text())  # noqa: E731
    assert read("ours", "_METADATA") == read("orbax", "_METADATA")
    assert read("ours", "_CHECKPOINT_METADATA")["item_handlers"] == read("orbax", "_CHECKPOINT_METADATA")["item_handlers"]

    def zarrays(d):
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path / d}/"}).result()
        return {k: json.loads(kv.read(k).result().value) for k in kv.list().result() if k.endswith(b".zarray")}

    ours, theirs = zarrays("ours"), zarrays("orbax")
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for k in ours:
        assert ours[k]["compressor"] is None and theirs[k]["compressor"] == {"id": "zstd", "level": 1}
        assert {**ours[k], "compressor": None} == {**theirs[k], "compressor": None}, k
    assert ours[b"a.kernel/.zarray"]["chunks"] == [300, 2500]  # the largest axis halved: 3 MB, below 4 MiB
    a, b = ck.restore(tmp_path / "orbax"), restore_params(tmp_path / "ours")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, strict=True), a, b)
    ck.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_chunk_shapes_are_orbaxs(dtype):
    from orbax.checkpoint._src.arrays import subchunking

    dt = np.dtype(getattr(ml_dtypes, dtype, dtype))
    for shape in [(32000, 4096), (4096, 11008), (11008, 4096), (4096, 32, 128), (32, 128, 4096), (152064, 3584),
                  (3, 3, 3, 1024, 1024), (7, 13), (1 << 22,), (5, 999983), (2, 4096, 4096), (0, 5), ()]:
        want = subchunking.choose_chunk_shape(shape, shape, dt, C.CHUNK_BYTES)
        assert tuple(C._chunk_shape(shape, dt.itemsize)) == tuple(want), shape


def test_writer_holds_one_parameter_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "INFLIGHT_BYTES", 0)  # each write done before the next array is taken
    refs = []

    def produce():
        for i in range(4):
            a = np.full((512, 1024), i, np.float32)
            refs.append(weakref.ref(a))
            yield f"layers_{i}/w", a
            del a
            assert refs[-1]() is None, f"the writer still holds array {i} when array {i + 1} is made"

    manifest = save_params(tmp_path / "p", produce())
    assert list(manifest["params"]) == [f"layers_{i}/w" for i in range(4)]
    got = flatten_params(restore_params(tmp_path / "p"))
    assert [float(got[f"layers_{i}/w"][0, 0]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_manifest_records_dtype_shape_and_crc32(tmp_path):
    params = tree()
    returned = save_params(tmp_path / "p", params)
    manifest = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert manifest == returned and manifest["hash"] == "crc32"
    flat = flatten_params(params)
    assert set(manifest["params"]) == set(flat)
    for name, a in flat.items():  # chunk by chunk, in the order of the chunk grid
        chunk = C._chunk_shape(a.shape, a.itemsize)
        crc = 0
        for idx in C._chunks(a.shape, chunk):
            crc = zlib.crc32(a[idx].tobytes(), crc)
        assert manifest["params"][name] == {"dtype": a.dtype.name, "shape": list(a.shape), "crc32": f"{crc:08x}"}, name
    one_chunk = flat["m/x"]
    assert manifest["params"]["m/x"]["crc32"] == f"{zlib.crc32(one_chunk.tobytes()):08x}"
    assert C._chunks((300, 5000), C._chunk_shape((300, 5000), 4)) == [(slice(0, 300), slice(0, 2500)),
                                                                       (slice(0, 300), slice(2500, 5000))]
    assert verify_params(tmp_path / "p") == len(flat)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_flipped_byte_is_named_and_verify_false_skips(tmp_path):
    save_params(tmp_path / "p", tree())
    flip_byte(tmp_path / "p", "a/kernel")
    for check in (verify_params, restore_params):
        with pytest.raises(LoadError, match=r"/p: parameter 'a/kernel': its bytes do not match params_manifest\.json "
                                            r"\(crc32 [0-9a-f]{8}, recorded [0-9a-f]{8}\)"):
            check(tmp_path / "p")
    got = restore_params(tmp_path / "p", verify=False)  # orbax itself notices nothing
    want = tree()["a"]["kernel"]
    assert (got["a"]["kernel"] != want).sum() == 1


def test_manifest_missing_garbage_or_not_matching(tmp_path):
    save_params(tmp_path / "p", tree())
    manifest = (tmp_path / "p" / MANIFEST).read_text()
    os.remove(tmp_path / "p" / MANIFEST)  # a folder converted before the manifest existed
    assert verify_params(tmp_path / "p") == 0
    assert restore_params(tmp_path / "p")["ids"].tolist() == [0, 1, 2]
    (tmp_path / "p" / MANIFEST).write_text("{nope")
    with pytest.raises(LoadError, match=r"params_manifest\.json: unreadable .*verify=False"):
        restore_params(tmp_path / "p")
    edited = json.loads(manifest)
    edited["params"]["extra"] = edited["params"].pop("ids")
    edited["params"]["s"]["dtype"] = "float64"
    (tmp_path / "p" / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(LoadError, match="parameters do not match params_manifest.json") as ei:
        restore_params(tmp_path / "p")
    assert "ids: in the checkpoint, not in params_manifest.json" in str(ei.value)
    assert "extra: in params_manifest.json, not in the checkpoint" in str(ei.value)
    assert "s: params_manifest.json records float64 (), the checkpoint has float32 ()" in str(ei.value)


def test_names_orbax_cannot_hold_are_refused_and_nothing_is_left(tmp_path):
    cases = {"x, then x/y": [("x", np.ones(2)), ("x/y", np.ones(2))], "x/y, then x": [("x/y", np.ones(2)), ("x", np.ones(2))],
             "a dot": [("a.b", np.ones(1))], "empty part": [("a//b", np.ones(1))], "twice": [("x", np.ones(1))] * 2}
    for why, items in cases.items():
        with pytest.raises(LoadError, match=r"/p: parameter '[^']+': "):
            save_params(tmp_path / "p", iter(items))
        assert os.listdir(tmp_path) == [], why


def test_damaged_tiny_llava_is_refused_naming_the_parameter(tiny_llava, tmp_path):
    folder = tmp_path / "flax"
    shutil.copytree(tiny_llava.flax, folder)
    assert json.loads((folder / "params" / MANIFEST).read_text())["params"][LAYER]["dtype"] == "float32"
    flip_byte(folder / "params", LAYER)
    with pytest.raises(LoadError, match=rf"/params: parameter '{LAYER}': its bytes do not match") as ei:
        mmjax.load(folder)
    assert str(folder) in str(ei.value)
    model = mmjax.load(folder, verify=False)  # the caller's choice: loads the damaged weights
    assert model.checkpoint_params()["decoder"]["layers_1"]["mlp"]["up"]["kernel"].shape == (64, 128)


_MESH_WORKER = """
import json, sys
import jax
import mmjax
from mmjax.errors import LoadError
good, bad, name = sys.argv[1:]
model = mmjax.load(good, mesh="model:2")
emb = model.params["decoder"]["embed"]["embedding"]
try:
    mmjax.load(bad, mesh="model:2")
    error = None
except LoadError as e:
    error = str(e)
mmjax.load(bad, mesh="model:2", verify=False)
print("RESULT " + json.dumps({"devices": jax.device_count(), "shards": len(emb.addressable_shards),
                              "error": error}))
"""


def test_verification_with_a_mesh(tiny_llava, tmp_path):
    """The check reads the stored bytes on the host before orbax restores into the shards, so a
    sharded load is verified the same way (each process checks every parameter)."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llava.flax, bad)
    flip_byte(bad / "params", LAYER)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MMJAX_COMPILE_CACHE="0")
    r = subprocess.run([sys.executable, "-c", _MESH_WORKER, str(tiny_llava.flax), str(bad), LAYER], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["devices"] == 2 and res["shards"] == 2
    assert res["error"] is not None and f"parameter '{LAYER}': its bytes do not match" in res["error"]


_PEAK_WORKER = """
import json, sys
from mmjax.checkpoint import restore_params, verify_params
import orbax.checkpoint, tensorstore
def mib(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
base = mib("VmRSS")
verify_params(sys.argv[1]) if sys.argv[2] == "verify" else restore_params(sys.argv[1], verify=False)
print("RESULT " + json.dumps(mib("VmHWM") - base))
"""


def test_verification_holds_a_few_chunks_not_the_checkpoint(tmp_path):
    """verify_params reads a chunk at a time (one ahead), before the restore: its peak stays a
    few chunks whatever the checkpoint size, far from doubling the restore's."""
    rng = np.random.default_rng(0)
    save_params(tmp_path / "p", ((f"layers_{i}/w", rng.standard_normal((1024, 4096), dtype=np.float32))
                                 for i in range(8)))  # 8 x 16 MiB
    peaks = {}
    for mode in ("restore", "verify"):
        r = subprocess.run([sys.executable, "-c", _PEAK_WORKER, str(tmp_path / "p"), mode], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        peaks[mode] = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])
    print(peaks)  # measured: restore ~250 MiB, verify ~20-45 MiB (also on a 2 GB checkpoint)
    assert peaks["restore"] >= 128, peaks  # the arrays themselves
    assert peaks["verify"] <= 16 * C.CHUNK_BYTES / 2**20, peaks
