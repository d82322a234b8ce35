"""Save and restore parameter trees. The one module that touches orbax.

A params tree is a nested dict of arrays (flax `variables["params"]`). restore_params can take a
target tree of jax.ShapeDtypeStruct whose `.sharding` is set: orbax then reads each array
straight into those shardings, so every device receives only its own shard and no full host
copy is made. Shapes are checked against the stored metadata first, so a mismatch is reported
by name instead of surfacing as an orbax traceback.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax

from mmjax.errors import LoadError

__all__ = ["save_params", "restore_params", "param_shapes", "CHUNK_BYTES"]

CHUNK_BYTES = 4 << 20


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_params(path: str | os.PathLike, params: Mapping[str, Any]) -> None:
    """Write `params` (nested dict of numpy / jax arrays) as an orbax checkpoint folder `path`.

    Synchronous: the checkpoint is complete on disk when this returns. `path` must not exist."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise LoadError(f"{path}: already exists; refusing to write a checkpoint over it")
    import orbax.checkpoint as ocp

    # Chunks of at most CHUNK_BYTES: a device restoring its shard then decompresses only the
    # chunks it overlaps. With one chunk per tensor every process decompressed the whole tensor
    # to cut out its slice (a sharded load peaked above a whole-then-shard load).
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), dict(params))
    ck = _checkpointer()
    try:
        ck.save(path, dict(params), save_args=save_args)
        ck.wait_until_finished()
    except Exception as e:
        raise LoadError(f"{path}: writing the orbax checkpoint failed: {type(e).__name__}: {e}") from e
    finally:
        ck.close()


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


def restore_params(path: str | os.PathLike, target: Mapping[str, Any] | None = None) -> dict:
    """Read a params tree written by save_params.

    target None: numpy arrays on the host. target a nested dict of jax.ShapeDtypeStruct (with
    .sharding, e.g. NamedSharding over a mesh) or arrays: each leaf is restored with that shape,
    dtype (cast if it differs from the stored one) and sharding, directly on the devices.
    A ShapeDtypeStruct without a sharding goes to this process's first local device."""
    path = os.path.abspath(os.fspath(path))
    stored = _flat(param_shapes(path))
    ck = _checkpointer()
    try:
        if target is None:
            return ck.restore(path)
        target = jax.tree.map(_with_sharding, dict(target))
        want = {p: tuple(v.shape) for p, v in _flat(target).items()}
        problems = [f"{p}: expected shape {s}, checkpoint has {stored[p].shape}"
                    for p, s in want.items() if p in stored and tuple(stored[p].shape) != s]
        problems += [f"{p}: expected by the model, missing from the checkpoint" for p in want if p not in stored]
        problems += [f"{p}: in the checkpoint, not expected by the model" for p in stored if p not in want]
        if problems:
            raise LoadError(f"{path}: parameters do not match the model:\n  " + "\n  ".join(problems))
        return ck.restore(path, target)
    except LoadError:
        raise
    except Exception as e:
        raise _read_error(path, e) from e
    finally:
        ck.close()


def _read_error(path: str, e: Exception) -> LoadError:
    """TensorStore read errors embed a page of spec JSON; keep the parameter it names and one line."""
    text = str(e)
    first = text.strip().splitlines()[0].split(" See full TensorStore details")[0][:300] if text.strip() else ""
    # the parameter's key is the one relative kvstore 'path' (file paths are absolute)
    names = re.findall(r"'path': '([^'/][^']*?)/?'", text)
    if names:
        return LoadError(f"{path}: parameter {names[0]!r} cannot be read (truncated or corrupt data): "
                         f"{type(e).__name__}: {first}")
    return LoadError(f"{path}: restoring the orbax checkpoint failed: {type(e).__name__}: {first}")


def _with_sharding(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return leaf
