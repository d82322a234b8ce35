"""A ported module: its graph (data) and its params (named by the torch state_dict), saved as a
folder and loaded without torch.

    ported.save("bridge/")               # bridge/graph.json + bridge/params.safetensors
    ported = mmjax.autoport.load("bridge/")
    y = jax.jit(ported.apply)(ported.params, x)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.kernels.policy import KernelPolicy
from mmjax.autoport.graph import Graph, kind, run, to_dtype
from mmjax.errors import LoadError

__all__ = ["Ported", "load", "GRAPH_FILE", "PARAMS_FILE"]

GRAPH_FILE = "graph.json"
PARAMS_FILE = "params.safetensors"


@dataclasses.dataclass(frozen=True, eq=False)
class Ported:
    graph: Graph
    params: dict[str, Any]  # state_dict name -> array
    kernels: KernelPolicy = KernelPolicy()  # for scaled_dot_product_attention (mmjax.kernels.attention)

    def apply(self, params, *args):
        """The JAX function: params (by state_dict name) and the forward's inputs -> its outputs."""
        return run(self.graph, params, args, kernels=self.kernels)

    def __call__(self, *args):
        return self.apply(self.params, *args)

    def astype(self, dtype) -> "Ported":
        """The same port with its floating params cast (bf16 inference); the graph is unchanged."""
        cast = {k: (jnp.asarray(v, dtype) if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating) else v)
                for k, v in self.params.items()}
        return dataclasses.replace(self, params=cast)

    def param_tree(self) -> dict:
        """The params nested at the dots of their names ("blocks.0.w" -> ["blocks"]["0"]["w"]): the
        layout a composed model's "autoport" component holds them in."""
        return nest(self.params)

    def save(self, path, *, overwrite: bool = False) -> str:
        """Write the folder (graph.json, params.safetensors) atomically; returns its path."""
        from safetensors.numpy import save_file

        path = os.path.abspath(os.fspath(path))
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
            raise LoadError(f"{path}: already exists; pass overwrite=True to replace it")
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        try:
            with open(os.path.join(tmp, GRAPH_FILE), "w", encoding="utf-8") as f:
                f.write(self.graph.dumps())
            save_file({k: self._stored(k, v) for k, v in self.params.items()}, os.path.join(tmp, PARAMS_FILE))
            if os.path.exists(path):
                shutil.rmtree(path)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _stored(self, name, v) -> np.ndarray:
        """Floats as they are (a bf16 port saves bf16); ints and bools at torch's recorded dtype."""
        a = np.asarray(v)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            a = a.astype(jnp.dtype(self.graph.params[name]["dtype"]))
        return np.ascontiguousarray(a)

    def __repr__(self) -> str:
        g = self.graph
        n = sum(int(np.prod(p["shape"])) for p in g.params.values())
        ins = ", ".join(f"{i['name']}[{', '.join(map(str, i['shape']))}]" for i in g.inputs)
        return f"Ported({g.module}: {len(g.nodes)} nodes, {len(g.params)} params ({n:,} values), inputs {ins})"


def nest(flat: dict) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def read_graph(path) -> Graph:
    """The graph of a saved port (LoadError naming the problem)."""
    path = os.fspath(path)
    file = os.path.join(path, GRAPH_FILE)
    if not os.path.isfile(file):
        raise LoadError(f"{path}: no {GRAPH_FILE} here; is this a folder written by Ported.save?")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{file}: not readable JSON: {e}") from None
    return Graph.from_json(data, where=file)


def load(path) -> Ported:
    """A folder written by Ported.save -> Ported, params on the default device. Needs no torch."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    graph = read_graph(path)
    file = os.path.join(os.fspath(path), PARAMS_FILE)
    try:
        arrays = load_file(file)
    except (OSError, SafetensorError) as e:
        raise LoadError(f"{file}: cannot read the params: {e}") from None
    problems = [f"{k}: missing" for k in graph.params if k not in arrays]
    problems += [f"{k}: not read by the graph" for k in arrays if k not in graph.params]
    for k, spec in graph.params.items():
        a = arrays.get(k)
        if a is not None and (list(a.shape) != list(spec["shape"]) or kind(a.dtype) != kind(to_dtype(spec["dtype"]))):
            problems.append(f"{k}: graph expects {spec['dtype']}{spec['shape']}, file has {a.dtype}{list(a.shape)}")
    if problems:
        raise LoadError(f"{file}: params do not match {GRAPH_FILE}:\n  " + "\n  ".join(problems))
    return Ported(graph, {k: jnp.asarray(arrays[k]) for k in graph.params})
