"""A ported module's graph as data, and the interpreter that runs it with jax.numpy.

The graph is plain JSON (never code, never a pickle):

    {"format": "mmjax.autoport/1", "module": "Resampler",
     "dims":    {"B": {"min": 1, "max": null}, "P": {"min": 2, "max": 4096}},   # symbolic dims
     "inputs":  [{"name": "media", "shape": ["B", "P", 32], "dtype": "float32"}],
     "params":  {"latents": {"shape": [6, 32], "dtype": "float32"}, ...},       # state_dict names read
     "constants": {"inv_freq": {"shape": [4], "dtype": "float32", "data": "<base64>"}},
     "nodes":   [{"name": "linear", "op": "aten.linear.default",
                  "args": [{"node": "media"}, {"param": "proj.weight"}, null], "kwargs": {},
                  "out": {"shape": ["B", "P", 48], "dtype": "float32"},
                  "source": "resampler.py:41 in forward: x = self.proj(x)"}, ...],
     "outputs": [{"node": "linear"}], "output_tree": "tensor"}             # tensor | tuple | list

An argument is a JSON value, a list of them, or one tagged object: {"node": name} (an earlier
node or an input), {"param": state_dict name}, {"const": name}, {"dtype": "bfloat16"} or
{"float": "inf"}. A shape entry is an int, a dim name, or an expression of dim names
("(P - 1)//2 + 1"); the interpreter binds the names from the inputs it is given and checks
every node's shape against what torch recorded, so a lowering that disagrees with torch is an
error naming the node and the user's source line, not a silent difference.
"""
from __future__ import annotations

import ast
import base64
import dataclasses
import json
import math
import operator
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.policy import KernelPolicy
from mmjax.autoport.table import CONTEXT, OPS
from mmjax.errors import AutoportError, LoadError

__all__ = ["FORMAT", "Graph", "run", "bind_dims", "eval_dim", "kind", "to_dtype", "decode_constant"]

FORMAT = "mmjax.autoport/1"
OUTPUT_TREES = ("tensor", "tuple", "list")


def to_dtype(name: str):
    """A torch dtype name ("float32", "int64", "bfloat16") -> the JAX dtype it runs as."""
    try:
        return jax.dtypes.canonicalize_dtype(jnp.dtype(name))
    except TypeError:
        raise AutoportError(f"dtype {name!r} has no JAX counterpart") from None


def decode_constant(spec: Mapping) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(spec["data"]), dtype=jnp.dtype(spec["dtype"]))
    return raw.reshape(spec["shape"])


# ------------------------------------------------------------------ symbolic dims

_FUNCS = {"Max": max, "Min": min, "FloorDiv": operator.floordiv, "Mod": operator.mod, "PythonMod": operator.mod,
          "CeilToInt": math.ceil, "FloorToInt": math.floor, "floor": math.floor, "ceiling": math.ceil,
          "CleanDiv": operator.floordiv, "IntTrueDiv": operator.truediv, "TruncToInt": int}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Pow: operator.pow, ast.Div: operator.truediv}


