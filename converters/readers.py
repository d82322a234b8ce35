"""Read PyTorch checkpoints one tensor at a time, trusting nothing in the files.

Formats (a folder, or one file given directly):
  model.safetensors                      one safetensors file
  model.safetensors.index.json + shards  sharded safetensors ("weight_map": name -> shard file)
  pytorch_model.bin / *.pt / *.pth       torch.save() state dict, loaded weights-only
  pytorch_model.bin.index.json + shards  sharded torch state dict

Safetensors headers are parsed here, not by the safetensors library: the library's numpy API
has no bfloat16, and a header we parse ourselves can be validated completely (lengths, JSON,
dtypes, offsets, overlaps) before a single tensor byte is trusted. Tensor data is then read
with one `readinto` per tensor; bfloat16 / float8 come back as ml_dtypes arrays, never through
a silent float32 round trip.

torch files go only through `torch.load(weights_only=True, mmap=True)`: the weights-only
unpickler refuses code and arbitrary objects, so a malicious .bin is rejected, never run.

Every problem raises mmjax.errors.CheckpointError naming the file (and the tensor).
"""
from __future__ import annotations

import glob
import json
import math
import os
import pickle
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from mmjax.errors import CheckpointError

__all__ = ["Checkpoint", "SafetensorsFile", "TorchFile", "open_checkpoint", "nonfinite"]

# safetensors dtype code -> numpy dtype. Data is little-endian by the format's definition.
_ST_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
# The safetensors library refuses headers above 100 MB; so do we (a random 8-byte prefix
# would otherwise ask us to read gigabytes of "header").
_MAX_HEADER = 100 * 1024 * 1024

TensorInfo = tuple[tuple[int, ...], str]  # (shape, numpy dtype name)


