"""In-place row writes of KV caches and page pools on XLA:CPU (write_rows.cc), with its reference.

Axis legend: C values per row, R rows (buf's elements / C, row-major), M rows written.

`write_rows(buf, new, rows)`: buf (any shape, R x C elements) with row rows[m] of
buf.reshape(R, C) set to new[m] for new [M, C], rows [M] int32 (a row outside [0, R) is not
written), through an XLA FFI custom call whose result aliases buf: in place when buf is donated,
M rows of memory touched. buf keeps its shape (a reshape of an aliased operand made XLA copy it
before and after the call); C is new's last dim (1 for an int8 cache's scales).

The KV cache writes (mmjax.layers.attention.write_cache, mmjax.kernels.paged_attention.write_pages)
go through it in the CPU branch when the KernelPolicy's attention_cpu is "cpu": XLA:CPU widens a
bfloat16 dynamic_update_slice or scatter to float32, converting the whole cache both ways on each
write (23 of the 25 ms of a batch-8 bf16 decode step of the benchmark model), and expands the
pools' scatter into a loop that copies each pool (790 ms a serving decode step with 1 GiB of pools).

`read_rows(table, rows)`: the reverse, table [R, C] rows rows[m] (clipped to [0, R)) -> [M, C].
The decoders' embedding gather (mmjax.layers.linear.take_rows) goes through it for 16-bit float
tables in the same CPU branch: XLA:CPU runs a bfloat16 gather in float32, converting the whole
table, and hoists that convert out of the decode loop, so each call of the loop wrote the table out
again (98 MB, ~30 ms a call of 8 steps, on the bfloat16 benchmark model).

`eligible()`: the library built.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.cpu import ffi
from mmjax.kernels.policy import KernelPolicy, dispatch

__all__ = ["READ_TARGET", "TARGET", "dispatch_rows", "eligible", "read_rows", "read_rows_reference", "write_rows",
           "write_rows_reference"]

TARGET = "mmjax_write_rows"
READ_TARGET = "mmjax_read_rows"


def eligible() -> bool:
    return ffi.available()


def dispatch_rows(kernels: KernelPolicy, rows, xla, *args):
    """rows(*args) (a write through write_rows, or a read_rows) in the CPU branch when the
    policy's attention_cpu is "cpu" and the library is built, xla(*args) everywhere else: the one
    choice of write_cache, write_pages and take_rows."""
    def plan(platform):
        if platform is not None and kernels.attention(platform) == "cpu" and eligible():
            return ("cpu_write_rows",), rows
        return ("xla",), xla

    return dispatch(kernels, plan, *args)


def write_rows_reference(buf, new, rows):
    flat = buf.reshape(-1, new.shape[-1])
    R = flat.shape[0]
    rows = jnp.where((rows >= 0) & (rows < R), rows, R)  # .at[] would wrap a negative row around
    return flat.at[rows].set(new.astype(buf.dtype), mode="drop").reshape(buf.shape)


def write_rows(buf, new, rows):
    """buf (R x C elements), new [M, C] (cast to buf's dtype), rows [M] -> buf with those rows replaced."""
    if new.ndim != 2 or rows.ndim != 1 or new.shape[0] != rows.shape[0] or buf.size % max(new.shape[1], 1):
        raise ValueError(f"write_rows: expects buf of R x C elements, new [M, C], rows [M]; got {buf.shape}, "
                         f"{new.shape}, {rows.shape}")
    if ffi.load() is None:
        raise RuntimeError(f"write_rows: kernel unavailable ({ffi.error()})")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(buf.shape, buf.dtype), input_output_aliases={0: 0},
                            vmap_method="sequential")
    return call(buf, new.astype(buf.dtype), rows.astype(jnp.int32), row=np.int64(new.shape[1]))


def read_rows_reference(table, rows):
    return jnp.take(table, rows, axis=0, mode="clip")


def read_rows(table, rows):
    """table [R, C], rows [M] int -> [M, C]: row rows[m] (clipped to [0, R)) of table, bytes copied."""
    if table.ndim != 2 or rows.ndim != 1 or table.shape[0] < 1:
        raise ValueError(f"read_rows: expects table [R, C] with R >= 1 and rows [M]; got {table.shape}, {rows.shape}")
    if ffi.load() is None:
        raise RuntimeError(f"read_rows: kernel unavailable ({ffi.error()})")
    call = jax.ffi.ffi_call(READ_TARGET, jax.ShapeDtypeStruct((rows.shape[0], table.shape[1]), table.dtype),
                            vmap_method="sequential")
    return call(table, rows.astype(jnp.int32), row=np.int64(table.shape[1]))
