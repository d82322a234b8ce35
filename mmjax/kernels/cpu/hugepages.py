"""The params of a CPU model in one buffer of 2 MiB pages (Linux transparent huge pages).

A decode step streams every weight once. On 4 KiB pages that costs a page walk every 4 KiB,
because no TLB covers hundreds of MB. XLA:CPU allocates each param with `malloc`, and where
transparent huge pages are "madvise" only (the benchmark machine, a common default) those
buffers stay on 4 KiB pages. Asking for huge pages on them in place does not last: the heap
around them is trimmed after each compile (mmjax.preprocess.buffers.release_free_heap), which
splits the huge pages again. So `place` copies the params into one anonymous mapping of their
own, advised MADV_HUGEPAGE before the first write. Each param becomes a jax.Array on that
memory: `jax.device_put` of an aligned numpy array is zero-copy on CPU, and `place` checks that
it is. PyTorch's CPU allocator has the same switch (THP_MEM_ALLOC_ENABLE=1).

Measured on the 2-core EPYC of benchmarks/ (a VM): 12 chained int8 decoder layers (one row,
75 MB) took 2.19 ms on 4 KiB pages and 1.91 ms on 2 MiB pages (34.5 -> 39.5 GB/s, alternating
in one process); the benchmark model decoded 163 vs 144 tok/s (int8 + head) and 52 vs 48
(float32) at batch 1, median of alternating runs. The cost is at load: faulting the huge pages
in took ~5 ms per MB right after a load there (float32 model, 400 MB: load 4.1 -> 6.1 s; int8,
100 MB: +0.3 s), while the same fill in a fresh process took 0.05 s for 400 MB. That is why
mmjax.load asks for it (`huge_pages=True`) rather than doing it by default.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import jax
import numpy as np

__all__ = ["ALIGN", "HUGE_PAGE", "place", "supported"]

HUGE_PAGE = 2 << 20
ALIGN = 64  # each param's offset in the arena: a cache line (XLA:CPU's own buffer alignment)
_MADV_HUGEPAGE = 14
_TRIM_EVERY = 64 << 20  # give the copied-from heap back this often, so the peak stays ~1 arena


def supported() -> bool:
    """Linux with transparent huge pages not set to "never"."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _movable(a) -> bool:
    return isinstance(a, jax.Array) and len(a.devices()) == 1 and next(iter(a.devices())).platform == "cpu"


def _slots(tree: dict):
    """(dict, key) for every array of a nested dict, in one fixed order."""
    for name in list(tree):
        if isinstance(tree[name], dict):
            yield from _slots(tree[name])
        else:
            yield tree, name


def place(params: dict) -> dict:
    """Moves, in place, every param of `params` (a nested dict of jax.Arrays on one CPU device) into
    one arena of huge pages; returns `params`. Values, dtypes and shapes are unchanged. Does
    nothing where huge pages are unsupported or the tree holds anything else."""
    from mmjax.preprocess.buffers import release_free_heap

    slots = list(_slots(params)) if isinstance(params, dict) else []
    if not supported() or not slots or not all(_movable(t[k]) for t, k in slots):
        return params
    offsets, total = [], 0
    for t, k in slots:
        offsets.append(total)
        total += -(-t[k].nbytes // ALIGN) * ALIGN
    arena = mmap.mmap(-1, -(-total // HUGE_PAGE) * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = np.frombuffer(arena, np.uint8)  # keeps `arena` alive as long as any param views it
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(memory.ctypes.data, memory.nbytes, _MADV_HUGEPAGE) != 0:
        return params  # nothing moved; the mapping goes with `memory`
    since_trim = 0
    for (tree, key), offset in zip(slots, offsets):
        v = tree[key]
        dst = memory[offset: offset + v.nbytes].view(v.dtype).reshape(v.shape)
        np.copyto(dst, np.asarray(v))
        new = jax.device_put(dst, next(iter(v.devices())))
        if new.unsafe_buffer_pointer() != dst.ctypes.data and offset == 0:
            return params  # this jax copies host arrays: nothing moved, the arena goes with `memory`
        tree[key] = new  # (a later copy, should there be one, is still the same values)
        since_trim += v.nbytes
        del v
        if since_trim >= _TRIM_EVERY:
            since_trim = 0
            release_free_heap()
    release_free_heap()
    return params