def eval_dim(expr, dims: Mapping[str, int]) -> int | None:
    """A recorded size (int, dim name or expression of them) under bound dims; None if it names
    an unbound dim or uses a form this small evaluator does not read."""
    if isinstance(expr, int):
        return expr

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.Name):
            return dims[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FUNCS:
            return _FUNCS[n.func.id](*(ev(a) for a in n.args))
        raise ValueError(ast.dump(n))

    try:
        return int(ev(ast.parse(str(expr), mode="eval").body))
    except (KeyError, ValueError, SyntaxError, TypeError, ZeroDivisionError):
        return None


def bind_dims(graph: "Graph", shapes) -> dict[str, int]:
    """Dim name -> size from the inputs' shapes; AutoportError when an input does not fit."""
    dims: dict[str, int] = {}
    for spec, shape in zip(graph.inputs, shapes):
        want = spec["shape"]
        if len(shape) != len(want):
            raise AutoportError(f"{graph.module}: input {spec['name']!r} has shape {tuple(shape)}, the port takes "
                                f"{len(want)} dims {_fmt(want)}")
        for axis, (w, got) in enumerate(zip(want, shape)):
            if isinstance(w, str) and w.isidentifier():
                if dims.setdefault(w, got) != got:
                    raise AutoportError(f"{graph.module}: input {spec['name']!r} dim {axis} ({w}) is {got}, but {w} "
                                        f"is {dims[w]} in an earlier input")
                lo, hi = graph.dims.get(w, {}).get("min"), graph.dims.get(w, {}).get("max")
                if (lo is not None and got < lo) or (hi is not None and got > hi):
                    raise AutoportError(f"{graph.module}: input {spec['name']!r} dim {axis} ({w}) = {got} is outside "
                                        f"the range it was exported for [{lo}, {hi if hi is not None else 'inf'}]")
    for spec, shape in zip(graph.inputs, shapes):
        for axis, (w, got) in enumerate(zip(spec["shape"], shape)):
            if eval_dim(w, dims) not in (None, got):
                raise AutoportError(f"{graph.module}: input {spec['name']!r} has shape {tuple(shape)}, the port takes "
                                    f"{_fmt(spec['shape'])} (dim {axis} must be {eval_dim(w, dims)})")
    return dims


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# ------------------------------------------------------------------ the graph


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """The JSON form, read-only, with the views the interpreter needs."""

    data: dict

    @classmethod
    def from_json(cls, data: Mapping, where: str = "graph") -> "Graph":
        """Check the structure (LoadError naming the first problem) before anything runs."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise LoadError(f"{where}: not an mmjax.autoport graph (format {got!r}, expected {FORMAT!r})")
        missing = [k for k in ("module", "dims", "inputs", "params", "constants", "nodes", "outputs", "output_tree")
                   if k not in data]
        if missing:
            raise LoadError(f"{where}: missing keys {missing}")
        if data["output_tree"] not in OUTPUT_TREES:
            raise LoadError(f"{where}: output_tree {data['output_tree']!r} is not one of {', '.join(OUTPUT_TREES)}")
        known = {i["name"] for i in data["inputs"]}
        unknown = []
        for node in data["nodes"]:
            if node["op"] not in OPS:
                unknown.append(f"{node['op']} (node {node['name']!r})")
            where_node = f"{where}: node {node['name']!r}"
            cls._check_refs([node["args"], list(node["kwargs"].values())], known, data, where_node)
            known.add(node["name"])
        if unknown:
            raise LoadError(f"{where}: ops this mmjax has no lowering for (saved by a newer mmjax?): "
                            + ", ".join(unknown))
        cls._check_refs(data["outputs"], known, data, f"{where}: outputs")
        return cls(dict(data))

    @staticmethod
    def _check_refs(value, known, data, what):
        if isinstance(value, list):
            for v in value:
                Graph._check_refs(v, known, data, what)
        elif isinstance(value, dict):
            if "node" in value and value["node"] not in known:
                raise LoadError(f"{what}: reads {value['node']!r}, which no earlier node or input defines")
            if "param" in value and value["param"] not in data["params"]:
                raise LoadError(f"{what}: reads parameter {value['param']!r}, not listed in the graph's params")
            if "const" in value and value["const"] not in data["constants"]:
                raise LoadError(f"{what}: reads constant {value['const']!r}, not listed in the graph's constants")
            if len(value) != 1 or not value.keys() <= {"node", "param", "const", "dtype", "float"}:
                raise LoadError(f"{what}: {value!r} is not one of the tagged values (node, param, const, dtype, float)")

    def to_json(self) -> dict:
        return self.data

    def dumps(self) -> str:
        """The JSON text, one node / param / input per line (diffs and greps read it line by line)."""
        parts = []
        for key, value in self.data.items():
            if isinstance(value, list) and value:
                body = ",\n".join("  " + json.dumps(v) for v in value)
                parts.append(f"{json.dumps(key)}: [\n{body}\n ]")
            elif isinstance(value, dict) and value:
                body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
                parts.append(f"{json.dumps(key)}: {{\n{body}\n }}")
            else:
                parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
        return "{\n " + ",\n ".join(parts) + "\n}\n"

    module = property(lambda self: self.data["module"])
    dims = property(lambda self: self.data["dims"])
    inputs = property(lambda self: self.data["inputs"])
    params = property(lambda self: self.data["params"])
    constants = property(lambda self: self.data["constants"])
    nodes = property(lambda self: self.data["nodes"])

    def param_structs(self, dtype=None) -> dict[str, jax.ShapeDtypeStruct]:
        """state_dict name -> ShapeDtypeStruct; floating params at `dtype` when given."""
        out = {}
        for name, p in self.params.items():
            dt = to_dtype(p["dtype"])
            if dtype is not None and jnp.issubdtype(dt, jnp.floating):
                dt = jnp.dtype(dtype)
            out[name] = jax.ShapeDtypeStruct(tuple(p["shape"]), dt)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n["op"]] = counts.get(n["op"], 0) + 1
        return counts


# ------------------------------------------------------------------ the interpreter


def run(graph: Graph, params: Mapping[str, Any], args, *, kernels: KernelPolicy = KernelPolicy()):
    """Evaluate the graph on jax arrays: params by state_dict name, args in the inputs' order.
    Traced under jax.jit, this is the ported module's JAX function."""
    if len(args) != len(graph.inputs):
        names = ", ".join(i["name"] for i in graph.inputs)
        raise AutoportError(f"{graph.module}: the port takes {len(graph.inputs)} input(s) ({names}), got {len(args)}")
    missing = [k for k in graph.params if k not in params]
    if missing:
        raise AutoportError(f"{graph.module}: params lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    args = [jnp.asarray(a) for a in args]
    dims = bind_dims(graph, [a.shape for a in args])
    env: dict[str, Any] = {spec["name"]: a for spec, a in zip(graph.inputs, args)}
    consts = {k: jnp.asarray(decode_constant(c)) for k, c in graph.constants.items()}

    def value(x):
        if isinstance(x, list):
            return [value(v) for v in x]
        if isinstance(x, dict):
            if "node" in x:
                return env[x["node"]]
            if "param" in x:
                return params[x["param"]]
            if "const" in x:
                return consts[x["const"]]
            if "dtype" in x:
                return to_dtype(x["dtype"])
            if "float" in x:
                return float(x["float"])
        return x

    for node in graph.nodes:
        fn = OPS[node["op"]]
        extra = {"kernels": kernels} if node["op"] in CONTEXT else {}
        try:
            kwargs = {k: value(v) for k, v in node["kwargs"].items()}
            out = fn(*value(node["args"]), **kwargs, **extra)
        except AutoportError as e:
            raise AutoportError(f"{_where(graph, node)}: {e}") from None
        except Exception as e:
            raise AutoportError(f"{_where(graph, node)}: the lowering failed: {type(e).__name__}: {e}") from e
        _check(graph, node, out, dims)
        env[node["name"]] = out
    outs = [value(o) for o in graph.data["outputs"]]
    tree = graph.data["output_tree"]
    return outs[0] if tree == "tensor" else (tuple(outs) if tree == "tuple" else outs)


def _where(graph: Graph, node) -> str:
    src = f", {node['source']}" if node.get("source") else ""
    return f"{graph.module}: node {node['name']!r} ({node['op']}{src})"


def _check(graph: Graph, node, out, dims) -> None:
    """The lowering's output shape must be the one torch recorded (where the dims are known)."""
    want = node.get("out")
    if not isinstance(want, dict) or "shape" not in want or not hasattr(out, "shape"):
        return
    expect = [eval_dim(d, dims) for d in want["shape"]]
    if len(expect) != len(out.shape) or any(e is not None and e != g for e, g in zip(expect, out.shape)):
        raise AutoportError(f"{_where(graph, node)}: the lowering gives shape {tuple(out.shape)}, torch recorded "
                            f"{_fmt(want['shape'])} = {tuple(expect)}")
    if out.dtype != to_dtype(want["dtype"]) and kind(out.dtype) != kind(to_dtype(want["dtype"])):
        raise AutoportError(f"{_where(graph, node)}: the lowering gives {out.dtype}, torch recorded {want['dtype']}")


def kind(dtype) -> str:
    """Float, int or bool: a bf16 run of an fp32 export differs in width, never in kind."""
    return "b" if dtype == jnp.bool_ else ("f" if jnp.issubdtype(dtype, jnp.inexact) else "i")
