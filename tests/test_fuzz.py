"""Bounded fuzzing of everything that parses untrusted checkpoint data or user rules.

Complements tests/test_converter_readers.py (plain random bytes, and one flipped byte at a time
in a valid safetensors header) with inputs that get further into the parsers: structured
safetensors headers, index.json files over real shards, mutated torch zip files (one of them
carrying a code-running pickle payload), raw pickle streams, and random rules, names and shapes
for the rule engine. The contract checked on every example: nothing escapes but the project's
own error types (mmjax.errors.MmjaxError), a success returns exactly what the file declares,
no example runs past EXAMPLE_LIMIT_S (a SIGALRM bound, so a hang fails instead of stalling CI),
and the code-running payload never runs.
"""
import builtins
import contextlib
import json
import os
import pickle
import re
import signal
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from converters import transforms as T
from converters.readers import open_checkpoint
from converters.rules import Rule, build_plan, flatten
from mmjax.errors import ConversionError, MmjaxError

EXAMPLE_LIMIT_S = 10  # a hang detector: every example here takes milliseconds
# MMJAX_FUZZ_EXAMPLES=5000 for a deeper run by hand; the default keeps this file at a few seconds.
FUZZ = settings(max_examples=int(os.environ.get("MMJAX_FUZZ_EXAMPLES", 60)), deadline=5000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class ExampleTimeout(BaseException):
    """BaseException, so no `except Exception` in the code under test can swallow it."""


@contextlib.contextmanager
def time_limit(seconds=EXAMPLE_LIMIT_S):
    def on_alarm(signum, frame):
        raise ExampleTimeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except ExampleTimeout:
        raise AssertionError(f"example ran past {seconds} s: a hang") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_everything(folder):
    """Open and read every tensor; returns {name: array} or raises (only MmjaxError allowed)."""
    with time_limit():
        try:
            with open_checkpoint(folder) as ck:
                info = ck.tensors()
                got = {n: ck.read(n) for n in info}
        except MmjaxError as e:
            assert str(e), "an error without a message"
            return None
    for n, a in got.items():  # a success returns exactly what the header declares
        shape, dtype = info[n]
        assert a.shape == tuple(shape) and a.dtype.name == dtype, n
    return got


# ---------------------------------------------------------------- safetensors, structured

_CODES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "X9", "", "f32"]
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=5))
_dim = st.one_of(st.integers(0, 6), st.integers(-2, 2**40), st.booleans(), st.floats(0, 4), st.text(max_size=2))
_entry = st.fixed_dictionaries(
    {"dtype": st.one_of(st.sampled_from(_CODES), _json_scalar),
     "shape": st.one_of(st.lists(_dim, max_size=3), _json_scalar),
     "data_offsets": st.one_of(st.lists(st.one_of(st.integers(0, 200), st.integers(-5, 2**64), _json_scalar),
                                        min_size=0, max_size=3), _json_scalar)},
    optional={"extra": _json_scalar})
_header = st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(_entry, _json_scalar), max_size=5)


@FUZZ
@given(header=_header, meta=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), _json_scalar, max_size=2),
                                       _json_scalar),
       data=st.binary(max_size=200), pad=st.integers(0, 8), len_delta=st.sampled_from([0, 0, 0, 1, -1, 2**62]))
def test_structured_safetensors_headers(tmp_path, header, meta, data, pad, len_delta):
    if meta is not None:
        header = {**header, "__metadata__": meta}
    raw = json.dumps(header).encode() + b" " * pad
    n = max(0, len(raw) + len_delta) if len_delta != 2**62 else 2**62
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", n) + raw + data)
    read_everything(tmp_path)


# ---------------------------------------------------------------- index.json over real shards

_shard_name = st.one_of(st.sampled_from(["s1.safetensors", "s2.safetensors", "missing.safetensors", "../s1.safetensors",
                                         "/etc/hostname", "", ".", "sub", "s1.safetensors\0x", "./s1.safetensors"]),
                        st.text(max_size=6))
_tensor_name = st.sampled_from(["a", "b", "c", "a ", ""]) | st.text(max_size=4)
_index = st.one_of(
    st.fixed_dictionaries({"weight_map": st.dictionaries(_tensor_name, st.one_of(_shard_name, _json_scalar), max_size=4)},
                          optional={"metadata": _json_scalar}),
    st.recursive(_json_scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids,
                                                                                         max_size=3), max_leaves=8))


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    save_file({"a": np.arange(2, dtype=np.float32)}, str(root / "s1.safetensors"))
    save_file({"b": np.arange(3, dtype=np.int64), "c": np.ones((2, 2), np.float16)}, str(root / "s2.safetensors"))
    (root / "sub").mkdir()
    return root


@FUZZ
@given(index=_index, as_text=st.booleans(), garbage=st.binary(max_size=40))
def test_random_index_json(shard_folder, index, as_text, garbage):
    raw = json.dumps(index).encode() if as_text else garbage
    (shard_folder / "model.safetensors.index.json").write_bytes(raw)
    got = read_everything(shard_folder)
    if got is not None:  # only a consistent index opens: it names exactly the shards' tensors
        wm = index["weight_map"]
        assert set(got) == set(wm) and all(not os.path.isabs(wm[n]) for n in got)
        for n, a in got.items():
            want = {"a": np.arange(2, dtype=np.float32), "b": np.arange(3, dtype=np.int64),
                    "c": np.ones((2, 2), np.float16)}[n]
            np.testing.assert_array_equal(a, want)


# ---------------------------------------------------------------- torch files

