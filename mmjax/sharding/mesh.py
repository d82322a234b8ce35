"""Device meshes and multi-process start-up.

    mesh = make_mesh("data:2,model:4")   # 8 devices: rows over `data`, weights over `model`
    model = mmjax.load(folder, mesh=mesh)

Mesh axes are `Auto`: the SPMD partitioner propagates shardings from the parameters, the
inputs and the few constraints mmjax sets (mmjax.sharding.rules). In this JAX version
jax.make_mesh defaults to `Explicit` axes (shardings in the types), which mmjax does not use:
a Mesh handed in with Explicit axes is rebuilt with Auto ones over the same devices.

Several hosts: call initialize_distributed() first in every process (before any other JAX
call), then build the same mesh everywhere; it spans the devices of all processes.
"""
from __future__ import annotations

import math
import os
import re

import jax
from jax.sharding import AxisType, Mesh

from mmjax.errors import InputError

__all__ = ["make_mesh", "parse_mesh_spec", "initialize_distributed", "ENV_COORDINATOR", "ENV_NUM_PROCESSES",
           "ENV_PROCESS_ID"]

ENV_COORDINATOR = "MMJAX_COORDINATOR"  # "host:port" of process 0
ENV_NUM_PROCESSES = "MMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MMJAX_PROCESS_ID"

_SPEC_ITEM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(-?\d+)\s*")


def parse_mesh_spec(spec: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """"data:2,model:4" -> (("data", "model"), (2, 4)). One size may be -1 (= the devices left)."""
    names, sizes = [], []
    for item in spec.split(","):
        m = _SPEC_ITEM.fullmatch(item)
        if m is None:
            raise InputError(f"mesh {spec!r}: {item.strip()!r} is not 'name:size' (e.g. 'data:2,model:4')")
        name, size = m.group(1), int(m.group(2))
        if name in names:
            raise InputError(f"mesh {spec!r}: axis {name!r} appears twice")
        if size == 0 or size < -1:
            raise InputError(f"mesh {spec!r}: axis {name!r} has size {size}; sizes are positive (or one -1)")
        names.append(name)
        sizes.append(size)
    if sizes.count(-1) > 1:
        raise InputError(f"mesh {spec!r}: only one axis may be -1")
    return tuple(names), tuple(sizes)


def make_mesh(spec, devices=None) -> Mesh:
    """A jax.sharding.Mesh with Auto axes.

    spec: "data:2,model:4" (axis:size, comma-separated; one size may be -1), a dict
    {"data": 2, "model": 4}, or a jax.sharding.Mesh (returned as is when its axes are Auto).
    devices: the devices to use (default jax.devices(), i.e. those of all processes). A mesh
    smaller than the device list uses its first devices; that is refused with several
    processes, where every process's devices must be in the mesh."""
    if isinstance(spec, Mesh):
        if all(t == AxisType.Auto for t in spec.axis_types):
            return spec
        return Mesh(spec.devices, spec.axis_names, axis_types=(AxisType.Auto,) * len(spec.axis_names))
    if isinstance(spec, dict):
        names, sizes = tuple(spec), tuple(int(v) for v in spec.values())
    elif isinstance(spec, str):
        names, sizes = parse_mesh_spec(spec)
    else:
        raise InputError(f"mesh: expected a 'data:2,model:4' string, a dict or a jax.sharding.Mesh, "
                         f"got {type(spec).__name__}")
    devices = list(jax.devices() if devices is None else devices)
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if len(devices) % rest:
            raise InputError(f"mesh {spec!r}: {len(devices)} devices do not divide into axes of size {rest}")
        sizes = tuple(len(devices) // rest if s == -1 else s for s in sizes)
    n = math.prod(sizes)
    if n > len(devices):
        raise InputError(f"mesh {spec!r}: needs {n} devices ({' x '.join(map(str, sizes))}), "
                         f"only {len(devices)} are visible")
    if n < len(devices) and jax.process_count() > 1:
        raise InputError(f"mesh {spec!r}: uses {n} of {len(devices)} devices; with {jax.process_count()} "
                         "processes the mesh must cover every device")
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices[:n])


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids=None,
                           cpu_collectives: str = "gloo") -> bool:
    """Join a multi-process JAX job (jax.distributed.initialize); call it before any other JAX call.

    Arguments left None are read from MMJAX_COORDINATOR ("host:port" of process 0),
    MMJAX_NUM_PROCESSES and MMJAX_PROCESS_ID. When none of them is set at all, this does
    nothing and returns False (a single-process run), so a script can call it unconditionally.
    On clusters JAX detects itself (SLURM, Cloud TPU, ...) set MMJAX_COORDINATOR=auto to
    let jax.distributed.initialize find everything. cpu_collectives picks how CPU devices of
    different processes talk ("gloo"; "mpi" needs an MPI launch). Returns True once joined."""
    coordinator = coordinator if coordinator is not None else os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = _env_int(ENV_PROCESS_ID)
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if jax.distributed.is_initialized():
        return True
    # Must precede the CPU client's creation: it decides whether CPU collectives cross processes.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator == "auto":
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return True
    missing = [n for n, v in ((ENV_COORDINATOR, coordinator), (ENV_NUM_PROCESSES, num_processes),
                              (ENV_PROCESS_ID, process_id)) if v is None]
    if missing:
        raise InputError(f"initialize_distributed: {', '.join(missing)} not given (argument or environment "
                         "variable); a multi-process run needs the coordinator address, the number of "
                         "processes and this process's id")
    if not 0 <= process_id < num_processes:
        raise InputError(f"initialize_distributed: process_id {process_id} is not in [0, {num_processes})")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    return True


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise InputError(f"${name}={os.environ[name]!r} is not an integer") from None
