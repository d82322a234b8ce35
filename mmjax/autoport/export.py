"""The torch side of a port: torch.export -> core ATen (but table.KEEP) -> the graph as JSON.

    ported = mmjax.autoport(resampler, (media,), dynamic_shapes={"media": {0: Dim("B"), 1: Dim("P")}})

torch is imported here only, inside the functions: loading and running a saved port never
needs it. Every op is checked against the table before anything is returned, so an op without
a lowering fails the port (AutoportError naming each op, its node and the source line that
produced it), and by default the port is run once against torch on the example inputs.
"""
from __future__ import annotations

import base64
import inspect
import os
import warnings

import jax.numpy as jnp
import numpy as np

from mmjax.autoport.graph import FORMAT, Graph
from mmjax.autoport.table import KEEP, OPS
from mmjax.errors import AutoportError

__all__ = ["autoport", "CHECK_RTOL"]

# A port whose outputs differ from torch's by more than this (relative to the largest |torch
# output|, at least 1) on the example inputs is refused: a lowering is wrong, not rounding.
# A module exported in bf16/fp16 rounds at other points than XLA does: a few ulps are allowed.
CHECK_RTOL = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
_DROPPED_KWARGS = {"device", "layout", "pin_memory", "memory_format", "non_blocking"}


def autoport(module, example_args, dynamic_shapes=None, *, check: bool = True):
    """torch nn.Module + example inputs -> mmjax.autoport.Ported (a graph and its params).

    example_args: a tensor or a tuple of tensors (the forward's positional inputs).
    dynamic_shapes: as torch.export's (a dict by argument name or a tuple, of {axis: Dim});
    a Dim's name names that dim in the graph ("B", "P"). Other dims are fixed.
    check: run torch and the port on example_args and refuse a port that disagrees."""
    import torch

    from mmjax.autoport.ported import Ported

    if not isinstance(module, torch.nn.Module):
        raise AutoportError(f"autoport: expected a torch.nn.Module, got {type(module).__name__}")
    args = (example_args,) if isinstance(example_args, torch.Tensor) else tuple(example_args)
    bad = [i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]
    if bad:
        raise AutoportError(f"autoport({type(module).__name__}): example_args must be tensors; argument(s) {bad} "
                            "are not (close over other values in a wrapper module)")
    modes = {m: m.training for m in module.modules()}
    module.eval()  # a port runs inference: dropout off, batch-norm statistics from the buffers
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch.export's own pytree deprecation (LeafSpec), raised from inside torch
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            ep = ep.run_decompositions(_decompositions())
            want = module(*args) if check else None
    except Exception as e:
        first = "\n".join(str(e).strip().splitlines()[:12])  # keeps torch's "Suggested fixes"
        raise AutoportError(f"autoport({type(module).__name__}): torch.export failed: {type(e).__name__}: "
                            f"{first}") from e
    finally:
        for m, training in modes.items():
            m.training = training
    graph, params = _to_graph(ep, type(module).__name__, _dim_names(module, args, dynamic_shapes))
    ported = Ported(Graph.from_json(graph), {k: jnp.asarray(v) for k, v in params.items()})
    if check:
        _check_against_torch(want, args, ported)
    return ported


def _decompositions():
    import torch

    table = torch.export.default_decompositions()
    for name in KEEP:
        _, op, overload = name.split(".")
        table.pop(getattr(getattr(torch.ops.aten, op), overload), None)
    return table


def _dim_names(module, args, dynamic_shapes) -> dict[tuple[int, int], str]:
    """(input index, axis) -> the name of the Dim the user gave it."""
    if dynamic_shapes is None:
        return {}
    if isinstance(dynamic_shapes, dict):
        try:
            bound = inspect.signature(module.forward).bind(*args).arguments
        except TypeError:
            bound = {}
        per_arg = [dynamic_shapes.get(name) for name in bound]
    else:
        per_arg = list(dynamic_shapes)
    out = {}
    for i, spec in enumerate(per_arg):
        items = spec.items() if isinstance(spec, dict) else enumerate(spec or ())
        for axis, dim in items:
            name = getattr(dim, "__name__", None)
            if dim is not None and name and name.isidentifier():
                out[(i, axis)] = name
    return out


