"""A port as a component of a composed model: vision or projector type "autoport".

    ComposedConfig.from_spec({
        "vision": {"type": "vit", ...},
        "projector": {"type": "autoport", "path": "bridge/"},       # in/out_features default as usual
        "decoder": {...}, ...})

The config reads the port's graph from `path` once and keeps it (field `graph`, the JSON), so
a converted folder's mmjax_config.json carries the graph and loads without the port folder or
torch. The params live in the composed model's tree under the component, nested at the dots
of their state_dict names (projector/layers/0/to_q/weight), so orbax, the converter and the
sharding rules see them like any other (the composed table's final ".*" rule replicates them).
`init` gives zeros: the values come from the converter (`--autoport PREFIX=pkg.mod:Class(...)`
or rules), or from `Ported.param_tree()` when composing in Python.

Without `path` or `graph` (what a family's spec says before conversion) a component must give
its sizes, and the converter's --autoport fills the graph in.

Axis legend: I images, C channels, S image side, P features per image, Q tokens per image,
Dv vision width, D decoder width.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.kernels.policy import KernelPolicy
from mmjax.autoport.graph import Graph, bind_dims, eval_dim, run
from mmjax.autoport.ported import nest, read_graph
from mmjax.components import register_component
from mmjax.config import ConfigBase

__all__ = ["AutoportVisionConfig", "AutoportProjectorConfig", "AutoportComponent"]


def _graph_field():
    # The port's graph JSON: compared, but left out of hash and repr (it is large).
    return dataclasses.field(default=None, repr=False, hash=False)


def _init_port(cfg, kind: str) -> Graph | None:
    """Read the graph from cfg.path unless the config carries it; keep the parsed Graph."""
    if cfg.graph is None and cfg.path is not None:
        object.__setattr__(cfg, "graph", read_graph(cfg.path).to_json())
    graph = None if cfg.graph is None else Graph.from_json(cfg.graph, where=f"autoport {kind} graph")
    if graph is not None and (len(graph.inputs) != 1 or graph.data["output_tree"] != "tensor"):
        raise ValueError(f"autoport {kind} ({graph.module}): a component's port takes one input and returns one "
                         f"tensor; this one takes {len(graph.inputs)} and returns a {graph.data['output_tree']}")
    object.__setattr__(cfg, "_port", graph)
    return graph


def _output_shape(graph: Graph, in_shape: tuple) -> tuple:
    """The port's output shape for one input shape: from torch's recorded shapes when they
    evaluate, else by tracing the graph (jax.eval_shape, nothing computed)."""
    dims = bind_dims(graph, [in_shape])
    ref = graph.data["outputs"][0]
    node = next((n for n in graph.nodes if n["name"] == ref.get("node")), None)
    shape = [eval_dim(d, dims) for d in node["out"]["shape"]] if node and isinstance(node.get("out"), dict) else [None]
    if None not in shape:
        return tuple(shape)
    x = jax.ShapeDtypeStruct(in_shape, jnp.float32)
    return jax.eval_shape(lambda p, x: run(graph, p, (x,)), graph.param_structs(), x).shape


def _settle(cfg, kind: str, name: str, derived: int) -> None:
    given = getattr(cfg, name)
    if given is None:
        object.__setattr__(cfg, name, int(derived))
    elif given != derived:
        raise ValueError(f"autoport {kind}: {name}={given}, but the port ({cfg._port.module}) gives {derived}")


def _need(cfg, kind: str, names) -> None:
    missing = [n for n in names if getattr(cfg, n) is None]
    if missing:
        raise ValueError(f"autoport {kind}: without a port (path= or graph=) the spec must give {', '.join(missing)}; "
                         "the converter's --autoport fills the graph in")


@dataclasses.dataclass(frozen=True)
class AutoportVisionConfig(ConfigBase):
    """A ported vision tower: pixel_values [I, C, S, S] -> features [I, P, Dv]."""
    path: str | None = None  # a folder written by Ported.save
    image_size: int | None = None  # S, input side in pixels; from the port when its input size is fixed
    num_channels: int | None = None  # C, input channels; from the port
    width: int | None = None  # Dv, the features' width; from the port
    num_features: int | None = None  # P, features per image; from the port
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")
    graph: dict | None = _graph_field()  # the port's graph JSON, read from path (kept with a converted model)

    def __post_init__(self):
        graph = _init_port(self, "vision")
        if graph is None:
            _need(self, "vision", ("image_size", "num_channels", "width", "num_features"))
            return
        shape = graph.inputs[0]["shape"]
        if len(shape) != 4:
            raise ValueError(f"autoport vision ({graph.module}): the port's input {graph.inputs[0]['name']} is "
                             f"{shape}, not pixel_values [I, C, S, S]")
        if isinstance(shape[1], int):
            _settle(self, "vision", "num_channels", shape[1])
        if isinstance(shape[2], int) and shape[2] == shape[3]:
            _settle(self, "vision", "image_size", shape[2])
        _need(self, "vision", ("image_size", "num_channels"))
        out = _output_shape(graph, (1, self.num_channels, self.image_size, self.image_size))
        if len(out) != 3:
            raise ValueError(f"autoport vision ({graph.module}): the port returns {out} for one image, not [1, P, Dv]")
        _settle(self, "vision", "num_features", out[1])
        _settle(self, "vision", "width", out[2])


@dataclasses.dataclass(frozen=True)
class AutoportProjectorConfig(ConfigBase):
    """A ported projector: features [I, P, Dv] -> [I, Q, D]."""
    in_features: int  # Dv, the vision features' width
    out_features: int  # D, the decoder width
    path: str | None = None  # a folder written by Ported.save
    num_queries: int | None = None  # Q when it does not follow P (a resampler); needed without a port
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")
    graph: dict | None = _graph_field()  # the port's graph JSON, read from path (kept with a converted model)

    def __post_init__(self):
        graph = _init_port(self, "projector")
        if graph is None:
            return
        shape = graph.inputs[0]["shape"]
        if len(shape) != 3 or eval_dim(shape[2], {}) != self.in_features:
            raise ValueError(f"autoport projector ({graph.module}): the port's input {graph.inputs[0]['name']} is "
                             f"{shape}, not features [I, P, in_features={self.in_features}]")

    def num_tokens(self, num_features: int) -> int:
        if self._port is None:
            return num_features if self.num_queries is None else self.num_queries
        out = _output_shape(self._port, (1, num_features, self.in_features))
        if len(out) != 3 or out[2] != self.out_features:
            raise ValueError(f"autoport projector ({self._port.module}): the port returns {out} for [1, {num_features}, "
                             f"{self.in_features}], not [1, Q, out_features={self.out_features}]")
        if self.num_queries is not None and self.num_queries != out[1]:
            raise ValueError(f"autoport projector: num_queries={self.num_queries}, but the port gives {out[1]}")
        return out[1]


class AutoportComponent(nn.Module):
    """Runs the port's graph on the component's own params (zeros at init)."""

    cfg: AutoportVisionConfig | AutoportProjectorConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # vision: [I, C, S, S] -> [I, P, Dv]; projector: [I, P, Dv] -> [I, Q, D]
        graph = self.cfg._port
        if graph is None:
            raise ValueError("autoport component: no port (give path=, or convert with --autoport PREFIX=pkg.mod:Class)")
        params = {}
        for top, sub in nest(graph.param_structs(self.dtype)).items():
            value = self.param(top, lambda _, s=sub: jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), s))
            params.update(_dotted(top, value))
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(self.dtype)
        return run(graph, params, (x,), kernels=self.cfg.kernels)


def _dotted(prefix: str, tree) -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_dotted(f"{prefix}.{k}", v))
    return out


register_component("vision", "autoport", AutoportVisionConfig, AutoportComponent)
register_component("projector", "autoport", AutoportProjectorConfig, AutoportComponent)
