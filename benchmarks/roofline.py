"""The memory roofline of a decode step: bytes it must read, and the bandwidth to read them."""
from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mmjax.tree import flatten_params


def measure_bandwidth(gib: float = 1.0, repeats: int = 5, threads: int | None = None) -> float:
    """Bytes/s streaming a float32 buffer far past the last-level cache with all cores (median).

    One thread per core reduces its own slice with np.max, which releases the GIL and is a pure
    SIMD read (np.sum's pairwise summation is compute-bound here: it measured 16 GB/s where
    np.max and torch's sum measured 22-23 GB/s)."""
    threads = threads or os.cpu_count() or 1
    buf = np.ones(int(gib * 2**30) // 4, np.float32)
    parts = np.array_split(buf, threads)
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, parts))  # touch every page once
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.max, parts))
            rates.append(buf.nbytes / (time.perf_counter() - t))
    return statistics.median(rates)


def decode_bytes(params) -> int:
    """Every weight one decode step reads: all params but the input embedding table (a step
    gathers one row of it). Vision tower and projector are not run in decode, so excluded."""
    flat = flatten_params(params)
    untied = "decoder/lm_head/kernel" in flat or "decoder/lm_head/kernel_panels" in flat  # panels: packed at load
    total = 0
    for path, a in flat.items():
        if not path.startswith("decoder/") or path == "decoder/embed/embedding" and untied:
            continue
        total += int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
    return total
