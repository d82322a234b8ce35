"""Save and restore parameter trees. The one module that touches orbax and tensorstore.

On disk, `params/` is what orbax's StandardCheckpointer writes: an OCDBT database holding one
zarr array per parameter (chunks of at most CHUNK_BYTES, named "a.b.kernel"), and `_METADATA`
(the tree). restore_params reads it through orbax, and can take a target tree of
jax.ShapeDtypeStruct whose `.sharding` is set: each array is then read straight into those
shardings, so every device receives only its own shard and no full host copy is made. Shapes are
checked against the stored metadata first, so a mismatch is reported by name instead of
surfacing as an orbax traceback.

Saving does not go through orbax: orbax writes a whole tree at once (after deep-copying it), so
a converter had to hold the model twice over. save_params takes the parameters one at a time
instead (a dict, or any iterable of (path, array) pairs) and writes each with tensorstore, in
the same layout, as soon as it arrives; the caller can drop it before producing the next.
Chunks are stored uncompressed (COMPRESSOR): orbax's zstd level 1 saved 7% on random-init float32
and float16 weights and 22% on bfloat16 (init_range 0.02), but reading a chunk back took 1.6x as
long, at every load and every verification.

Beside orbax's files, `params_manifest.json` records each parameter's dtype, shape and CRC-32;
writing it and verifying against it live in mmjax/checkpoint_manifest.py.
"""
from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
import shutil
import time
import uuid
import zlib
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np

from mmjax.checkpoint_manifest import MANIFEST, verify_params, verify_stored, write_manifest
from mmjax.errors import LoadError, MmjaxError

__all__ = ["save_params", "restore_params", "verify_params", "iter_params", "param_shapes", "CHUNK_BYTES",
           "MANIFEST"]

CHUNK_BYTES = 4 << 20
# Chunks in flight (being hashed, encoded, written) while the producer makes the next parameter:
# the writer's own share of memory, whatever the size of a parameter.
INFLIGHT_BYTES = 128 << 20
COMPRESSOR = None  # zarr v2 "compressor"; orbax's is {"id": "zstd", "level": 1} (module docstring)