class _Payload:
    """Unpickling this would write the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def torch_blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_src")
    marker = root / "MARKER"
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    torch.save(sd, root / "good.bin")
    torch.save({**sd, "x": _Payload(str(marker))}, root / "evil.bin")
    torch.save(sd, root / "legacy.bin", _use_new_zipfile_serialization=False)
    blobs = {k: (root / f"{k}.bin").read_bytes() for k in ("good", "evil", "legacy")}
    blobs["evil_raw"] = pickle.dumps({"w": _Payload(str(marker))}, protocol=2)
    return blobs, marker


_mutation = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6)


@FUZZ
@given(kind=st.sampled_from(["good", "evil", "legacy", "evil_raw"]), edits=_mutation,
       cut=st.one_of(st.none(), st.floats(0, 1)), name=st.sampled_from(["pytorch_model.bin", "model.pt"]))
def test_mutated_torch_files(tmp_path, torch_blobs, kind, edits, cut, name):
    blobs, marker = torch_blobs
    blob = bytearray(blobs[kind])
    for where, value in edits:
        blob[int(where * len(blob))] = value
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    (tmp_path / name).write_bytes(bytes(blob))
    read_everything(tmp_path)  # a mutation may still load (a changed name or value): that is fine
    assert not marker.exists(), "the pickle payload ran"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on odd protocol bytes
@FUZZ
@given(body=st.binary(max_size=120), proto=st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"PK\x03\x04"]))
def test_random_pickle_streams(tmp_path, body, proto):
    (tmp_path / "pytorch_model.bin").write_bytes(proto + body + b".")
    read_everything(tmp_path)


# ---------------------------------------------------------------- rule engine

# mostly well-formed pieces (so examples reach the plan), sometimes the malformed ones
_piece = st.sampled_from(["a", "b", "w", ".", ".", "{i}", "{j}", "{i}", "_", "9"] * 6 + ["*", "{", "}", "{0}", "{i.real}"])
_src_pattern = st.lists(_piece, min_size=1, max_size=6).map("".join)
_tgt_piece = st.sampled_from(["p", "q", "/", "/", "{i}", "{j}", "k"] * 6 + ["{", "}", "{0}", "{i!r}", "{i:>3}", "*"])
_tgt_path = st.lists(_tgt_piece, min_size=1, max_size=6).map("".join)
_TRANSFORMS = [T.identity, T.transpose_linear, T.norm_scale, T.linear_to_heads, T.stack, T.stacked(T.identity),
               T.concat, T.split_qkv, lambda x: x.T, lambda x: 1 / 0, lambda *xs, shape: xs]
_rule = st.builds(
    lambda src, tgt, tf: (src, tgt, tf),
    st.one_of(_src_pattern, st.lists(_src_pattern, min_size=1, max_size=2).map(tuple)),
    st.one_of(st.none(), _tgt_path, st.lists(_tgt_path, min_size=1, max_size=2).map(tuple)),
    st.sampled_from(_TRANSFORMS))
_name_piece = st.sampled_from(["a", "b", "w", ".", "0", "1", "2", "01", "_", "9", "{", "x"])
_name = st.lists(_name_piece, min_size=1, max_size=6).map("".join)
_shape = st.lists(st.integers(0, 5), max_size=3).map(tuple)
_path = st.lists(st.sampled_from(["p", "q", "k", "/", "0", "1", "2"]), min_size=1, max_size=6).map("".join)


def _instantiate(pattern, idx):
    """A name the pattern could match: each {name} -> an index, '*' -> some text."""
    out = re.sub(r"\{([A-Za-z_]\w*)\}", lambda m: str(idx.get(m.group(1), 0)), pattern)
    return out.replace("*", "x.y")


class _ZerosReader:
    def __init__(self, sources):
        self.sources = sources

    def read(self, name):
        shape, dtype = self.sources[name]
        return np.zeros(shape, dtype)


_small_shape = st.sampled_from([(), (2,), (3,), (2, 3), (3, 2), (4, 2), (2, 2, 3), (0, 2)])


@FUZZ
@given(rules=st.lists(_rule, min_size=1, max_size=5), data=st.data(),
       noise=st.dictionaries(_name, st.tuples(_shape, st.just("float32")), max_size=3),
       extra_targets=st.dictionaries(_path, _shape, max_size=2))
def test_random_rules_names_and_shapes(rules, data, noise, extra_targets):
    import jax

    # Names and targets drawn from the rules themselves, so most examples get past matching into
    # grouping, stacking, target formatting, shape checks and execution.
    sources, targets = dict(noise), dict(extra_targets)
    for src, tgt, _ in rules:
        for _ in range(data.draw(st.integers(0, 3))):
            idx = {"i": data.draw(st.integers(0, 2)), "j": data.draw(st.integers(0, 1))}
            shape = data.draw(_small_shape)
            for pat in (src,) if isinstance(src, str) else src:
                sources[_instantiate(pat, idx)] = (shape, data.draw(st.sampled_from(["float32", "bfloat16", "int32"])))
            for path in () if tgt is None else (tgt,) if isinstance(tgt, str) else tgt:
                targets[_instantiate(path, idx)] = data.draw(st.one_of(st.just(shape), _small_shape))
    with time_limit():
        try:
            built = [Rule(*r) for r in rules]
            tgt_sds = {p: jax.ShapeDtypeStruct(s, np.float32) for p, s in targets.items()}
            plan = build_plan(sources, built, tgt_sds)
            params = plan.execute(_ZerosReader(sources))
        except ConversionError as e:
            assert str(e), "an error without a message"
            return
    # a plan that builds fills every target exactly, with its declared shape
    flat = flatten(params)
    assert set(flat) == set(plan.targets)
    for p, a in flat.items():
        assert a.shape == tuple(plan.targets[p].shape), p
