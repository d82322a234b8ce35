"""One static kernel policy: which implementation each kernel family uses on each platform.

A KernelPolicy is a frozen, hashable config field (`kernels`) of every component config, so
it travels with the flax module into every jit cache key: a program's kernels are fixed by its
config, never by a global read while tracing (the default backend, an environment variable,
a thread-local switch). Which *platform* a branch is for is decided later still, when the
program is lowered: `dispatch` stages every platform's choice out with
`jax.lax.platform_dependent`, and lowering for one platform keeps only its branch (exported for
CUDA a program holds the Triton calls and no CPU custom call; lowered for CPU the reverse).

Fields (docs/kernels.md, "Kernel policy"):
  attention_cpu  "cpu":    the C++ kernels of mmjax.kernels.cpu where they apply (float32, no
                           segment ids, ...), XLA's ops otherwise
                 "xla":    XLA's ops (mmjax.kernels.attention.xla_attention)
                 "pallas": the Pallas kernels in interpret mode (slow; tests)
  attention_gpu  "pallas": the Pallas kernels compiled through Triton | "xla"
  attention_tpu  "pallas": JAX's TPU Pallas kernels (splash / paged attention) for the masks
                           they express, XLA otherwise (mmjax/kernels/tpu_attention.py) | "xla"
  matmul_cpu     "cpu":    Einsum sends 1..8-row products (decode steps) to cpu.gemv, whose
                           weights may be float32, bfloat16 or int8 (+ scale) | "xla"
  rope_cpu       "once":   the rope cos/sin tables go through an identity product so XLA:CPU
                           computes them once, not once per head and layer | "plain"
  platforms      the platforms whose branches are traced (default all four); any other
                 platform gets the XLA path.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Hashable

import jax

from mmjax.config_base import ConfigBase

__all__ = ["CHOICES", "PLATFORMS", "KernelPolicy", "dispatch", "with_kernels"]

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # lowering platforms, as jax.lax.platform_dependent names them
CHOICES = {
    "attention_cpu": ("cpu", "xla", "pallas"),
    "attention_gpu": ("pallas", "xla"),
    "attention_tpu": ("pallas", "xla"),
    "matmul_cpu": ("cpu", "xla"),
    "rope_cpu": ("once", "plain"),
}
# Environment switches, read by KernelPolicy.from_env when a model is loaded (never while tracing).
ENV_SWITCHES = {"MMJAX_CPU_GEMV": ("matmul_cpu", "xla"), "MMJAX_CPU_ATTENTION": ("attention_cpu", "xla")}


@dataclasses.dataclass(frozen=True)
class KernelPolicy(ConfigBase):
    attention_cpu: str = "cpu"
    attention_gpu: str = "pallas"
    attention_tpu: str = "pallas"
    matmul_cpu: str = "cpu"
    rope_cpu: str = "once"
    platforms: tuple[str, ...] = PLATFORMS

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"KernelPolicy.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        object.__setattr__(self, "platforms", tuple(self.platforms))  # a JSON list comes back as a tuple
        unknown = [p for p in self.platforms if p not in PLATFORMS]
        if unknown or not self.platforms:
            raise ValueError(f"KernelPolicy.platforms={self.platforms!r}: each must be one of {', '.join(PLATFORMS)}")

    def attention(self, platform: str) -> str:
        """The attention choice for a lowering platform ("cpu", "cuda", "rocm", "tpu")."""
        return {"cpu": self.attention_cpu, "tpu": self.attention_tpu}.get(platform, self.attention_gpu)

    @classmethod
    def from_attention_impl(cls, impl: str) -> KernelPolicy:
        """The policy a config written before this field meant by attention_impl="auto" | "xla" |
        "pallas" ("xla" kept the CPU kernels: they were part of the XLA path)."""
        if impl == "auto":
            return cls()
        if impl == "xla":
            return cls(attention_gpu="xla", attention_tpu="xla")
        if impl == "pallas":
            return cls(attention_cpu="pallas")
        raise ValueError(f"attention_impl={impl!r} is not one of auto, xla, pallas")

    @classmethod
    def from_env(cls, base: KernelPolicy | None = None, environ=None) -> KernelPolicy:
        """`base` (default KernelPolicy()) with the opt-out switches applied: MMJAX_CPU_GEMV=0 sets
        matmul_cpu="xla", MMJAX_CPU_ATTENTION=0 sets attention_cpu="xla" (where it was "cpu").
        mmjax.load calls it once per model; nothing else reads these variables."""
        policy = cls() if base is None else base
        environ = os.environ if environ is None else environ
        for var, (field, off) in ENV_SWITCHES.items():
            if environ.get(var, "1").lower() in ("0", "false", "off", "no") and getattr(policy, field) == "cpu":
                policy = dataclasses.replace(policy, **{field: off})
        return policy

    def without_cpu_custom_calls(self) -> KernelPolicy:
        """For programs partitioned over a mesh: a custom call has no sharding rule, so the C++
        CPU kernels give way to XLA's ops (which the partitioner splits)."""
        return dataclasses.replace(
            self, attention_cpu="xla" if self.attention_cpu == "cpu" else self.attention_cpu, matmul_cpu="xla")


def with_kernels(cfg, policy: KernelPolicy | Callable[[KernelPolicy], KernelPolicy]):
    """`cfg` with every KernelPolicy field (the `kernels` of each component config, found
    recursively through nested config dataclasses such as `vision`, `projector`, `decoder`,
    `text`) replaced by `policy`, or by `policy(old)` when it is a function, e.g.
    `with_kernels(cfg, KernelPolicy.without_cpu_custom_calls)`. Anything else is returned as is."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return cfg
    changes = {}
    for f in dataclasses.fields(cfg):
        old = getattr(cfg, f.name)
        if isinstance(old, KernelPolicy):
            new = old if not f.init else policy(old) if callable(policy) else policy
        else:
            new = with_kernels(old, policy)
        if new is not old:
            changes[f.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg


def dispatch(kernels: KernelPolicy, plan: Callable[[str | None], tuple[Hashable, Callable]], *args):
    """Run, for the platform the program is lowered for, the implementation plan(platform) picks.

    plan(platform) -> (key, fn) for each of kernels.platforms, and plan(None) for any other
    platform (the portable XLA path). `key` names the implementation: platforms whose keys are
    equal share one branch, and when a single one is left no conditional is staged at all (an
    all-XLA policy, or a shape no kernel takes, traces exactly what plain jnp code would).
    Static eligibility (dtype, shapes, mask fields) is decided in Python inside plan."""
    branches: dict[Hashable, tuple[Callable, list[str]]] = {}
    for platform in kernels.platforms:
        key, fn = plan(platform)
        branches.setdefault(key, (fn, []))[1].append(platform)
    default_key, default = plan(None)
    if set(branches) <= {default_key}:
        return default(*args)
    per_platform = {p: fn for key, (fn, ps) in branches.items() if key != default_key for p in ps}
    return jax.lax.platform_dependent(*args, default=default, **per_platform)
