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

An int8 kernel (mmjax/quantization.py) keeps its path and shape, so its rule applies as is; its
`kernel_scale` takes the kernel's rule's output axes (the last ones), whatever the table says.

Any mesh works: users pick it from their machine, not from the model's head counts. A dimension
its mesh axis does not divide (a 4-head vision tower on `model:8`) is kept whole on every device
of that axis, the other dimensions keep their split, and param_specs says so in one log line
(logger "mmjax.sharding") per table it applies. The SPMD partitioner makes any layout compute
the same function, so a fallback costs memory and speed, never correctness. Kv heads K and batch
rows B fall back routinely (fewer kv heads than devices, one prompt on `data:2`): the line is
INFO when only they fell back, WARNING otherwise. What still raises a ShardingError naming the
parameter is a table that is wrong whatever the mesh: a parameter no rule matches, a rule whose
axes do not have the parameter's rank, a letter outside the legend, two letters on one mesh axis.

mm_encoder_tp_mode="data" (vLLM's name) replicates the vision tower and projector
(ENCODER_PATHS) and splits the images over the whole mesh instead (encoder_input_sharding):
the tower then runs data parallel with no collectives, which suits small towers and many images.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.errors import MmjaxError
from mmjax.quantization import SCALE as QUANT_SCALE
from mmjax.tree import flatten_params, unflatten_params

__all__ = ["AXIS_RULES", "INDIVISIBLE_REPLICATED", "LEGEND", "ENCODER_MODES", "ENCODER_PATHS", "Fallback",
           "ShardingError", "block_rules", "logical_to_spec", "param_specs", "param_shardings", "shard_params",
           "batch_sharding", "shard_batch", "encoder_input_sharding", "state_shardings", "CACHE_AXES", "to_host"]

log = logging.getLogger("mmjax.sharding")


class ShardingError(MmjaxError, ValueError):
    """A sharding rule table is wrong for a parameter (no rule, wrong rank, unknown letter), or an
    option is not one mmjax knows. Sizes the mesh does not divide are not errors (they fall back)."""


# legend letter -> mesh axis (or tuple of mesh axes); letters not listed stay whole.
AXIS_RULES: Mapping[str, Any] = {
    "B": "data",   # batch rows (and images)
    "N": "model",  # query heads
    "K": "model",  # kv heads
    "F": "model",  # MLP hidden
    "V": "model",  # vocab
}
INDIVISIBLE_REPLICATED = frozenset("KB")  # routine fallbacks: logged at INFO, the others at WARNING
CACHE_AXES = "BKSH"  # one layer's "k" / "v" in the generation state
# docs/architecture.md#axis-legend, plus U (Qwen2-VL's merged tokens); axis_rules may add letters
LEGEND = frozenset("BTSNKGHDFVIPCLU")
ENCODER_MODES = ("weights", "data")  # mm_encoder_tp_mode: split the tower's weights, or its images
ENCODER_PATHS = re.compile(r"(vision|projector)(/.*)?")  # what mm_encoder_tp_mode="data" replicates


@dataclasses.dataclass(frozen=True)
class Fallback:
    """One dimension its mesh axes do not divide: `size` over `wanted` (n devices); it is split
    over `kept` instead, the longest leading run of `wanted` that divides (usually none)."""
    dim: int
    letter: str
    size: int
    wanted: tuple[str, ...]
    n: int
    kept: tuple[str, ...] = ()


def _mesh_axes(entry, mesh: Mesh) -> tuple[str, ...]:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)