def _to_graph(ep, module_name: str, dim_names) -> tuple[dict, dict[str, np.ndarray]]:
    import torch
    from torch.export.graph_signature import InputKind

    sig = {s.arg.name: s for s in ep.graph_signature.input_specs}
    nodes = list(ep.graph.nodes)
    user_inputs = [n for n in nodes if n.op == "placeholder" and sig[n.name].kind == InputKind.USER_INPUT]
    rename = _symbol_names(user_inputs, dim_names)
    params, constants, refs, inputs = {}, {}, {}, []
    arrays: dict[str, np.ndarray] = {}
    for n in nodes:
        if n.op != "placeholder":
            continue
        spec = sig[n.name]
        if spec.kind == InputKind.USER_INPUT:
            inputs.append({"name": n.name, **_tensor_meta(n.meta["val"], rename)})
            refs[n.name] = {"node": n.name}
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.persistent is not False:
            refs[n.name] = {"param": spec.target}
            if n.users:  # a param the forward never reads is left out of the port
                params[spec.target] = _tensor_meta(n.meta["val"], rename)
                arrays[spec.target] = _numpy(ep.state_dict[spec.target])
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            refs[n.name] = {"const": spec.target}
            if n.users:
                a = _numpy(ep.constants[spec.target])
                constants[spec.target] = {"shape": list(a.shape), "dtype": str(a.dtype),
                                          "data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()}
        else:
            raise AutoportError(f"{module_name}: graph input {n.name} is a {spec.kind.name}, which a port cannot hold")

    def enc(a, where):
        if isinstance(a, torch.fx.Node):
            return refs.get(a.name, {"node": a.name})
        if isinstance(a, (list, tuple)):
            return [enc(x, where) for x in a]
        if isinstance(a, torch.dtype):
            return {"dtype": str(a).removeprefix("torch.")}
        if isinstance(a, float) and not np.isfinite(a):
            return {"float": str(a)}
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        raise AutoportError(f"{module_name}: {where}: an argument of type {type(a).__name__} cannot be saved")

    out_nodes, unknown = [], []
    for n in nodes:
        if n.op == "output":
            outputs = n.args[0]
        elif n.op == "call_function":
            op = _op_name(n.target)
            entry = {"name": n.name, "op": op, "args": enc(list(n.args), f"node {n.name!r}"),
                     "kwargs": {k: enc(v, f"node {n.name!r}") for k, v in n.kwargs.items() if k not in _DROPPED_KWARGS},
                     "out": _out_meta(n.meta.get("val"), rename), "source": _source(n)}
            if op not in OPS:
                unknown.append(entry)
            out_nodes.append(entry)
    if unknown:
        lines = [f"  {e['op']} at node {e['name']!r}: {e['source'] or 'no source line recorded'}" for e in unknown]
        raise AutoportError(f"{module_name}: {len(unknown)} op(s) have no JAX lowering in mmjax.autoport's table "
                            "(mmjax/autoport/table.py); nothing was ported:\n" + "\n".join(lines))
    structure = ep.call_spec.out_spec.unflatten(list(range(len(outputs))))
    tree = {int: "tensor", tuple: "tuple", list: "list"}.get(type(structure))
    if tree is None or (tree != "tensor" and not all(isinstance(i, int) for i in structure)):
        raise AutoportError(f"{module_name}: the forward must return a tensor or a tuple/list of tensors")
    dims = {name: _range(ep.range_constraints.get(sym)) for sym, name in rename.items()}
    graph = {"format": FORMAT, "module": module_name, "dims": dims, "inputs": inputs, "params": params,
             "constants": constants, "nodes": out_nodes, "outputs": [enc(o, "outputs") for o in outputs],
             "output_tree": tree}
    return graph, arrays


def _symbol_names(user_inputs, dim_names) -> dict:
    """sympy symbol of each dynamic input dim -> its user-given name (else input_axis)."""
    rename = {}
    for i, n in enumerate(user_inputs):
        for axis, d in enumerate(n.meta["val"].shape):
            expr = getattr(getattr(d, "node", None), "expr", None)
            if expr is not None and expr.is_Symbol and expr not in rename:
                rename[expr] = dim_names.get((i, axis), f"{n.name}_{axis}")
    return rename


def _size(d, rename):
    expr = getattr(getattr(d, "node", None), "expr", None)
    if expr is None or not expr.free_symbols:
        return int(d)
    import sympy

    return str(expr.xreplace({s: sympy.Symbol(name) for s, name in rename.items()}))


def _tensor_meta(t, rename) -> dict:
    return {"shape": [_size(d, rename) for d in t.shape], "dtype": str(t.dtype).removeprefix("torch.")}


def _out_meta(val, rename):
    import torch

    if isinstance(val, torch.Tensor):
        return _tensor_meta(val, rename)
    if isinstance(val, (list, tuple)):
        return [_out_meta(v, rename) for v in val]
    if isinstance(val, (int, torch.SymInt)):
        return {"int": _size(val, rename)}
    return None


def _range(vr) -> dict:
    if vr is None:
        return {"min": None, "max": None}
    bound = lambda v: int(v) if getattr(v, "is_Integer", False) else None  # int_oo: unbounded
    return {"min": bound(vr.lower), "max": bound(vr.upper)}


def _op_name(target) -> str:
    if hasattr(target, "_schema"):  # an OpOverload: aten.linear.default
        return str(target)
    mod = {"_operator": "operator", "builtins": "operator"}.get(target.__module__, target.__module__)
    return f"{mod}.{target.__name__}"


def _source(node) -> str:
    """The user's line that produced the node: the last frame of its stack outside torch."""
    import torch

    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames, lines = [], (node.meta.get("stack_trace") or "").splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith('File "') and not s[6:].startswith((torch_dir, "torch" + os.sep)):
            path, _, rest = s[6:].partition('", line ')
            lineno, _, func = rest.partition(", in ")
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append(f"{path}:{lineno} in {func}: {code}")
    stack = node.meta.get("nn_module_stack") or {}
    where = list(stack.values())[-1] if stack else None
    real = where and where[0] and not where[1].startswith("_empty")  # export's placeholder entry
    module = f" (module {where[0]}: {where[1].rsplit('.', 1)[-1]})" if real else ""
    return (frames[-1] if frames else "") + module


def _numpy(t) -> np.ndarray:
    import ml_dtypes
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy().copy()


def _check_against_torch(want, args, ported) -> None:
    import jax
    import torch

    flat_want = [want] if isinstance(want, torch.Tensor) else list(want)
    got = jax.jit(ported.apply)(ported.params, *[_numpy(a) for a in args])
    flat_got = [got] if ported.graph.data["output_tree"] == "tensor" else list(got)
    for i, (w, g) in enumerate(zip(flat_want, flat_got)):
        rtol = CHECK_RTOL.get(str(w.dtype).removeprefix("torch."), 0.0)  # ints and bools: exact
        w, g = _numpy(w).astype(np.float64), np.asarray(g, np.float64)
        if w.shape != g.shape:
            raise AutoportError(f"{ported.graph.module}: output {i} has shape {g.shape} in JAX, {w.shape} in torch")
        if (np.isnan(w) != np.isnan(g)).any():
            raise AutoportError(f"{ported.graph.module}: output {i} has NaNs where torch's has none (or the reverse) "
                                "on the example inputs; a lowering in mmjax/autoport disagrees with torch")
        with np.errstate(invalid="ignore"):  # inf - inf
            diff = np.where((w == g) | np.isnan(w), 0.0, np.abs(w - g))  # equal infinities and shared NaNs agree
        err = float(diff.max()) if w.size else 0.0
        bound = rtol * max(1.0, float(np.nanmax(np.abs(np.where(np.isinf(w), 0, w)))) if w.size else 0.0)
        if not err <= bound:
            raise AutoportError(f"{ported.graph.module}: output {i} differs from torch by {err:.3g} on the example "
                                f"inputs (allowed {bound:.3g}); a lowering in mmjax/autoport disagrees with torch")
