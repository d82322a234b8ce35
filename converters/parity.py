"""Layer-by-layer parity between a PyTorch model and its mmjax port: where do they first differ?

    report = converters.parity.compare(torch_model, {"pixels": px, "text_ids": ids},
                                  model, {"input_ids": ids_with_prefix, "pixel_values": px})
    report.first_divergence   # None, or the earliest point past tolerance

Both sides run once on the given inputs. Torch outputs are captured with forward hooks on the
user's modules; ours by intercepting every flax module's `__call__` (the same values
`capture_intermediates` records, kept outside the variable collections so they cannot collide
with a module's own `sow`), plus `sow("intermediates", ...)` values when a point names one.

Which torch module matches which flax module comes, by default, from the converter rules: a
flax module M and a torch module T are paired when the tensors of T are exactly the ones that
fill the parameters under M (so `lm.3` <-> `decoder/layers_3`, `lm.3.attn` <-> `.../attn`, but a
fused `qkv` Linear pairs with none of q, k, v). `points={"decoder/layers_1": "lm.1", ...}`
replaces the mapping; a flax name may also be a sown value ("image_features",
"vision/hidden_states/2"). The final output is always compared as the point "logits".

Outputs are aligned before comparing when the layouts differ only by a split of heads
([.., N, H] vs [.., N*H]) or by channels-first convolution output ([B, C, y, x] vs [B, y*x, C]);
pairs that still do not align are listed as skipped, with both shapes. A torch model that
returns fewer sequence positions than mmjax computes (text only, without an image prefix) is
compared on those positions: `positions=slice(Q, None)` (or `positions=Q`) slices axis 1 of
every mmjax output that is longer there than torch's (logits, decoder/embed). Points are ordered by
when the torch module finished (forward order), and a point is within tolerance when
|ours - theirs| <= atol + rtol * |theirs| everywhere (numpy.allclose).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from converters.families import rules_for
from converters.rules import build_plan
from mmjax.errors import InputError
from mmjax.layers.fusion import fused_groups, member_outputs, split
from mmjax.tree import flatten_params

__all__ = ["Point", "ParityReport", "compare", "default_points"]

OUTPUT = "output"  # torch name of the model's final output
LOGITS = "logits"  # our name for it


@dataclasses.dataclass(frozen=True)
class Point:
    name: str  # mmjax side: module path, sown value, or "logits"
    torch_name: str  # torch module name, or "output"
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max |Δ| / max |torch|
    ok: bool
    order: int  # forward order (torch completion order)
    positions: str = ""  # the slice of mmjax's axis 1 compared ("6:"), "" when all of it


@dataclasses.dataclass
class ParityReport:
    points: list[Point]
    skipped: list[tuple[str, str, str]]  # (name, torch_name, why)
    atol: float
    rtol: float

    @property
    def first_divergence(self) -> Point | None:
        return next((p for p in self.points if not p.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def __getitem__(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"{name!r} is not a compared point; compared: {', '.join(p.name for p in self.points)}")

    def table(self) -> str:
        rows = [("#", "mmjax", "torch", "shape", "max|Δ|", "max rel", "")]
        for k, p in enumerate(self.points, 1):
            name = f"{p.name}[:, {p.positions}]" if p.positions else p.name
            rows.append((str(k), name, p.torch_name, "x".join(map(str, p.shape)), f"{p.max_abs:.2e}",
                         f"{p.max_rel:.2e}", "ok" if p.ok else "DIFFERS"))
        w = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(f"{cell:<{w[c]}}" for c, cell in enumerate(r)).rstrip() for r in rows]
        lines += [f"skipped {n} <-> {t}: {why}" for n, t, why in self.skipped]
        first = self.first_divergence
        if first is None:
            lines.append(f"all {len(self.points)} points within atol={self.atol:g}, rtol={self.rtol:g}")
        else:
            lines.append(f"first divergence: {first.name} (torch {first.torch_name}): max|Δ| {first.max_abs:.3g} "
                         f"exceeds atol={self.atol:g} + rtol={self.rtol:g}*|torch|")
        return "\n".join(lines)

    __str__ = table


# ---------------------------------------------------------------- default mapping from the rules

def _torch_module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else ""


def _common_module(names) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for col in zip(*parts):
        if len(set(col)) != 1:
            break
        out.append(col[0])
    return ".".join(out)


def _under(name: str, prefix: str, sep: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + sep)


def default_points(torch_model, rules, param_tree) -> dict[str, str]:
    """{flax module path: torch module name} implied by the converter rules (see the module doc)."""

    sd = torch_model.state_dict()
    sources = {n: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for n, t in sd.items()}
    targets = {p: jax.ShapeDtypeStruct(tuple(np.shape(a)), jnp.float32) for p, a in flatten_params(param_tree).items()}
    plan = build_plan(sources, rules, targets)
    edges = [(t, p) for s in plan.steps for t in s.names for p in s.targets]  # (torch tensor, flax param)
    flax_modules = {m for _, p in edges for m in _ancestors(p)}
    modules = dict(torch_model.named_modules())
    out: dict[str, str] = {}
    for m in sorted(flax_modules):
        tensors = {t for t, p in edges if _under(p, m, "/")}
        tm = _common_module(_torch_module(t) for t in tensors)
        if tm == "" or tm not in modules:
            continue
        # every tensor under the torch module must fill parameters under m only
        if all(_under(p, m, "/") for t, p in edges if _under(t, tm, ".")):
            out[m] = tm
    # several flax modules can name one torch module (a wrapper and its only child): keep the deepest
    best: dict[str, str] = {}
    for m, tm in out.items():
        if tm not in best or m.count("/") > best[tm].count("/"):
            best[tm] = m
    return {m: tm for tm, m in best.items()}


def _ancestors(param_path: str) -> list[str]:
    parts = param_path.split("/")[:-1]
    return ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]


# ---------------------------------------------------------------- running both sides

def _first_array(out):
    """A module's output -> the array to compare, or None (lists of hidden states, dicts...)."""
    if isinstance(out, tuple) and out:
        out = out[0]
    return out if isinstance(out, jax.Array) else None


