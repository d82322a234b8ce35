"""Sharding is data: parameter-path rules -> logical axes -> mesh axes -> NamedSharding.

Two tables, both short:
  * per family (Family.sharding, beside the model): config -> [(regex on "a/b/c", axes)].
    `axes` names each dimension of the parameter with the axis legend, e.g. "DNH" for a q
    kernel [D, N, H]; None replicates the whole parameter. The first rule whose regex
    fully matches a path wins (as in big_vision / t5x); a parameter no rule matches is an
    error, so a new parameter cannot be replicated by accident.
  * per mesh (AXIS_RULES below): legend letter -> mesh axis. Letters it does not list (D, H,
    P, ...) are never split; a mesh axis the mesh lacks counts as size 1.

Nothing else is decided here: the SPMD partitioner derives every activation's sharding (and the
collectives) from the parameters, the batch and the KV-cache constraint. With the default table
that is the Megatron layout: q/k/v and MLP gate/up split by columns (heads, F), o and down by
rows, so each decoder layer needs two all-reduces of [B, T, D].

A split dimension must divide its mesh axis, otherwise a ShardingError names the parameter and
the numbers. Two letters are exempt (INDIVISIBLE_REPLICATED): kv heads K (GQA models often have
fewer kv heads than devices; k/v kernels and the KV cache are then replicated over `model`,
each device keeping all kv heads) and batch rows B (a single prompt on a `data` axis of 2 runs
replicated).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.errors import MmjaxError
from mmjax.tree import flatten_params, unflatten_params

__all__ = ["AXIS_RULES", "INDIVISIBLE_REPLICATED", "ShardingError", "block_rules", "logical_to_spec", "param_specs",
           "param_shardings", "shard_params", "batch_sharding", "shard_batch", "state_shardings",
           "CACHE_AXES", "to_host"]


class ShardingError(MmjaxError, ValueError):
    """A sharding rule does not fit a parameter, or a split axis does not divide the mesh."""


# legend letter -> mesh axis (or tuple of mesh axes); letters not listed stay whole.
AXIS_RULES: Mapping[str, Any] = {
    "B": "data",   # batch rows (and images)
    "N": "model",  # query heads
    "K": "model",  # kv heads
    "F": "model",  # MLP hidden
    "V": "model",  # vocab
}
INDIVISIBLE_REPLICATED = frozenset("KB")
CACHE_AXES = "BKSH"  # one layer's "k" / "v" in the generation state


def _mesh_axes(entry, mesh: Mesh) -> tuple[str, ...]:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)


def logical_to_spec(name: str, shape: Sequence[int], axes, mesh: Mesh,
                    axis_rules: Mapping[str, Any] = AXIS_RULES) -> PartitionSpec:
    """axes ("DNH", or a tuple of letters / None; None = replicated) -> PartitionSpec for `shape`."""
    if axes is None:
        return PartitionSpec()
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ShardingError(f"{name}: rule axes {''.join(a or '.' for a in axes)!r} name {len(axes)} "
                            f"dimensions, the parameter has shape {tuple(shape)}")
    spec, used = [], {}
    for i, (letter, size) in enumerate(zip(axes, shape)):
        mesh_axes = _mesh_axes(axis_rules.get(letter), mesh) if letter else ()
        for m in mesh_axes:
            if m in used:
                raise ShardingError(f"{name}: axes {letter!r} and {used[m]!r} both map to mesh axis {m!r}; "
                                    "a mesh axis can split only one dimension")
        n = math.prod(mesh.shape[m] for m in mesh_axes)
        if n > 1 and size % n:
            if letter in INDIVISIBLE_REPLICATED:
                spec.append(None)
                continue
            raise ShardingError(
                f"{name}: dimension {i} ({letter}={size}) is split over mesh axis "
                f"{'x'.join(mesh_axes)} of size {n}, and {size} % {n} = {size % n}; pick a mesh size that "
                f"divides {size}, or map {letter!r} to None in axis_rules")
        used.update({m: letter for m in mesh_axes})
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def block_rules(prefix: str, kv: str = "K") -> list:
    """Megatron split of the transformer blocks under `prefix` (a path regex, e.g.
    r"decoder/layers_\\d+"): q/k/v and gate/up/fc1 by heads / F columns, o and down/fc2 by rows
    (two all-reduces per block). `kv` is the k/v head letter: "K" for GQA decoders, "N" for
    towers whose k/v have every head."""
    return [
        (rf"{prefix}/attn/q/kernel", "DNH"),
        (rf"{prefix}/attn/q/bias", "NH"),
        (rf"{prefix}/attn/[kv]/kernel", f"D{kv}H"),
        (rf"{prefix}/attn/[kv]/bias", f"{kv}H"),
        (rf"{prefix}/attn/o/kernel", "NHD"),
        (rf"{prefix}/mlp/(gate|up|fc1)/kernel", "DF"),
        (rf"{prefix}/mlp/(gate|up|fc1)/bias", "F"),
        (rf"{prefix}/mlp/(down|fc2)/kernel", "FD"),
    ]


def _compile(rules, family_name: str):
    out = []
    for item in rules:
        try:
            pattern, axes = item
            out.append((re.compile(pattern), pattern, axes))
        except (TypeError, ValueError, re.error) as e:
            raise ShardingError(f"family {family_name!r}: sharding rule {item!r} is not "
                                f"(regex, axes): {e}") from None
    return out


def param_specs(rules, shapes: Mapping[str, Any], mesh: Mesh, axis_rules: Mapping[str, Any] = AXIS_RULES,
                family_name: str = "model") -> dict[str, PartitionSpec]:
    """{"a/b/kernel": PartitionSpec} for flat `shapes` ({path: anything with .shape})."""
    compiled = _compile(rules, family_name)
    out, unmatched = {}, []
    for path, s in shapes.items():
        hit = next(((pat, axes) for rx, pat, axes in compiled if rx.fullmatch(path)), None)
        if hit is None:
            unmatched.append(path)
            continue
        out[path] = logical_to_spec(f"{path} (rule {hit[0]!r})", tuple(s.shape), hit[1], mesh, axis_rules)
    if unmatched:
        raise ShardingError(f"family {family_name!r}: no sharding rule matches "
                            + ", ".join(unmatched[:8]) + (f" (+{len(unmatched) - 8} more)" if len(unmatched) > 8 else "")
                            + "; add a rule (axes None replicates)")
    return out


def _family_rules(family, cfg) -> list:
    if family.sharding is None:
        raise ShardingError(f"family {family.name!r} has no sharding rules: register it with "
                            "Family(sharding=cfg -> [(regex, axes), ...]); [('.*', None)] replicates every "
                            "parameter (docs/sharding.md)")
    return list(family.sharding(cfg))


def param_shardings(family, cfg, mesh: Mesh, shapes, axis_rules: Mapping[str, Any] | None = None):
    """Restore target: `shapes` (nested or flat dict of ShapeDtypeStruct, e.g. the checkpoint's
    metadata) -> the same tree of ShapeDtypeStruct carrying NamedSharding(mesh, spec)."""
    nested = any(isinstance(v, Mapping) for v in shapes.values())
    flat = flatten_params(shapes) if nested else dict(shapes)
    specs = param_specs(_family_rules(family, cfg), flat, mesh, axis_rules or AXIS_RULES, family.name)
    out = {p: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype, sharding=NamedSharding(mesh, specs[p]))
           for p, s in flat.items()}
    return unflatten_params(out) if nested else out


def shard_params(family, cfg, mesh: Mesh, params, axis_rules: Mapping[str, Any] | None = None):
    """Place an in-memory params tree (e.g. from module.init) on the mesh by the family's rules."""
    target = param_shardings(family, cfg, mesh, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                                             params), axis_rules)
    return jax.tree.map(lambda a, t: jax.device_put(a, t.sharding), params, target)


