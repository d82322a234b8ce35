"""params_manifest.json: the checksums written beside a checkpoint's parameters, and the check
of the stored bytes against them. It records each parameter's dtype, shape and CRC-32 of its
bytes as stored: chunk by chunk in the order of the chunk grid, each chunk in C order (for a
parameter of one chunk, zlib.crc32(a.tobytes())). orbax keeps no checksums, so a flipped bit in
a chunk used to load silently; restore_params(verify=True) reads every parameter back once, a
chunk at a time, and names the one that changed. The CRC-32s themselves are computed by
mmjax.checkpoint's writer as the chunks go out; the layout helpers read here come from
mmjax.checkpoint, imported at call time (it imports this module).
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any, Mapping

import numpy as np

from mmjax.errors import LoadError

__all__ = ["verify_params", "verify_stored", "write_manifest", "MANIFEST", "HASH"]

MANIFEST = "params_manifest.json"
HASH = "crc32"  # zlib.crc32: ~3 GB/s here (sha256 1.4), releases the GIL; catches every burst of <= 32 flipped bits


def write_manifest(folder: str, params: dict[str, dict], crcs: Mapping[str, int]) -> dict:
    """Write `folder`/params_manifest.json from each parameter's {"dtype", "shape"} entry (filled in
    place with its CRC-32 from `crcs`); returns what it wrote (save_params returns it)."""
    for name, entry in params.items():
        entry[HASH] = f"{crcs[name]:08x}"
    out = {"format": 1, "hash": HASH, "params": params}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(out, f)
    return out


def verify_params(path: str | os.PathLike) -> int:
    """Check every parameter's bytes against params_manifest.json; returns how many were checked
    (0 for a checkpoint without a manifest, written before mmjax kept one).

    Reads the stored bytes on the host, a chunk (CHUNK_BYTES at most) at a time, whatever the
    mesh a load will use: memory stays at a few chunks, far below the load's own peak. Raises LoadError
    naming the first parameter that cannot be read or whose bytes changed."""
    from mmjax.checkpoint import _flat, param_shapes

    path = os.path.abspath(os.fspath(path))
    return verify_stored(path, _flat(param_shapes(path)))


def verify_stored(path: str, stored: Mapping[str, Any]) -> int:
    """verify_params, given the checkpoint's flat {name: stored array metadata} (what restore_params
    and iter_params have read already)."""
    import tensorstore as ts

    from mmjax.checkpoint import _CONTEXT, _first_line

    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        return 0
    try:
        with open(file, encoding="utf-8") as f:
            entries = json.load(f)["params"]
        entries = {n: (str(e["dtype"]), tuple(e["shape"]), int(e[HASH], 16)) for n, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise LoadError(f"{file}: unreadable ({type(e).__name__}: {e}); mmjax.load(..., verify=False) skips the check") from None
    problems = [f"{n}: in the checkpoint, not in {MANIFEST}" for n in stored if n not in entries]
    problems += [f"{n}: in {MANIFEST}, not in the checkpoint" for n in entries if n not in stored]
    problems += [f"{n}: {MANIFEST} records {entries[n][0]} {entries[n][1]}, the checkpoint has "
                 f"{np.dtype(s.dtype).name} {tuple(s.shape)}" for n, s in stored.items()
                 if n in entries and entries[n][:2] != (np.dtype(s.dtype).name, tuple(s.shape))]
    if problems:
        raise LoadError(f"{path}: parameters do not match {MANIFEST}:\n  " + "\n  ".join(problems))
    ctx = ts.Context(_CONTEXT)
    for name, (_, _, want) in entries.items():
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

    from mmjax.checkpoint import _array_spec, _bytes, _chunks

    t = ts.open(_array_spec(path, name), open=True, context=ctx).result()
    shape = tuple(t.shape)
    chunks = _chunks(shape, list(t.chunk_layout.read_chunk.shape) if shape else [])
    crc, nxt = 0, (t[chunks[0]].read() if chunks else None)
    for i in range(len(chunks)):
        block = nxt.result()
        if i + 1 < len(chunks):
            nxt = t[chunks[i + 1]].read()  # the next chunk is read while this one is hashed
        crc = zlib.crc32(_bytes(np.require(block, requirements="C")), crc)
    return crc
