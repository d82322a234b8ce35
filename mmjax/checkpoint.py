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

Beside orbax's files, `params_manifest.json` records each parameter's dtype, shape and CRC-32
of its bytes. orbax keeps no checksums, so a flipped bit in a chunk used to load silently;
restore_params(verify=True) reads every parameter back once and names the one that changed.
"""
from __future__ import annotations

import collections
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

from mmjax.errors import LoadError, MmjaxError

__all__ = ["save_params", "restore_params", "verify_params", "param_shapes", "CHUNK_BYTES", "MANIFEST"]

CHUNK_BYTES = 4 << 20
# Bytes handed to tensorstore per call (whole chunk rows), and how many may be in flight while the
# producer makes the next parameter: the writer's own share of memory stays near INFLIGHT_BYTES
# (plus tensorstore's encoded copy of it), whatever the size of a parameter.
SLAB_BYTES = 32 << 20
INFLIGHT_BYTES = 128 << 20
# Bytes verify_params reads at a time (whole chunk rows, at least one; one read ahead).
VERIFY_BYTES = 8 << 20
COMPRESSOR = None  # zarr v2 "compressor"; orbax's is {"id": "zstd", "level": 1} (module docstring)
MANIFEST = "params_manifest.json"
HASH = "crc32"  # zlib.crc32: ~3 GB/s here (sha256 1.4), releases the GIL; catches every burst of <= 32 flipped bits

# orbax's choices (serialization/tensorstore_utils.py), so the database reads like one it wrote.
_OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000}
_CONTEXT = {"file_io_concurrency": {"limit": 128}, "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}}
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

    ctx = ts.Context(_CONTEXT)
    t0 = time.time_ns()
    manifest: dict[str, dict] = {}
    folders: set[tuple[str, ...]] = set()
    writes = _Writes(folder, path)
    try:
        for name, a in _items(params):
            _claim(path, name, manifest, folders)
            a = _host_array(name, a)
            crc = _write_array(ctx, writes, name, a)
            manifest[name] = {"dtype": a.dtype.name, "shape": list(a.shape), HASH: f"{crc:08x}"}
            del a  # before the producer makes the next one
        writes.wait()
    except BaseException:
        writes.drain()
        raise
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
    out = {"format": 1, "hash": HASH, "params": manifest}
    _write_json(os.path.join(folder, MANIFEST), out)
    with open(os.path.join(folder, "commit_success.txt"), "w", encoding="utf-8") as f:
        f.write(f"Checkpoint commit was successful to {path}")
    return out


def _host_array(name: str, a) -> np.ndarray:
    a = np.asarray(a)  # a jax array comes to the host here, one at a time
    if a.dtype.byteorder == ">":  # stored little-endian; hash what is stored
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.require(a, requirements="C")  # np.require keeps 0-d arrays 0-d


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


def _slabs(shape: tuple[int, ...], chunk0: int, row_bytes: int, limit: int) -> list[tuple]:
    """Index tuples of whole chunk rows, in C order: as many as fit in `limit` bytes, at least one."""
    if not shape:
        return [(...,)]  # a[()] of a 0-d array would be a numpy scalar
    step = chunk0 * max(1, limit // max(1, chunk0 * row_bytes))
    return [(slice(r, min(r + step, shape[0])),) for r in range(0, shape[0], step)]


def _bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)  # a C-contiguous block: a view, no copy


class _Writes:
    """Tensorstore writes in flight, oldest first, at most INFLIGHT_BYTES of them: the producer
    works on the next parameter while the last slabs of this one are encoded and written."""

    def __init__(self, folder: str, path: str):
        self.folder, self.path = folder, path  # written into; named in errors
        self.queue, self.bytes = collections.deque(), 0

    def add(self, name: str, future, nbytes: int) -> None:
        self.queue.append((name, future, nbytes))
        self.bytes += nbytes

    def wait(self, limit: int = 0) -> None:
        while self.queue and self.bytes > limit:
            name, f, n = self.queue.popleft()
            self.bytes -= n
            try:
                f.result()
            except Exception as e:
                raise LoadError(f"{self.path}: writing parameter {name!r} failed: {type(e).__name__}: "
                                f"{_first_line(e)}") from e

    def drain(self) -> None:
        """After a failure: let tensorstore stop touching the folder before the caller removes it."""
        for _, f, _ in self.queue:
            try:
                f.result()
            except Exception:
                pass
        self.queue.clear()


def _write_array(ctx, writes: _Writes, name: str, a: np.ndarray) -> int:
    """Start writing one C-contiguous array; returns the CRC-32 of its bytes."""
    import tensorstore as ts

    chunk = _chunk_shape(a.shape, a.dtype.itemsize)
    spec = _array_spec(writes.folder, name)
    spec["kvstore"]["config"] = _OCDBT_CONFIG
    spec.update(dtype=a.dtype.name, store_data_equal_to_fill_value=True,
                metadata={"shape": list(a.shape), "chunks": chunk, "compressor": COMPRESSOR})
    try:
        t = ts.open(spec, create=True, context=ctx).result()
    except Exception as e:
        raise LoadError(f"{writes.path}: writing parameter {name!r} failed: {type(e).__name__}: {_first_line(e)}") from e
    crc = 0
    for idx in _slabs(a.shape, chunk[0] if chunk else 1, math.prod(a.shape[1:]) * a.itemsize, SLAB_BYTES):
        block = a[idx]
        # tensorstore keeps `a` alive until the write is done; no copy of it is made here
        writes.add(name, t[idx].write(block, can_reference_source_data_indefinitely=True), block.nbytes)
        crc = zlib.crc32(_bytes(block), crc)  # while tensorstore encodes and writes the block
        writes.wait(INFLIGHT_BYTES)
    return crc


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


def verify_params(path: str | os.PathLike) -> int:
    """Check every parameter's bytes against params_manifest.json; returns how many were checked
    (0 for a checkpoint without a manifest, written before mmjax kept one).

    Reads the stored bytes on the host, one slab of chunk rows at a time, whatever the mesh a
    load will use: memory stays at a few slabs, far below the load's own peak. Raises LoadError
    naming the first parameter that cannot be read or whose bytes changed."""
    import tensorstore as ts

    path = os.path.abspath(os.fspath(path))
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        return 0
    try:
        with open(file, encoding="utf-8") as f:
            entries = json.load(f)["params"]
        entries = {n: (str(e["dtype"]), tuple(e["shape"]), int(e[HASH], 16)) for n, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise LoadError(f"{file}: unreadable ({type(e).__name__}: {e}); mmjax.load(..., verify=False) skips the check") from None
    stored = _flat(param_shapes(path))
    problems = [f"{n}: in the checkpoint, not in {MANIFEST}" for n in stored if n not in entries]
    problems += [f"{n}: in {MANIFEST}, not in the checkpoint" for n in entries if n not in stored]
    problems += [f"{n}: {MANIFEST} records {entries[n][0]} {entries[n][1]}, the checkpoint has "
                 f"{np.dtype(s.dtype).name} {tuple(s.shape)}" for n, s in stored.items()
                 if n in entries and entries[n][:2] != (np.dtype(s.dtype).name, tuple(s.shape))]
    if problems:
        raise LoadError(f"{path}: parameters do not match {MANIFEST}:\n  " + "\n  ".join(problems))
    ctx = ts.Context(_CONTEXT)
    for name, (_, shape, want) in entries.items():
        try:
            crc = _read_crc(ctx, path, name)
        except Exception as e:
            raise LoadError(f"{path}: parameter {name!r} cannot be read (truncated or corrupt data): "
                            f"{type(e).__name__}: {_first_line(e)}") from e
        if crc != want:
            raise LoadError(f"{path}: parameter {name!r}: its bytes do not match {MANIFEST} (crc32 {crc:08x}, "
                            f"recorded {want:08x}): the data changed after it was written. Convert again, or "
                            "mmjax.load(..., verify=False) to load it anyway")
    return len(entries)


def _read_crc(ctx, path: str, name: str) -> int:
    import tensorstore as ts

    t = ts.open(_array_spec(path, name), open=True, context=ctx).result()
    shape, dt = tuple(t.shape), t.dtype.numpy_dtype
    slabs = _slabs(shape, t.chunk_layout.read_chunk.shape[0] if shape else 1, math.prod(shape[1:]) * dt.itemsize,
                   VERIFY_BYTES)
    if not slabs:  # no elements
        return 0
    rows = (slabs[0][0].stop - slabs[0][0].start) if shape else 0
    # Two slab buffers, filled in turn (the next one read while this one is hashed); tensorstore
    # copies into them a chunk at a time, so nothing else the size of a slab is held.
    bufs = [np.empty((rows, *shape[1:]) if shape else (), dt) for _ in range(min(2, len(slabs)))]
    crc = 0

    def fill(i):
        buf = bufs[i % len(bufs)][: slabs[i][0].stop - slabs[i][0].start] if shape else bufs[0]
        return buf, ts.array(buf).write(t[slabs[i]])

    nxt = fill(0)
    for i in range(len(slabs)):
        buf, done = nxt
        done.result()
        if i + 1 < len(slabs):
            nxt = fill(i + 1)
        crc = zlib.crc32(_bytes(buf), crc)
    return crc


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
        verify_params(path)
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