class SafetensorsFile:
    """One .safetensors file: header validated at open, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        # name -> (shape, dtype, begin, end); offsets are relative to the data section.
        self._entries, self._data_start = _parse_safetensors_header(path)
        self._fh = None

    def tensors(self) -> dict[str, TensorInfo]:
        return {n: (shape, dt.name) for n, (shape, dt, _, _) in self._entries.items()}

    def read(self, name: str) -> np.ndarray:
        try:
            shape, dt, begin, end = self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None
        if self._fh is None:
            self._fh = open(self.path, "rb")
        buf = np.empty(end - begin, dtype=np.uint8)
        self._fh.seek(self._data_start + begin)
        got = self._fh.readinto(memoryview(buf))
        if got != end - begin:
            raise CheckpointError(
                f"{self.path}: tensor {name!r}: read {got} of {end - begin} bytes; "
                "the file was truncated or changed after it was opened")
        return buf.view(dt).reshape(shape)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _parse_safetensors_header(path: str):
    """Validate the whole header of `path`.

    Returns ({name: (shape, dtype, begin, end)} in file order, offset of the data section)."""
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"{path}: file is {size} bytes, shorter than the 8-byte safetensors "
                              "header length: not a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds the file size of {size} bytes "
                                  "(truncated or not a safetensors file)")
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path}: header length {n} is above the 100 MB safetensors limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    data_len = size - 8 - n
    problems: list[str] = []
    entries: dict[str, tuple] = {}
    for name, e in header.items():
        if name == "__metadata__":
            if not isinstance(e, dict):
                problems.append(f"__metadata__ is a {type(e).__name__}, not an object")
            continue
        parsed = _parse_entry(name, e, data_len, problems)
        if parsed is not None:
            entries[name] = parsed
    spans = sorted((b, e_, n_) for n_, (_, _, b, e_) in entries.items() if e_ > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            problems.append(f"tensors {n0!r} (bytes {b0}..{e0}) and {n1!r} (bytes {b1}..{e1}) overlap")
    if problems:
        raise CheckpointError(f"{path}: invalid safetensors header:\n  " + "\n  ".join(problems))
    # File order, so a conversion reads each file front to back.
    return dict(sorted(entries.items(), key=lambda kv: kv[1][2])), 8 + n


def _parse_entry(name, e, data_len: int, problems: list[str]):
    if not isinstance(e, dict):
        problems.append(f"tensor {name!r}: entry is a {type(e).__name__}, not an object")
        return None
    code, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(code, str) or code not in _ST_DTYPES:
        problems.append(f"tensor {name!r}: unknown dtype {code!r} (known: {', '.join(_ST_DTYPES)})")
        return None
    if not (isinstance(shape, list) and all(_is_nonneg_int(d) for d in shape)):
        problems.append(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        return None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_nonneg_int(o) for o in offsets)):
        problems.append(f"tensor {name!r}: data_offsets {offsets!r} is not a pair of non-negative integers")
        return None
    begin, end = offsets
    dt = _ST_DTYPES[code]
    need = math.prod(shape) * dt.itemsize
    if begin > end or end > data_len:
        problems.append(f"tensor {name!r}: data_offsets [{begin}, {end}] out of range of the "
                        f"{data_len}-byte data section")
        return None
    if end - begin != need:
        problems.append(f"tensor {name!r}: data_offsets cover {end - begin} bytes but shape "
                        f"{tuple(shape)} of {code} needs {need}")
        return None
    return tuple(shape), dt, begin, end


def _is_nonneg_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class TorchFile:
    """A torch.save()d state dict, loaded weights-only and memory-mapped (no code runs)."""

    def __init__(self, path: str):
        self.path = path
        self._sd = _torch_load(path)

    def tensors(self) -> dict[str, TensorInfo]:
        return {n: (tuple(t.shape), _torch_dtype_name(self.path, n, t)) for n, t in self._sd.items()}

    def read(self, name: str) -> np.ndarray:
        try:
            t = self._sd[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None
        return _torch_to_numpy(self.path, name, t)

    def close(self) -> None:
        self._sd = {}


def _torch_load(path: str) -> dict:
    import torch

    try:
        try:
            obj = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as e:
            # Files from torch.save(_use_new_zipfile_serialization=False) cannot be mmapped;
            # they are still read by the same weights-only unpickler.
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, weights_only=True, mmap=False, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise CheckpointError(
                f"{path}: refusing to unpickle {os.path.basename(path)}: it contains code/objects "
                f"beyond tensors ({first[:200]}). Re-save it as a plain state dict of tensors or "
                "as safetensors.") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {e}") from None
    except Exception as e:  # zip/EOF/struct errors on corrupt files: all one kind of failure here
        raise CheckpointError(f"{path}: not a readable torch checkpoint: "
                              f"{type(e).__name__}: {str(e)[:300]}") from None
    return _state_dict(path, obj)


def _state_dict(path: str, obj) -> dict:
    import torch

    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        # Training checkpoints often wrap the weights: {"state_dict": {...}, "epoch": 3}.
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}")
    if not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: state dict keys must be strings")
    return dict(obj)


def _torch_dtype_name(path: str, name: str, t) -> str:
    import torch

    special = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn",
               torch.float8_e5m2: "float8_e5m2"}
    if t.dtype in special:
        return special[t.dtype]
    try:
        return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype).name
    except (TypeError, RuntimeError):
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, which mmjax cannot convert") from None


def _torch_to_numpy(path: str, name: str, t) -> np.ndarray:
    import torch

    t = t.detach()
    # numpy has no bfloat16/float8: reinterpret the bits through a same-width integer view.
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.float8_e5m2:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e5m2)
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, which mmjax cannot convert") from None


class Checkpoint:
    """All tensors of a checkpoint (one file or shards) behind one name -> tensor view."""

    def __init__(self, files: list, owner: dict[str, object], fmt: str, root: str):
        self.files = files          # SafetensorsFile / TorchFile objects
        self._owner = owner         # tensor name -> file object
        self.format = fmt
        self.root = root

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def tensors(self) -> dict[str, TensorInfo]:
        out = {}
        for f in self.files:
            out.update({n: info for n, info in f.tensors().items() if self._owner.get(n) is f})
        return out

    def read(self, name: str) -> np.ndarray:
        f = self._owner.get(name)
        if f is None:
            raise CheckpointError(f"{self.root}: checkpoint has no tensor {name!r}")
        return f.read(name)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(path: str) -> Checkpoint:
    """Open a checkpoint folder (or a single .safetensors / .bin / .pt file)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return _single(path, os.path.dirname(path) or ".")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    j = lambda n: os.path.join(path, n)  # noqa: E731
    if os.path.isfile(j("model.safetensors")):
        return _single(j("model.safetensors"), path)
    if os.path.isfile(j("model.safetensors.index.json")):
        return _sharded(j("model.safetensors.index.json"), SafetensorsFile, "safetensors-sharded")
    if os.path.isfile(j("pytorch_model.bin")):
        return _single(j("pytorch_model.bin"), path)
    if os.path.isfile(j("pytorch_model.bin.index.json")):
        return _sharded(j("pytorch_model.bin.index.json"), TorchFile, "torch-sharded")
    for pattern in ("*.safetensors", "*.pt", "*.pth", "*.bin"):
        found = sorted(glob.glob(j(pattern)))
        if len(found) == 1:
            return _single(found[0], path)
        if len(found) > 1:
            raise CheckpointError(f"{path}: several {pattern} files and no index.json to say how they "
                                  f"fit together: {', '.join(os.path.basename(f) for f in found)}")
    raise CheckpointError(f"{path}: no checkpoint found (looked for model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json, "
                          "*.safetensors, *.pt, *.pth, *.bin)")