def batch_sharding(mesh: Mesh, shape: Sequence[int], axis_rules: Mapping[str, Any] = AXIS_RULES) -> NamedSharding:
    """Rows (the leading dimension) over the batch mesh axis when they divide it, else replicated."""
    axes = ("B",) + (None,) * (len(shape) - 1) if len(shape) else ()
    return NamedSharding(mesh, logical_to_spec("batch", shape, axes, mesh, axis_rules))


def shard_batch(mesh: Mesh, batch: Mapping[str, Any], axis_rules: Mapping[str, Any] = AXIS_RULES) -> dict:
    """device_put every input array with batch_sharding (every process passes the same values)."""
    return {k: jax.device_put(v, batch_sharding(mesh, np.shape(v), axis_rules)) for k, v in batch.items()}


def state_shardings(mesh: Mesh, state, axis_rules: Mapping[str, Any] = AXIS_RULES):
    """Shardings for the generation state (mmjax.generation.state.DecodeState): cache leaves [B, K, S, H]
    by CACHE_AXES, every other array by rows, scalars replicated. Works on abstract values."""
    def one(path, x):
        in_cache = any(getattr(p, "key", getattr(p, "name", None)) == "cache" for p in path)  # dict or dataclass
        axes = CACHE_AXES if in_cache and x.ndim == 4 else ("B",) + (None,) * (x.ndim - 1) if x.ndim else ()
        return NamedSharding(mesh, logical_to_spec("state" + jax.tree_util.keystr(path), x.shape, axes, mesh,
                                                   axis_rules))

    return jax.tree_util.tree_map_with_path(one, state)


def to_host(x) -> np.ndarray:
    """np.asarray that also works when x spans devices of other processes (gathers it)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