def logical_to_spec(name: str, shape: Sequence[int], axes, mesh: Mesh,
                    axis_rules: Mapping[str, Any] = AXIS_RULES, fallbacks: list | None = None) -> PartitionSpec:
    """axes ("DNH", or a tuple of letters / None; None = replicated) -> PartitionSpec for `shape`.

    A dimension its mesh axes do not divide keeps the longest leading run of them that does
    (none: the dimension is whole on every device); each such case is appended to `fallbacks`
    as a Fallback. Wrong axes for any mesh (rank, unknown letter, two letters on one mesh axis)
    raise ShardingError naming `name`."""
    if axes is None:
        return PartitionSpec()
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ShardingError(f"{name}: rule axes {''.join(a or '.' for a in axes)!r} name {len(axes)} "
                            f"dimensions, the parameter has shape {tuple(shape)}")
    spec, used = [], {}
    for i, (letter, size) in enumerate(zip(axes, shape)):
        if letter and letter not in LEGEND and letter not in axis_rules:
            raise ShardingError(f"{name}: axis letter {letter!r} (dimension {i}) is not in the legend "
                                f"({''.join(sorted(LEGEND))}) nor in axis_rules; name the dimension with a legend "
                                "letter, or add the letter to axis_rules (None keeps it whole)")
        mesh_axes = _mesh_axes(axis_rules.get(letter), mesh) if letter else ()
        for m in mesh_axes:
            if m in used:
                raise ShardingError(f"{name}: axes {letter!r} and {used[m]!r} both map to mesh axis {m!r}; "
                                    "a mesh axis can split only one dimension")
        used.update({m: letter for m in mesh_axes})
        kept = mesh_axes
        while kept and size % math.prod(mesh.shape[m] for m in kept):
            kept = kept[:-1]
        if kept != mesh_axes and fallbacks is not None:
            fallbacks.append(Fallback(i, letter, size, mesh_axes, math.prod(mesh.shape[m] for m in mesh_axes), kept))
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
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
                family_name: str = "model", mm_encoder_tp_mode: str = "weights") -> dict[str, PartitionSpec]:
    """{"a/b/kernel": PartitionSpec} for flat `shapes` ({path: anything with .shape}).

    Dimensions the mesh does not divide fall back (logical_to_spec), reported in one log line.
    mm_encoder_tp_mode="data" replicates the ENCODER_PATHS parameters (their rules are still
    checked)."""
    _check_mode(mm_encoder_tp_mode)
    compiled = _compile(rules, family_name)
    out, unmatched, fallbacks = {}, [], []
    for path, s in shapes.items():
        hit = next(((pat, axes) for rx, pat, axes in compiled if rx.fullmatch(path)), None)
        kernel = path[: -len(QUANT_SCALE)] + "kernel" if path.endswith("/" + QUANT_SCALE) else None
        if kernel is not None and kernel in shapes:
            # an int8 kernel's per-channel scale [out axes]: split as its kernel's output axes,
            # so each device holds the scales of the columns it holds (mmjax/quantization.py)
            hit = next(((pat, axes) for rx, pat, axes in compiled if rx.fullmatch(kernel)), None)
            if hit is not None and hit[1] is not None:
                hit = (hit[0], tuple(hit[1])[len(shapes[kernel].shape) - len(s.shape):])
        if hit is None:
            unmatched.append(path)
            continue
        found = []
        out[path] = logical_to_spec(f"{path} (rule {hit[0]!r})", tuple(s.shape), hit[1], mesh, axis_rules, found)
        if mm_encoder_tp_mode == "data" and ENCODER_PATHS.fullmatch(path):
            out[path] = PartitionSpec()
        else:
            fallbacks += [(path, f) for f in found]
    if unmatched:
        raise ShardingError(f"family {family_name!r}: no sharding rule matches "
                            + ", ".join(unmatched[:8]) + (f" (+{len(unmatched) - 8} more)" if len(unmatched) > 8 else "")
                            + "; add a rule (axes None replicates)")
    if fallbacks:
        _log_fallbacks(family_name, mesh, len(shapes), fallbacks)
    return out


def _log_fallbacks(family_name: str, mesh: Mesh, n_params: int, fallbacks: list, max_groups: int = 12) -> None:
    """One line for the whole table: per reason (letter, size, mesh axes), the paths with layer
    numbers folded ("vision/layers_*/attn/q/kernel x3")."""
    reasons: dict = collections.defaultdict(collections.Counter)
    for path, f in fallbacks:
        kept = f", kept on {'x'.join(f.kept)}" if f.kept else ""
        why = f"{f.letter}={f.size} over {'x'.join(f.wanted)}={f.n}{kept}"
        reasons[why][re.sub(r"(?<=_)\d+(?=/|$)", "*", path)] += 1
    parts = []
    for why, paths in reasons.items():
        listed = [p + (f" x{k}" if k > 1 else "") for p, k in list(paths.items())[:max_groups]]
        more = f", +{len(paths) - max_groups} more" if len(paths) > max_groups else ""
        parts.append(f"{why}: {', '.join(listed)}{more}")
    tensors = len({path for path, _ in fallbacks})
    level = logging.INFO if all(f.letter in INDIVISIBLE_REPLICATED for _, f in fallbacks) else logging.WARNING
    mesh_str = ",".join(f"{k}:{v}" for k, v in mesh.shape.items())
    log.log(level, "%s on mesh %s: %d of %d parameters are replicated along a dimension their mesh axis does "
            "not divide (same results, more memory per device): %s", family_name, mesh_str, tensors, n_params,
            "; ".join(parts))


def _check_mode(mode) -> None:
    if mode not in ENCODER_MODES:
        raise ShardingError(f"mm_encoder_tp_mode {mode!r} is not one of {', '.join(map(repr, ENCODER_MODES))}")