# orbax's choices (serialization/tensorstore_utils.py), so the database reads like one it wrote.
_OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000}
_CONTEXT = {"file_io_concurrency": {"limit": 128}, "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}}
# No fsync per OCDBT commit (tensorstore's default): a parameter's metadata and each batch of its
# chunks commit separately, and the fsyncs took half the wall time of converting a model of ~300
# parameters (14.4 s -> 7.4 s). Neither a plain copy nor the rest of the converted folder is
# fsynced; after a crash, a checkpoint whose bytes did not reach the disk fails verification.
_WRITE_CONTEXT = {**_CONTEXT, "file_io_sync": False}
_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


class _Checkpointer:
    """orbax's StandardCheckpointer for reading; save streams (module docstring) and needs no
    orbax at all, so it is not even imported for a conversion."""

    def __init__(self):
        self._orbax = None

    def _ocp(self):
        if self._orbax is None:
            import orbax.checkpoint as ocp

            self._orbax = ocp.StandardCheckpointer()
        return self._orbax

    def save(self, path: str, params) -> dict:
        return _write(path, params)

    def metadata(self, path: str):
        return self._ocp().metadata(path)

    def restore(self, path: str, target=None):
        return self._ocp().restore(path, target)

    def close(self) -> None:
        if self._orbax is not None:
            self._orbax.close()


def _checkpointer() -> _Checkpointer:
    return _Checkpointer()


def save_params(path: str | os.PathLike, params: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict:
    """Write `params` as a checkpoint folder `path` (it must not exist); returns the manifest.

    params: a nested dict of numpy / jax arrays, or an iterable of ("a/b/kernel", array) pairs
    (a generator, typically): each array is written, and released by the writer, before the next
    is taken, so memory holds one parameter at a time. Synchronous: the checkpoint is complete
    on disk when this returns."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise LoadError(f"{path}: already exists; refusing to write a checkpoint over it")
    ck = _checkpointer()
    try:
        return ck.save(path, params)
    except BaseException as e:
        shutil.rmtree(path, ignore_errors=True)  # nothing, unless a save that is not ours left some
        if isinstance(e, MmjaxError) or not isinstance(e, Exception):
            raise  # the producer's own errors (a transform, a short read) and ours, and Ctrl-C, as they are
        raise LoadError(f"{path}: writing the orbax checkpoint failed: {type(e).__name__}: {e}") from e
    finally:
        ck.close()


def _items(params) -> Iterator[tuple[str, Any]]:
    if isinstance(params, Mapping):
        yield from _flat(params).items()
    else:
        yield from params


def _write(path: str, params) -> dict:
    """Write into a folder beside `path`, renamed to it at the end (as orbax does): a failure or
    Ctrl-C leaves no half checkpoint."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        manifest = _write_into(tmp, path, params)
        os.rename(tmp, path)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename


def _write_into(folder: str, path: str, params) -> dict:
    """Write the checkpoint's files into `folder`; errors name `path`, where it is going."""
    import tensorstore as ts

    ctx = ts.Context(_WRITE_CONTEXT)
    t0 = time.time_ns()
    manifest: dict[str, dict] = {}
    folders: set[tuple[str, ...]] = set()
    writes = _Writes(folder, path)
    try:
        for name, a in _items(params):
            _claim(path, name, manifest, folders)
            a = _host_array(name, a)
            _write_array(ctx, writes, name, a)
            manifest[name] = {"dtype": a.dtype.name, "shape": list(a.shape)}
            del a  # before the producer makes the next one
        writes.wait(None)
    finally:
        writes.close()
    keys = [tuple(n.split("/")) for n in manifest]
    _write_json(os.path.join(folder, "_METADATA"), {
        "tree_metadata": {str(k): {"key_metadata": [{"key": p, "key_type": 2} for p in k],
                                   "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
                          for k in sorted(keys)},
        "use_ocdbt": True, "use_zarr3": False, "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None})
    _write_json(os.path.join(folder, "_CHECKPOINT_METADATA"), {
        "item_handlers": _HANDLER, "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": t0,
        "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}})
    out = write_manifest(folder, manifest, writes.crcs)
    with open(os.path.join(folder, "commit_success.txt"), "w", encoding="utf-8") as f:
        f.write(f"Checkpoint commit was successful to {path}")
    return out


def _host_array(name: str, a) -> np.ndarray:
    a = np.asarray(a)  # a jax array comes to the host here, one at a time; a view stays a view
    if a.dtype.byteorder == ">":  # stored little-endian; hash what is stored
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def _claim(path: str, name, written: Mapping[str, Any], folders: set) -> None:
    """Refuse, before its bytes are written, a name orbax's layout cannot hold next to the others."""
    parts = tuple(name.split("/")) if isinstance(name, str) else ()
    why = None
    if not parts or not all(parts) or any("." in p for p in parts):
        why = "a parameter name is '/'-separated keys, none empty and none with '.' (orbax joins them with '.')"
    elif name in written:
        why = "given twice"
    elif parts in folders or any("/".join(parts[:i]) in written for i in range(1, len(parts))):
        why = "a parameter and a folder of parameters at once"
    if why:
        raise LoadError(f"{path}: parameter {name!r}: {why}")
    folders.update(parts[:i] for i in range(1, len(parts)))


def _write_json(file: str, obj) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _array_spec(path: str, name: str) -> dict:
    """Where orbax keeps parameter `name` ("a/b/kernel"): key "a.b.kernel" of the OCDBT database at path."""
    return {"driver": "zarr", "recheck_cached_data": False, "recheck_cached_metadata": False,
            "kvstore": {"driver": "ocdbt", "base": {"driver": "file", "path": path + "/"},
                        "path": name.replace("/", ".")}}


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> list[int]:
    """orbax's choice (arrays/subchunking.py): shrink the largest axis to its next smaller divisor
    until a chunk holds at most CHUNK_BYTES. A device restoring its shard then reads only the
    chunks it overlaps; with one chunk per tensor every process decoded the whole tensor."""
    chunk = [max(1, d) for d in shape]
    while math.prod(chunk) * itemsize > CHUNK_BYTES and max(chunk) > 1:
        i = max(range(len(chunk)), key=lambda k: chunk[k])  # the first of equal largest, as orbax
        chunk[i] = next(d for d in range(chunk[i] - 1, 0, -1) if max(1, shape[i]) % d == 0)
    return chunk


def _chunks(shape: tuple[int, ...], chunk: list[int]) -> list[tuple]:
    """Index tuples of the chunk grid, in C order (the order the manifest's CRC runs through them)."""
    if not shape:
        return [(...,)]  # a[()] of a 0-d array would be a numpy scalar
    return [tuple(slice(o, min(o + c, n)) for o, c, n in zip(origin, chunk, shape))
            for origin in itertools.product(*(range(0, n, c) for n, c in zip(shape, chunk)))]


def _bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)  # a C-contiguous block: a view, no copy


# A transposed block is gathered in tiles of 1024 rows x 8 (2-byte) or 16 (wider) columns, the
# fastest measured here (0.6-1.6 GB/s): a tile reads whole cache lines of a few source rows.
# numpy's own copy of a transposed view walks the source one element per row: 0.15-0.3 GB/s.
_TILE_ROWS = 1024


def _gather(block: np.ndarray) -> np.ndarray:
    """`block` (any strides) as a C-contiguous array: itself, or a copy."""
    if block.flags.c_contiguous:
        return block
    out = np.empty(block.shape, block.dtype)
    m = _as_matrix(block)
    if m is None or m.strides[0] >= m.strides[1]:  # rows of the source: numpy's copy is fine
        np.copyto(out, block)
        return out
    if block.itemsize in (1, 2, 4, 8):
        m = m.view(f"u{block.itemsize}")  # plain byte copies, whatever the float type
    o = out.reshape(m.shape).view(m.dtype)
    cols = 8 if m.itemsize <= 2 else 16
    for i in range(0, m.shape[0], _TILE_ROWS):
        for j in range(0, m.shape[1], cols):
            o[i:i + _TILE_ROWS, j:j + cols] = m[i:i + _TILE_ROWS, j:j + cols]
    return out


def _as_matrix(a: np.ndarray) -> np.ndarray | None:
    """`a` as a 2-D view with positive strides, once adjacent axes that stay adjacent in memory
    are merged (linear_to_heads' [D, N, H] view of a transposed [N*H, D] tensor becomes [D, N*H]),
    or None."""
    shape, strides = [], []
    for n, st in zip(a.shape, a.strides):
        if n == 1:
            continue
        if shape and strides[-1] == st * n:  # this axis continues the previous one in memory
            shape[-1], strides[-1] = shape[-1] * n, st
        else:
            shape.append(n)
            strides.append(st)
    if len(shape) != 2 or min(strides) <= 0:
        return None
    return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides, writeable=False)


class _Writes:
    """Work in flight, oldest first, at most INFLIGHT_BYTES of it: tensorstore writes chunks, and
    one helper thread runs their CRC-32s in order, while the producer makes the next parameter
    (zlib.crc32 and tensorstore both release the GIL)."""

    def __init__(self, folder: str, path: str):
        from concurrent.futures import ThreadPoolExecutor

        self.folder, self.path = folder, path  # written into; named in errors
        self.queue, self.bytes = collections.deque(), 0
        self.crcs: dict[str, int] = {}
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="mmjax-crc32")

    def add(self, name: str, write, block: np.ndarray | None = None) -> None:
        """A tensorstore write of `block` (hashed here), or of the array's metadata (block None)."""
        n = block.nbytes if block is not None else 0
        # The block goes in a list that _crc empties: the executor's work item keeps its arguments
        # until after the future is done, so the producer could make the next parameter while the
        # hasher thread still held this one (tests/test_params_checkpoint.py caught it, rarely).
        crc = self._hasher.submit(self._crc, name, [block]) if block is not None else None
        self.queue.append((name, write, crc, n))
        self.bytes += n

    def _crc(self, name: str, holder: list) -> None:  # one thread, in submission order
        block = holder.pop()
        self.crcs[name] = zlib.crc32(_bytes(block), self.crcs.get(name, 0))

    def wait(self, limit: int | None = None) -> None:
        """Until at most `limit` bytes are in flight (None: until nothing is)."""
        while self.queue and (limit is None or self.bytes > limit):
            name, write, crc, n = self.queue.popleft()
            self.bytes -= n
            if crc is not None:
                crc.result()
            try:
                write.result()
            except Exception as e:
                raise LoadError(f"{self.path}: writing parameter {name!r} failed: {type(e).__name__}: "
                                f"{_first_line(e)}") from e

    def close(self) -> None:
        """Also after a failure: let tensorstore stop touching the folder before the caller removes it."""
        for _, write, _, _ in self.queue:
            try:
                write.result()
            except Exception:
                pass
        self.queue.clear()
        self._hasher.shutdown(wait=True, cancel_futures=True)


def _write_array(ctx, writes: _Writes, name: str, a: np.ndarray) -> None:
    """Start writing one array (any strides), a chunk at a time, hashing it into writes.crcs[name]."""
    import tensorstore as ts

    chunk = _chunk_shape(a.shape, a.dtype.itemsize)
    spec = _array_spec(writes.folder, name)
    spec["kvstore"]["config"] = _OCDBT_CONFIG
    spec.update(dtype=a.dtype.name, store_data_equal_to_fill_value=True,
                metadata={"shape": list(a.shape), "chunks": chunk, "compressor": COMPRESSOR})
    try:  # chunks are written at once; the .zarray commits along with them (an OCDBT commit per
        # array opened with create=True, awaited, took 9 ms: 2.7 s for a model of 300 parameters)
        t = ts.open(spec, assume_metadata=True, context=ctx).result()
    except Exception as e:
        raise LoadError(f"{writes.path}: writing parameter {name!r} failed: {type(e).__name__}: {_first_line(e)}") from e
    writes.add(name, ts.open(spec, create=True, context=ctx))
    writes.crcs[name] = 0
    for idx in _chunks(a.shape, chunk):
        block = _gather(a[idx])  # what the chunk holds, in C order: tensorstore stores it as it is
        writes.add(name, t[idx].write(block, can_reference_source_data_indefinitely=True), block)
        writes.wait(INFLIGHT_BYTES)


def _metadata_tree(path: str) -> dict:
    if not os.path.isdir(path):
        raise LoadError(f"{path}: no orbax checkpoint folder here")
    ck = _checkpointer()
    try:
        md = ck.metadata(path)
    except Exception as e:
        raise LoadError(f"{path}: not a readable orbax checkpoint: {type(e).__name__}: {e}") from e
    finally:
        ck.close()
    item = getattr(md, "item_metadata", md)
    tree = getattr(item, "tree", item)
    if tree is None:  # orbax logs a warning and returns None when _METADATA / the manifest is unreadable
        raise LoadError(f"{path}: its orbax metadata (_METADATA, manifest.ocdbt) is missing or corrupt")
    if not isinstance(tree, Mapping):
        raise LoadError(f"{path}: not an orbax params checkpoint (its metadata holds a "
                        f"{type(tree).__name__}, not a dict of parameters)")
    return tree


def param_shapes(path: str | os.PathLike) -> dict:
    """Nested dict of jax.ShapeDtypeStruct as stored in the checkpoint (reads metadata only)."""
    path = os.path.abspath(os.fspath(path))
    return _to_sds(_metadata_tree(path), path)


def _to_sds(tree, path: str, prefix: str = ""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out[k] = _to_sds(v, path, f"{prefix}{k}/")
        elif hasattr(v, "shape") and hasattr(v, "dtype"):
            out[k] = jax.ShapeDtypeStruct(tuple(v.shape), v.dtype)
        else:
            raise LoadError(f"{path}: parameter {prefix}{k} has no array metadata ({type(v).__name__})")
    return out


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def iter_params(path: str | os.PathLike, *, verify: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """("a/b/kernel", numpy array) for every parameter of a checkpoint, read one at a time (what
    re-writing a converted model, e.g. quantizing it, streams through: memory holds one
    parameter). verify: check the stored bytes against params_manifest.json first."""
    import tensorstore as ts

    path = os.path.abspath(os.fspath(path))
    stored = _flat(param_shapes(path))
    if verify:
        verify_stored(path, stored)
    ctx = ts.Context(_CONTEXT)
    for name in stored:
        try:
            a = ts.open(_array_spec(path, name), open=True, context=ctx).result().read().result()
        except Exception as e:
            raise LoadError(f"{path}: parameter {name!r} cannot be read (truncated or corrupt data): "
                            f"{type(e).__name__}: {_first_line(e)}") from e
        yield name, a


def restore_params(path: str | os.PathLike, target: Mapping[str, Any] | None = None, *, verify: bool = True) -> dict:
    """Read a params tree written by save_params.

    target None: numpy arrays on the host. target a nested dict of jax.ShapeDtypeStruct (with
    .sharding, e.g. NamedSharding over a mesh) or arrays: each leaf is restored with that shape,
    dtype (cast if it differs from the stored one) and sharding, directly on the devices.
    A ShapeDtypeStruct without a sharding goes to this process's first local device.
    verify: check the stored bytes against params_manifest.json first (verify_params)."""
    path = os.path.abspath(os.fspath(path))
    stored = _flat(param_shapes(path))
    if target is not None:
        target = jax.tree.map(_with_sharding, dict(target))
        want = {p: tuple(v.shape) for p, v in _flat(target).items()}
        problems = [f"{p}: expected shape {s}, checkpoint has {stored[p].shape}"
                    for p, s in want.items() if p in stored and tuple(stored[p].shape) != s]
        problems += [f"{p}: expected by the model, missing from the checkpoint" for p in want if p not in stored]
        problems += [f"{p}: in the checkpoint, not expected by the model" for p in stored if p not in want]
        if problems:
            raise LoadError(f"{path}: parameters do not match the model:\n  " + "\n  ".join(problems))
    if verify:
        verify_stored(path, stored)
    ck = _checkpointer()
    try:
        return ck.restore(path, target)
    except Exception as e:
        raise _read_error(path, e) from e
    finally:
        ck.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0].split(" See full TensorStore details")[0][:300] if text else ""


def _read_error(path: str, e: Exception) -> LoadError:
    """TensorStore read errors embed a page of spec JSON; keep the parameter it names and one line."""
    text = str(e)
    # the parameter's key is the one relative kvstore 'path' (file paths are absolute)
    names = re.findall(r"'path': '([^'/][^']*?)/?'", text)
    if names:
        return LoadError(f"{path}: parameter {names[0]!r} cannot be read (truncated or corrupt data): "
                         f"{type(e).__name__}: {_first_line(e)}")
    return LoadError(f"{path}: restoring the orbax checkpoint failed: {type(e).__name__}: {_first_line(e)}")


def _with_sharding(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return leaf
