"""In-place row writes of 16-bit float buffers on XLA:CPU (write_rows.cc), with its reference.

Axis legend: C values per row (buf's last dim), R rows of buf (its other dims flattened, row-major),
M rows written.

`write_rows(buf, new, rows)`: buf [..., C] with row rows[m] of buf.reshape(R, C) set to new[m] for
new [M, C], rows [M] int32 (a row outside [0, R) is not written), through an XLA FFI custom call
whose result aliases buf: in place when buf is donated, M rows of memory touched. buf keeps its
shape (a reshape of an aliased operand made XLA copy it before and after the call). The KV cache writes
(mmjax.layers.attention.write_cache, mmjax.kernels.paged_attention.write_pages) use it for
bfloat16 / float16 caches in the CPU branch when the KernelPolicy's attention_cpu is "cpu":
XLA:CPU widens a 16-bit float dynamic_update_slice or scatter to float32, converting the whole
cache both ways on every write (23 of the 25 ms of a batch-8 bf16 decode step of the benchmark
model). Other dtypes (float32, int8) are written by XLA in place already.

`eligible(dtype)`: a 16-bit float dtype and the library built.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.kernels.cpu import ffi

__all__ = ["TARGET", "eligible", "write_rows", "write_rows_reference"]

TARGET = "mmjax_write_rows"


def eligible(dtype) -> bool:
    dtype = jnp.dtype(dtype)
    return dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating) and ffi.available()


def write_rows_reference(buf, new, rows):
    flat = buf.reshape(-1, buf.shape[-1])
    R = flat.shape[0]
    rows = jnp.where((rows >= 0) & (rows < R), rows, R)  # .at[] would wrap a negative row around
    return flat.at[rows].set(new.astype(buf.dtype), mode="drop").reshape(buf.shape)


def write_rows(buf, new, rows):
    """buf [..., C], new [M, C] (cast to buf's dtype), rows [M] -> buf with those rows replaced."""
    if buf.ndim < 2 or new.ndim != 2 or rows.ndim != 1 or new.shape != (rows.shape[0], buf.shape[-1]):
        raise ValueError(f"write_rows: expects buf [..., C], new [M, C], rows [M]; got {buf.shape}, {new.shape}, "
                         f"{rows.shape}")
    if ffi.load() is None:
        raise RuntimeError(f"write_rows: kernel unavailable ({ffi.error()})")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(buf.shape, buf.dtype), input_output_aliases={0: 0},
                            vmap_method="sequential")
    return call(buf, new.astype(buf.dtype), rows.astype(jnp.int32))
