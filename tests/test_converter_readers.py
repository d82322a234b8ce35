"""converters.readers: every checkpoint format, bf16 bit-exactness, weights-only torch loading,
and validation of malformed safetensors (each case names the file and the tensor)."""
import builtins
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from converters.readers import nonfinite, open_checkpoint
from mmjax.errors import CheckpointError

RNG = np.random.default_rng(0)


def _arrays():
    return {
        "a.weight": RNG.standard_normal((4, 3)).astype(np.float32),
        "b.bias": RNG.standard_normal((5,)).astype(np.float16),
        "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d.mask": np.array([True, False]),
    }


def _check_same(ck, arrays):
    assert ck.tensors() == {n: (a.shape, a.dtype.name) for n, a in arrays.items()}
    for n, a in arrays.items():
        got = ck.read(n)
        assert got.dtype == a.dtype and got.shape == a.shape
        np.testing.assert_array_equal(got, a)


def test_single_safetensors(tmp_path):
    arrays = _arrays()
    np_save_file(arrays, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ck:
        assert ck.format == "safetensors"
        _check_same(ck, arrays)


def test_bf16_safetensors_is_bit_exact(tmp_path):
    t = torch.randn(3, 7, dtype=torch.float32).to(torch.bfloat16)
    f8 = torch.randn(4).to(torch.float8_e4m3fn)
    torch_save_file({"w": t, "f8": f8}, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ck:
        assert ck.tensors() == {"w": ((3, 7), "bfloat16"), "f8": ((4,), "float8_e4m3fn")}
        w = ck.read("w")
        assert w.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(w.view(np.int16), t.view(torch.int16).numpy())
        np.testing.assert_array_equal(ck.read("f8").view(np.uint8), f8.view(torch.uint8).numpy())


def _write_index(folder, name, shard_of):
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": shard_of}))


def test_sharded_safetensors(tmp_path):
    arrays = _arrays()
    names = list(arrays)
    np_save_file({n: arrays[n] for n in names[:2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    np_save_file({n: arrays[n] for n in names[2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    _write_index(tmp_path, "model.safetensors.index.json",
                 {n: f"model-0000{1 if k < 2 else 2}-of-00002.safetensors" for k, n in enumerate(names)})
    with open_checkpoint(tmp_path) as ck:
        assert ck.format == "safetensors-sharded" and len(ck.paths) == 2
        _check_same(ck, arrays)


def _torch_sd(arrays):
    return {n: torch.from_numpy(a.copy()) for n, a in arrays.items()}


def test_pytorch_bin_with_bf16(tmp_path):
    arrays = _arrays()
    sd = _torch_sd(arrays)
    bf = torch.randn(2, 5).to(torch.bfloat16)
    sd["e.bf16"] = bf
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ck:
        assert ck.format == "torch"
        assert ck.tensors()["e.bf16"] == ((2, 5), "bfloat16")
        got = ck.read("e.bf16")
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.view(np.int16), bf.view(torch.int16).numpy())
        for n, a in arrays.items():
            np.testing.assert_array_equal(ck.read(n), a)


def test_sharded_bin_and_single_pt_and_legacy_format(tmp_path):
    arrays = _arrays()
    names = list(arrays)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torch.save(_torch_sd({n: arrays[n] for n in names[:1]}), sharded / "pytorch_model-1.bin")
    torch.save(_torch_sd({n: arrays[n] for n in names[1:]}), sharded / "pytorch_model-2.bin")
    _write_index(sharded, "pytorch_model.bin.index.json",
                 {n: "pytorch_model-1.bin" if k == 0 else "pytorch_model-2.bin" for k, n in enumerate(names)})
    with open_checkpoint(sharded) as ck:
        assert ck.format == "torch-sharded"
        _check_same(ck, arrays)
    pt = tmp_path / "pt"
    pt.mkdir()
    torch.save(_torch_sd(arrays), pt / "weights.pt")
    with open_checkpoint(pt) as ck:
        _check_same(ck, arrays)
    legacy = tmp_path / "legacy"  # pre-zip format cannot be mmapped: still read weights-only
    legacy.mkdir()
    torch.save(_torch_sd(arrays), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with open_checkpoint(legacy) as ck:
        _check_same(ck, arrays)


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    arrays = _arrays()
    torch.save({"state_dict": _torch_sd(arrays), "epoch": 3}, tmp_path / "model.pt")
    with open_checkpoint(tmp_path) as ck:
        _check_same(ck, arrays)


class _Evil:
    """Unpickling this would run code that writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_bin_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "payload": _Evil(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*refusing to unpickle.*code/objects beyond tensors"):
        open_checkpoint(tmp_path)
    assert not marker.exists()


def test_bin_with_non_tensor_entries_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "note": "hello"}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"'note' \(str\)"):
        open_checkpoint(tmp_path)


# ---------------------------------------------------------------- malformed safetensors

def _st_bytes(header, data=b"", header_len=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    return struct.pack("<Q", n) + raw + data


def _entry(dtype="F32", shape=(2,), off=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(off)}


MALFORMED = {
    "short": (b"\x01\x02\x03", r"shorter than the 8-byte"),
    "header_beyond_file": (_st_bytes({"w": _entry()}, b"\0" * 8, header_len=10_000), r"header length 10000 exceeds"),
    "not_json": (_st_bytes(b"{not json"), r"not valid UTF-8 JSON"),
    "not_utf8": (_st_bytes(b"\xff\xfe\xfd"), r"not valid UTF-8 JSON"),
    "not_object": (_st_bytes([1, 2, 3]), r"JSON list, not an object"),
    "unknown_dtype": (_st_bytes({"w": _entry(dtype="F13")}, b"\0" * 8), r"tensor 'w': unknown dtype 'F13'"),
    "bad_shape": (_st_bytes({"w": _entry(shape=(2, -1))}, b"\0" * 8), r"tensor 'w': shape .* not a list"),
    "offsets_out_of_range": (_st_bytes({"w": _entry(off=(0, 80))}, b"\0" * 8), r"tensor 'w': data_offsets \[0, 80\] out of range"),
    "offsets_reversed": (_st_bytes({"w": _entry(off=(8, 0))}, b"\0" * 8), r"tensor 'w': data_offsets \[8, 0\] out of range"),
    "size_mismatch": (_st_bytes({"w": _entry(shape=(3,), off=(0, 8))}, b"\0" * 12), r"tensor 'w': data_offsets cover 8 bytes but shape \(3,\) of F32 needs 12"),
    "overlap": (_st_bytes({"w": _entry(off=(0, 8)), "v": _entry(off=(4, 12))}, b"\0" * 12), r"tensors 'w' .* and 'v' .* overlap"),
    "entry_not_object": (_st_bytes({"w": [1]}, b""), r"tensor 'w': entry is a list"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors(tmp_path, case):
    blob, pattern = MALFORMED[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=pattern) as ei:
        open_checkpoint(tmp_path).read("w")
    assert str(path) in str(ei.value)


def test_all_header_problems_are_listed_together(tmp_path):
    blob = _st_bytes({"w": _entry(dtype="X"), "v": _entry(off=(0, 99))}, b"\0" * 8)
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(tmp_path)
    assert "tensor 'w'" in str(ei.value) and "tensor 'v'" in str(ei.value)


@pytest.mark.parametrize("weight_map, pattern", [
    ({"a": "s1.safetensors", "b": "s3.safetensors"}, r"tensor 'b'.*shard 's3.safetensors' does not exist"),
    ({"a": "s1.safetensors", "b": "s1.safetensors"},
     r"tensor 'b': the index puts it in 's1.safetensors', which does not contain it"),
    ({"a": "s2.safetensors", "b": "s2.safetensors"},
     r"tensor 'a': the index puts it in 's2.safetensors'"),
    ({"a": "s1.safetensors", "b": "../s2.safetensors"}, r"tensor 'b': shard '../s2.safetensors' lies outside"),
])
def test_inconsistent_index(tmp_path, weight_map, pattern):
    np_save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "s1.safetensors"))
    np_save_file({"b": np.zeros(3, np.float32)}, str(tmp_path / "s2.safetensors"))
    _write_index(tmp_path, "model.safetensors.index.json", weight_map)
    with pytest.raises(CheckpointError, match=pattern) as ei:
        open_checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(ei.value)


def test_shard_tensor_missing_from_index(tmp_path):
    np_save_file({"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)}, str(tmp_path / "s1.safetensors"))
    _write_index(tmp_path, "model.safetensors.index.json", {"a": "s1.safetensors"})
    with pytest.raises(CheckpointError, match=r"tensor 'b': 's1.safetensors' contains it but the index does not list it"):
        open_checkpoint(tmp_path)


def test_index_not_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"index\.json: not valid JSON"):
        open_checkpoint(tmp_path)


def test_no_checkpoint_and_ambiguous_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(tmp_path)
    np_save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "x.safetensors"))
    np_save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CheckpointError, match=r"several \*\.safetensors files"):
        open_checkpoint(tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300), small_len=st.integers(0, 64), use_len=st.booleans())
def test_random_bytes_only_raise_checkpoint_error(tmp_path, blob, small_len, use_len):
    # With use_len the 8-byte prefix is a plausible header length, so the JSON/entry checks run too.
    data = struct.pack("<Q", min(small_len, len(blob))) + blob if use_len else blob
    for name in ("model.safetensors", "pytorch_model.bin"):
        folder = tmp_path / f"{name}-case"
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
        try:
            with open_checkpoint(folder) as ck:
                for n in ck.tensors():
                    ck.read(n)
        except CheckpointError:
            pass


def test_fuzzed_valid_header_values(tmp_path):
    # A valid file with each header byte flipped in turn: never anything but CheckpointError.
    np_save_file({"w": np.arange(4, dtype=np.float32)}, str(tmp_path / "good.safetensors"))
    good = (tmp_path / "good.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    folder = tmp_path / "f"
    folder.mkdir()
    for k in range(8, 8 + n):
        bad = bytearray(good)
        bad[k] ^= 0x5A
        (folder / "model.safetensors").write_bytes(bytes(bad))
        try:
            with open_checkpoint(folder) as ck:
                for name in ck.tensors():
                    ck.read(name)
        except CheckpointError:
            pass


def test_nonfinite_counts():
    a = np.array([1, np.nan, np.inf, -np.inf], np.float32)
    res = nonfinite([("x", a), ("y", a.astype(ml_dtypes.bfloat16)), ("ok", np.ones(3)), ("i", np.arange(3))])
    assert res == [("x", 1, 2), ("y", 1, 2)]


def test_file_path_directly(tmp_path):
    arrays = _arrays()
    np_save_file(arrays, str(tmp_path / "anything.safetensors"))
    with open_checkpoint(os.path.join(tmp_path, "anything.safetensors")) as ck:
        _check_same(ck, arrays)