def _torch_array(out):
    import torch

    if isinstance(out, (tuple, list)) and out and not hasattr(out, "keys"):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu().numpy().astype(np.float64)
    return None


def _run_torch(torch_model, torch_inputs, names: set[str]):
    import torch

    modules = dict(torch_model.named_modules())
    missing = sorted(n for n in names if n != OUTPUT and n not in modules)
    if missing:
        raise InputError(f"torch model has no module(s) {missing}; see dict(torch_model.named_modules())")
    got: dict[str, Any] = {}
    order: dict[str, int] = {}

    def hook(name):
        def fn(_mod, _inp, out):
            if name not in order:
                order[name] = len(order)
                got[name] = _torch_array(out)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names if n != OUTPUT]
    try:
        with torch.no_grad():
            out = torch_model(**torch_inputs) if isinstance(torch_inputs, Mapping) else torch_model(*torch_inputs)
    finally:
        for h in handles:
            h.remove()
    logits = getattr(out, "logits", out)
    order[OUTPUT] = len(order)
    got[OUTPUT] = _torch_array(logits)
    return got, order


def _flax_batch(inputs: Mapping, dtype) -> dict:
    batch = {}
    for k, v in inputs.items():
        if v is None:
            continue
        if k == "attention_mask":
            batch["lengths"] = jnp.asarray(np.asarray(v).astype(bool).sum(axis=1).astype(np.int32))
        elif k == "pixel_values":
            batch[k] = jnp.asarray(v, dtype)
        else:
            batch[k] = jnp.asarray(v)
    return batch