def _family_rules(family, cfg) -> list:
    if family.sharding is None:
        raise ShardingError(f"family {family.name!r} has no sharding rules: register it with "
                            "Family(sharding=cfg -> [(regex, axes), ...]); [('.*', None)] replicates every "
                            "parameter (docs/sharding.md)")
    return list(family.sharding(cfg))


def param_shardings(family, cfg, mesh: Mesh, shapes, axis_rules: Mapping[str, Any] | None = None,
                    mm_encoder_tp_mode: str = "weights"):
    """Restore target: `shapes` (nested or flat dict of ShapeDtypeStruct, e.g. the checkpoint's
    metadata) -> the same tree of ShapeDtypeStruct carrying NamedSharding(mesh, spec)."""
    nested = any(isinstance(v, Mapping) for v in shapes.values())
    flat = flatten_params(shapes) if nested else dict(shapes)
    specs = param_specs(_family_rules(family, cfg), flat, mesh, axis_rules or AXIS_RULES, family.name,
                        mm_encoder_tp_mode)
    out = {p: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype, sharding=NamedSharding(mesh, specs[p]))
           for p, s in flat.items()}
    return unflatten_params(out) if nested else out


def shard_params(family, cfg, mesh: Mesh, params, axis_rules: Mapping[str, Any] | None = None,
                 mm_encoder_tp_mode: str = "weights"):
    """Place an in-memory params tree (e.g. from module.init) on the mesh by the family's rules."""
    target = param_shardings(family, cfg, mesh, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                                             params), axis_rules, mm_encoder_tp_mode)
    return jax.tree.map(lambda a, t: jax.device_put(a, t.sharding), params, target)


def batch_sharding(mesh: Mesh, shape: Sequence[int], axis_rules: Mapping[str, Any] = AXIS_RULES) -> NamedSharding:
    """Rows (the leading dimension) over the batch mesh axis when they divide it, else replicated."""
    axes = ("B",) + (None,) * (len(shape) - 1) if len(shape) else ()
    return NamedSharding(mesh, logical_to_spec("batch", shape, axes, mesh, axis_rules))


def shard_batch(mesh: Mesh, batch: Mapping[str, Any], axis_rules: Mapping[str, Any] = AXIS_RULES) -> dict:
    """device_put every input array with batch_sharding (every process passes the same values)."""
    return {k: jax.device_put(v, batch_sharding(mesh, np.shape(v), axis_rules)) for k, v in batch.items()}


def encoder_input_sharding(mesh: Mesh, shape: Sequence[int], mode: str = "weights",
                           axis_rules: Mapping[str, Any] = AXIS_RULES) -> NamedSharding:
    """Layout of a vision input inside the program, by its leading axis (LLaVA's images
    [I, C, Hi, Wi], Qwen2-VL's patches [P, C*t*ps*ps]).

    "weights": over the batch axis, as the rows (the tower's weights are split over the rest).
    "data": over every mesh axis, mesh order (("data", "model")): each device encodes its own
    images with a replicated tower. A count the axes do not divide keeps the longest leading run
    of them that does (2 images on data:2,model:4 go over `data`), else is replicated."""
    _check_mode(mode)
    if mode == "data":
        rules = {"I": tuple(mesh.shape)}
    else:
        rules = {"I": axis_rules.get("B")}
    axes = ("I",) + (None,) * (len(shape) - 1) if len(shape) else ()
    return NamedSharding(mesh, logical_to_spec("encoder input", shape, axes, mesh, rules))


def state_shardings(mesh: Mesh, state, axis_rules: Mapping[str, Any] = AXIS_RULES):
    """Shardings for the generation state (mmjax.generation.state.DecodeState): cache leaves [B, K, S, H]
    by CACHE_AXES, every other array by rows, scalars replicated. Works on abstract values."""
    def one(path, x):
        in_cache = any(getattr(p, "key", getattr(p, "name", None)) == "cache" for p in path)  # dict or dataclass
        # cache leaves: k/v [B, K, S, H]; an int8 cache's scales [B, K, S] split the same way
        axes = CACHE_AXES[:x.ndim] if in_cache and x.ndim in (3, 4) else ("B",) + (None,) * (x.ndim - 1) if x.ndim else ()
        return NamedSharding(mesh, logical_to_spec("state" + jax.tree_util.keystr(path), x.shape, axes, mesh,
                                                   axis_rules))

    return jax.tree_util.tree_map_with_path(one, state)


def to_host(x) -> np.ndarray:
    """np.asarray that also works when x spans devices of other processes (gathers it)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