def _single(file: str, root: str) -> Checkpoint:
    if file.endswith(".safetensors"):
        f, fmt = SafetensorsFile(file), "safetensors"
    else:
        f, fmt = TorchFile(file), "torch"
    return Checkpoint([f], {n: f for n in f.tensors()}, fmt, root)


def _sharded(index_path: str, cls, fmt: str) -> Checkpoint:
    root = os.path.dirname(index_path)
    try:
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index_path}: not valid JSON: {e}") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index_path}: needs a \"weight_map\" object of tensor name -> shard file")
    by_shard: dict[str, list[str]] = {}
    for name, shard in wm.items():
        by_shard.setdefault(shard, []).append(name)
    problems = []
    for shard, names in by_shard.items():
        full = os.path.normpath(os.path.join(root, shard))
        if os.path.isabs(shard) or os.path.relpath(full, root).split(os.sep)[0] == "..":
            problems.append(f"tensor {names[0]!r}: shard {shard!r} lies outside the checkpoint folder")
        elif not os.path.isfile(full):
            problems.append(f"tensor {names[0]!r} (and {len(names) - 1} more): shard {shard!r} does not exist")
    if problems:
        raise CheckpointError(f"{index_path}:\n  " + "\n  ".join(problems))
    files, owner = [], {}
    for shard, names in by_shard.items():
        f = cls(os.path.join(root, shard))
        have = f.tensors()
        files.append(f)
        missing = [n for n in names if n not in have]
        extra = [n for n in have if wm.get(n) != shard]
        problems += [f"tensor {n!r}: the index puts it in {shard!r}, which does not contain it" for n in missing]
        problems += [f"tensor {n!r}: {shard!r} contains it but the index does not list it there" for n in extra]
        owner.update({n: f for n in names if n in have})
    if problems:
        for f in files:
            f.close()
        raise CheckpointError(f"{index_path}:\n  " + "\n  ".join(problems))
    return Checkpoint(files, owner, fmt, root)


def nonfinite(arrays: Iterable[tuple[str, np.ndarray]]) -> list[tuple[str, int, int]]:
    """[(name, n_nan, n_inf)] for every floating array that holds NaN or Inf."""
    out = []
    for name, a in arrays:
        a = np.asarray(a)
        if a.dtype.kind in "iub" or _all_finite(a):
            continue
        n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())  # ml_dtypes registers these for bf16/fp8
        if n_nan or n_inf:
            out.append((name, n_nan, n_inf))
    return out


# The bits of +Inf: a float is NaN or Inf exactly when its bits without the sign reach them.
_INF_BITS = {np.dtype(np.float16): 0x7C00, np.dtype(ml_dtypes.bfloat16): 0x7F80,
             np.dtype(np.float32): 0x7F800000, np.dtype(np.float64): 0x7FF0000000000000}
_BLOCK = 1 << 20  # elements per pass: no temporary the size of the tensor


def _all_finite(a: np.ndarray) -> bool:
    """Integer max over the bits, ~10x faster than np.isfinite on 2-byte floats (which convert
    every element to float32 first). A transposed view is read in memory order, not copied."""
    inf = _INF_BITS.get(a.dtype)
    in_memory_order = a.transpose(sorted(range(a.ndim), key=lambda k: -a.strides[k]))
    flat = (in_memory_order if in_memory_order.flags.c_contiguous else np.require(a, requirements="C")).reshape(-1)
    if inf is None:  # float8 and others: isfinite, a block at a time
        return all(bool(np.isfinite(flat[i:i + _BLOCK]).all()) for i in range(0, flat.size, _BLOCK))
    bits = flat.view(f"u{a.dtype.itemsize}")
    magnitude = np.array((1 << (8 * a.dtype.itemsize - 1)) - 1, bits.dtype)  # every bit but the sign
    return all(int((bits[i:i + _BLOCK] & magnitude).max()) < inf for i in range(0, bits.size, _BLOCK))
