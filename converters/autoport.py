"""--autoport: a prefix of the checkpoint is a torch module of the user's own; port it.

    python -m converters.torch2flax CKPT --out OUT --model pkg.port:FAMILY --rules rules.py \\
        --autoport 'vis.=pkg.towers:Tower(width=32, depth=2)'

The value is `[KIND:]PREFIX=pkg.mod:Class(kwargs)`, kwargs Python literals. The converter builds
`Class(**kwargs)`, loads the checkpoint's PREFIX* tensors into it (strictly: a missing or an
extra name is an error), ports it with mmjax.autoport on the example input the component's
config describes (vision: pixel_values [2, C, S, S]; projector: features [2, P, in_features];
the image count dynamic), and returns
  * the config with the port's graph in that component (mmjax_config.json then carries it), and
  * rules: PREFIX<name> -> <kind>/<name, dots as "/"> unchanged, for every tensor the graph
    reads; the prefix's other tensors (a buffer the forward never reads) are dropped by name.
KIND ("vision" or "projector") picks the component when the model has two "autoport" ones.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re

import numpy as np

from converters.readers import open_checkpoint
from converters.rules import Rule
from converters.transforms import identity
from mmjax.errors import ConversionError

__all__ = ["AutoportSpec", "parse_autoport", "port_prefixes"]

KINDS = ("vision", "projector")
_MODULE = re.compile(r"^(?P<mod>[A-Za-z_][\w.]*):(?P<cls>[A-Za-z_]\w*)(?:\((?P<kwargs>.*)\))?$", re.S)


@dataclasses.dataclass(frozen=True)
class AutoportSpec:
    prefix: str  # "vis."
    kind: str | None  # "vision" | "projector" | None (the model's one autoport component)
    module: str  # "pkg.mod:Class"
    kwargs: dict
    text: str  # as given

    def __str__(self) -> str:
        return self.text

    def build(self):
        """Class(**kwargs), imported like --model's pkg.mod:FAMILY."""
        mod, cls = self.module.split(":")
        try:
            factory = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError) as e:
            raise ConversionError(f"--autoport {self.text!r}: cannot import {self.module}: {e}") from e
        try:
            return factory(**self.kwargs)
        except Exception as e:
            raise ConversionError(f"--autoport {self.text!r}: {self.module}(**{self.kwargs}) failed: "
                                  f"{type(e).__name__}: {e}") from e


def parse_autoport(text: str) -> AutoportSpec:
    where, sep, module = text.partition("=")
    kind, _, prefix = where.rpartition(":") if ":" in where else (None, "", where)
    m = _MODULE.match(module.strip())
    if not sep or not prefix or m is None or (kind is not None and kind not in KINDS):
        raise ConversionError(f"--autoport {text!r}: expected [vision:|projector:]PREFIX=pkg.module:Class(k=v, ...), "
                              "e.g. 'vis.=my_pkg.towers:Tower(width=32)'")
    kwargs = {}
    if m.group("kwargs"):
        try:
            call = ast.parse(f"f({m.group('kwargs')})", mode="eval").body
            if call.args:
                raise ValueError("give keyword arguments only")
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError) as e:
            raise ConversionError(f"--autoport {text!r}: the arguments must be keyword=Python literal: {e}") from None
    return AutoportSpec(prefix, kind, f"{m.group('mod')}:{m.group('cls')}", kwargs, text)


def port_prefixes(cfg, specs, ckpt: str):
    """(config, [spec text or AutoportSpec]) -> (config with the ports' graphs, their rules)."""
    rules = []
    for spec in specs:
        spec = spec if isinstance(spec, AutoportSpec) else parse_autoport(spec)
        kind = _target(cfg, spec)
        module = spec.build()
        with open_checkpoint(ckpt) as reader:
            names = [n for n in reader.tensors() if n.startswith(spec.prefix)]
            if not names:
                raise ConversionError(f"--autoport {spec.text!r}: no tensor of {ckpt} starts with {spec.prefix!r}")
            _load_into(module, {n[len(spec.prefix):]: reader.read(n) for n in names}, spec)
        ported = _port(module, getattr(cfg, kind), kind, cfg, spec)
        cfg = dataclasses.replace(cfg, **{kind: dataclasses.replace(getattr(cfg, kind), graph=ported.graph.to_json(),
                                                                      path=None)})
        read = set(ported.graph.params)
        rules += [Rule(spec.prefix + k, f"{kind}/{k.replace('.', '/')}", identity) for k in sorted(read)]
        rules += [Rule(n, None) for n in names if n[len(spec.prefix):] not in read]
    return cfg, rules


def _target(cfg, spec: AutoportSpec) -> str:
    ported = [k for k in KINDS if getattr(cfg, f"{k}_type", None) == "autoport"]
    if spec.kind is not None:
        if spec.kind not in ported:
            raise ConversionError(f"--autoport {spec.text!r}: the model's {spec.kind} is not an 'autoport' component")
        return spec.kind
    if len(ported) != 1:
        have = ", ".join(ported) or "none"
        raise ConversionError(f"--autoport {spec.text!r}: needs a composed model with one 'autoport' vision or "
                              f"projector component (it has: {have}); name it with vision:{spec.prefix}=... or "
                              f"projector:{spec.prefix}=...")
    return ported[0]


def _load_into(module, arrays: dict, spec: AutoportSpec) -> None:
    import torch

    floating = lambda a: a.dtype.kind in "fV"  # ml_dtypes' bfloat16 is kind "V"
    state = {k: torch.from_numpy(np.array(a, np.float32) if floating(a) else np.array(a)) for k, a in arrays.items()}
    module.float()  # ported in float32; the rules write the checkpoint's values at --dtype
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConversionError(f"--autoport {spec.text!r}: the checkpoint's {spec.prefix}* tensors do not fit "
                              f"{spec.module}: {e}") from None


def _port(module, comp, kind: str, cfg, spec: AutoportSpec):
    import torch
    from torch.export import Dim

    import mmjax

    images = Dim("I", min=1)
    torch.manual_seed(0)  # the port is checked against torch on this input: random, not zeros
    if kind == "vision":
        example = torch.randn(2, comp.num_channels, comp.image_size, comp.image_size)
    else:
        P = cfg.vision.num_features
        if P is None:
            raise ConversionError(f"--autoport {spec.text!r}: a projector port needs a fixed number of vision "
                                  "features per image")
        example = torch.randn(2, P, comp.in_features)
    return mmjax.autoport(module, (example,), dynamic_shapes=({0: images},))
