"""Host arrays that XLA:CPU reads in place, so a prepared input exists once, not twice.

On CPU, `jax.device_put` of a numpy array aliases it (no copy) when the array is C-contiguous,
of the target dtype and 64-byte aligned; `jnp.asarray` always copies, and numpy's own large
allocations are only 16-byte aligned (malloc's header), so they were copied too. A prepare step
pads into `aligned_zeros` and hands the result to `to_device`: the device array is that host
buffer. Its padding rows come from calloc'd pages that are never written, so they take no
memory either (an untouched zero page is not resident).
"""
from __future__ import annotations

import numpy as np

__all__ = ["ALIGN", "aligned_zeros", "is_aligned", "padded_rows", "release_aliased", "release_free_heap", "to_device"]

ALIGN = 64  # XLA:CPU's minimum buffer alignment: below it, device_put copies


def is_aligned(a: np.ndarray) -> bool:
    return a.flags.c_contiguous and a.ctypes.data % ALIGN == 0


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.zeros(shape, dtype) whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + ALIGN, np.uint8)  # calloc: pages never written stay unallocated
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


def padded_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """a [n, ...] -> [rows, ...] (rows >= n) with zero rows after a's, in an aligned buffer;
    `a` itself when it already is one (no copy)."""
    if a.shape[0] == rows and is_aligned(a):
        return a
    out = aligned_zeros((rows,) + a.shape[1:], a.dtype)
    out[: a.shape[0]] = a
    return out


def to_device(x, dtype=None):
    """A host array on the default device. Of the right dtype it goes through jax.device_put,
    which aliases an aligned array and copies any other (whichever happens, nothing compiles:
    jnp.asarray compiles a convert_element_type per new shape); a dtype change is jnp.asarray's."""
    import jax
    import jax.numpy as jnp

    if isinstance(x, np.ndarray) and (dtype is None or x.dtype == np.dtype(dtype)) \
            and x.dtype == jax.dtypes.canonicalize_dtype(x.dtype):
        return jax.device_put(x)
    return jnp.asarray(x, dtype)


def release_aliased() -> None:
    """Free the host buffers of device arrays that were deleted: jaxlib defers the Python side of
    a buffer's release (the numpy array an aliased device array keeps alive) to its gc callback,
    so a request's padded pixels outlived it until the next collection (+R at the next request's
    preprocessing). A young-generation collection runs that callback; it costs well under 1 ms."""
    import gc

    gc.collect(0)


def release_free_heap() -> None:
    """Give the heap that freed allocations left behind back to the OS (glibc's malloc_trim; a
    no-op elsewhere). XLA:CPU's compiler frees most of what it allocates (~70 MB for a Qwen2-VL
    prefill) in small chunks that glibc keeps; the next request's large arrays are fresh mmaps,
    so without this they came on top of it."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None
