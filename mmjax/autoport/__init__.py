"""Auto-port a torch module mmjax has no component for: torch.export -> a JSON graph of ATen ops
-> a JAX function with named params.

    import mmjax
    ported = mmjax.autoport(torch_module, example_args, dynamic_shapes={"x": {0: Dim("B"), 1: Dim("P")}})
    y = jax.jit(ported.apply)(ported.params, *jax_args)      # params: {state_dict name: array}
    ported.save("bridge/"); ported = mmjax.autoport.load("bridge/")   # no torch needed to load

`mmjax.autoport` is this package, and calling it calls `autoport` (mmjax/autoport/export.py,
the only file that imports torch). The graph format and its interpreter: graph.py; the op
table: table.py (lowerings in ops_tensor.py and ops_nn.py); a saved port as a vision or
projector component of a composed model: component.py (spec {"type": "autoport", "path": ...}).
docs/autoport.md has the walk-through.
"""
import sys
import types

from mmjax.autoport import component  # noqa: F401  (registers the "autoport" vision and projector)
from mmjax.autoport.export import autoport
from mmjax.autoport.ported import Ported, load

__all__ = ["autoport", "load", "Ported"]


class _CallablePackage(types.ModuleType):
    """Makes `mmjax.autoport(...)` the same call as `mmjax.autoport.autoport(...)`."""

    def __call__(self, module, example_args, dynamic_shapes=None, **kwargs) -> Ported:
        return autoport(module, example_args, dynamic_shapes, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