def _fused_members(model) -> dict[str, tuple[str, int, tuple]]:
    """{member path: (fused path, its index, the members' output shapes)} of the projections
    mmjax.load fused (q|k|v, gate|up: mmjax.layers.fusion), so that their points keep the
    checkpoint's names. A (module, params) pair is run as given: nothing to map."""
    if isinstance(model, tuple):
        return {}
    from mmjax.models.base import abstract_init, param_shapes

    _, contractions, groups = abstract_init(model.module)
    shapes = {k: v.shape for k, v in param_shapes(model.module).items()}
    out = {}
    for path, _, name, members in fused_groups(model.params, groups):
        outs = member_outputs(path, members, shapes, contractions)
        out.update({f"{path}/{m}": (f"{path}/{name}", i, outs) for i, m in enumerate(members)})
    return out


def _run_flax(module, params, batch, wanted: set[str], sown: bool):
    """Apply the module eagerly (no jit: values are concrete, and the per-op compile cache is
    shared by later runs of same-shaped models), recording the `__call__` output of every
    module in `wanted`; with sown=True also return the intermediates collection."""
    import flax.linen as nn

    got: dict[str, Any] = {}

    def interceptor(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        path = "/".join(ctx.module.path)
        if ctx.method_name == "__call__" and path in wanted and path not in got:
            got[path] = _first_array(out)
        return out

    with nn.intercept_methods(interceptor):
        if sown:
            out, state = module.apply({"params": params}, batch, mutable=["intermediates"])
        else:
            out, state = module.apply({"params": params}, batch), {}
    got[LOGITS] = out
    return got, state.get("intermediates", {})


def _sown(tree, name: str):
    node = tree
    for part in name.split("/"):
        if isinstance(node, tuple) and part.isdigit():
            node = node[int(part)] if int(part) < len(node) else None
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return None
    if isinstance(node, tuple):
        node = node[0] if len(node) == 1 else None
    return node if hasattr(node, "shape") else None


def _align(ours: np.ndarray, theirs: np.ndarray):
    """Bring both to one layout, or None. Handles head splits and channels-first conv outputs."""
    if ours.shape == theirs.shape:
        return ours, theirs
    if theirs.ndim == 4 and ours.ndim == 3 and ours.shape == (theirs.shape[0], theirs.shape[2] * theirs.shape[3],
                                                             theirs.shape[1]):
        return ours, theirs.reshape(theirs.shape[0], theirs.shape[1], -1).transpose(0, 2, 1)
    if ours.size == theirs.size:
        k = 0
        while k < min(ours.ndim, theirs.ndim) and ours.shape[k] == theirs.shape[k]:
            k += 1
        a, b = ours.shape[k:], theirs.shape[k:]
        if (len(a) == 1 and math.prod(b) == a[0]) or (len(b) == 1 and math.prod(a) == b[0]):
            return ours.reshape(theirs.shape), theirs  # same memory order, heads split on one side
    return None


def _slice_text(s: slice) -> str:
    return ":".join("" if v is None else str(v) for v in (s.start, s.stop)) + ("" if s.step is None else f":{s.step}")


def _point(name, tname, a, b, atol, rtol, order, positions: slice | None = None) -> Point | str:
    """One comparison, or why it cannot be made. positions: the slice of our axis 1 that torch's
    output holds, tried when the whole outputs do not align and ours is longer on axis 1."""
    aligned, sliced = _align(a, b), ""
    if aligned is None and positions is not None and a.ndim >= 2 and b.ndim >= 2 and a.shape[1] > b.shape[1]:
        sliced = _slice_text(positions)
        aligned = _align(a[:, positions], b)
        if aligned is None:
            return (f"shapes {a.shape} (mmjax) and {b.shape} (torch) do not align, nor do mmjax positions "
                    f"[{sliced}] ({a[:, positions].shape})")
    if aligned is None:
        return f"shapes {a.shape} (mmjax) and {b.shape} (torch) do not align"
    a, b = aligned
    diff = np.abs(a - b)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    ok = bool(np.all(diff <= atol + rtol * np.abs(b))) and bool(np.isfinite(a).all())
    return Point(name, tname, tuple(b.shape), max_abs, max_abs / max(scale, 1e-30), ok, order, sliced)


# ---------------------------------------------------------------- compare

def compare(torch_model, torch_inputs, model, inputs: Mapping, points: Mapping[str, str] | Sequence | None = None,
            *, atol: float = 1e-4, rtol: float = 1e-4, rules=None, positions: slice | int | None = None,
            verbose: bool = True) -> ParityReport:
    """Run both models, compare named intermediates, print the table, return a ParityReport.

    torch_model: a torch.nn.Module (eval mode); torch_inputs: kwargs dict (or args tuple) for it.
    model: an mmjax.Model (from mmjax.load) or a (flax module, params) pair.
    inputs: the flax module's batch (input_ids, pixel_values, ...; attention_mask becomes lengths).
    points: {mmjax name: torch module name} or pairs; default: derived from the converter rules
    (`rules`, default the family's rules for model.config).
    positions: when the torch model returns fewer sequence positions than the mmjax model computes
    (say text only, after a prefix of Q image tokens), the slice of mmjax's positions it returns:
    slice(Q, None), or the int Q for the same. Applied to axis 1 of every mmjax output longer there
    than torch's (logits, decoder/embed); the table shows it (`logits[:, 6:]`).
    """
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = slice(positions, None)
    if positions is not None and not isinstance(positions, slice):
        raise InputError(f"compare: positions must be a slice (or an int offset), got {positions!r}")
    if isinstance(model, tuple):
        module, params = model
        family, cfg = None, getattr(module, "cfg", None)
    else:
        module, params, family, cfg = model.module, model.params, model.family, model.config
    if points is None:
        if rules is None:
            if family is None:
                raise InputError("compare: a (module, params) model needs rules= or points= to pair intermediates")
            rules = rules_for(family.name)
            if rules is None:
                raise InputError(f"compare: family {family.name!r} has no registered converter rules; pass rules=")

        from converters.torch2flax import load_rules  # torch2flax imports the whole converter

        # pairing by the converter's names: the checkpoint layout (a packed kernel is named
        # kernel_panels at run time; mmjax.kernels.cpu.panels); the run below uses `params` as loaded
        layout = params if isinstance(model, tuple) else model.checkpoint_params()
        mapping = default_points(torch_model, load_rules(rules, cfg), layout)
    else:
        mapping = dict(points.items() if isinstance(points, Mapping) else points)

    theirs, order = _run_torch(torch_model, torch_inputs, set(mapping.values()))
    batch = _flax_batch(inputs, getattr(module, "dtype", jnp.float32))
    fused = _fused_members(model)
    ours, _ = _run_flax(module, params, batch, set(mapping) | {f for f, _, _ in fused.values()}, sown=False)
    for member, (f, i, outs) in fused.items():  # the fused product's share, named as stored
        if member in mapping and f in ours:
            ours[member] = split(ours[f], outs)[i]
    module_paths = {m for p in flatten_params(params) for m in _ancestors(p)}
    need_sown = [n for n in mapping if n not in ours and n not in module_paths]
    sown_error = None
    if need_sown:  # a second pass collects sow("intermediates", ...) values
        try:
            _, tree = _run_flax(module, params, batch, set(), sown=True)
        except ValueError as e:  # a module sowing under a child's name makes the collection unusable
            tree, sown_error = {}, f"collecting sown intermediates failed: {e}"
        for n in need_sown:
            v = _sown(tree, n)
            if v is not None:
                ours[n] = v

    pairs = sorted([*mapping.items(), (LOGITS, OUTPUT)], key=lambda kv: order.get(kv[1], math.inf))
    results, skipped = [], []
    for name, tname in pairs:
        a, b = ours.get(name), theirs.get(tname)
        if tname not in order:
            why = "the torch module never ran"
        elif a is None and name in need_sown:
            why = sown_error or f"{name!r} is neither a flax module path nor a sown intermediate"
        elif a is None:
            why = "the flax module was not called, or returned no array"
        elif b is None:
            why = "the torch module returned no tensor"
        else:
            got = _point(name, tname, np.asarray(a, np.float64), b, atol, rtol, order[tname], positions)
            if isinstance(got, Point):
                results.append(got)
                continue
            why = got
        skipped.append((name, tname, why))
    report = ParityReport(results, skipped, atol, rtol)
    if verbose:
        print(report.table())
    return report
