"""CPU decode attention over a float32, bfloat16 and int8 KV cache: ms per call and GB/s.

A decode step's attention alone: `--layers` calls of mmjax.kernels.cpu.decode_attention_cpu in
one jitted function, each over its own cache (so the caches stream from memory, as in a model),
q [B, 1, N, H] against k/v [B, K, S, H] with every row seeing all S keys. Cache dtypes interleave
within each repeat; the table gives medians. Bytes per call are the K and V values (+ the int8
scales) the kernel must read; the bandwidth line is benchmarks.roofline's, measured in the same
run. A script, not a test: the numbers depend on the machine and its load.

    python -m benchmarks.kv_cache_attention            # B 1 and 8, K 4, G 3, S 2048, H 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.roofline import measure_bandwidth
from mmjax.kernels.cpu import decode_attention as cda

DTYPES = ("float32", "bfloat16", "int8")


def make_caches(dtype: str, layers: int, B: int, K: int, S: int, H: int, seed: int = 0):
    """`layers` (k, v, k_scale, v_scale) of `dtype`; scales None unless int8."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        kv = []
        for _ in range(2):
            x = rng.standard_normal((B, K, S, H), np.float32)
            if dtype == "int8":
                scale = np.abs(x).max(-1) / 127.0
                kv.append((jnp.asarray(np.round(x / scale[..., None]).astype(np.int8)), jnp.asarray(scale)))
            else:
                kv.append((jnp.asarray(x).astype(dtype), None))
        (k, ks), (v, vs) = kv
        out.append((k, v, ks, vs))
    return out


def cache_bytes(caches) -> int:
    """Bytes of one call's K, V (and scales)."""
    k, v, ks, vs = caches[0]
    return sum(a.nbytes for a in (k, v, ks, vs) if a is not None)


def step_fn(dtype: str):
    def step(q, caches, start, end):
        out = q
        for k, v, ks, vs in caches:  # each layer's q depends on the last: the calls run in order
            out = cda.decode_attention_cpu(out, k, v, start, end, None, ks, vs)
        return out

    return jax.jit(step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kv_cache_attention", description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--groups", type=int, default=3, help="query heads per kv head (the bench model: 12 / 4)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args(argv)
    K, G, S, H, L = a.kv_heads, a.groups, a.seq, a.head_dim, a.layers
    bw = measure_bandwidth(gib=0.5)
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} "
          f"(at start), bandwidth {bw / 1e9:.1f} GB/s (np.max over 0.5 GiB, all cores)")
    print(f"K {K}, G {G}, S {S}, H {H}, all keys visible; {L} calls per timed step, each over its own cache; "
          f"median of {a.repeats}, dtypes interleaved")
    print("| B | cache | MiB per call | ms per call | GB/s | x f32 time | roofline ms |")
    print("|---|---|---|---|---|---|---|")
    for B in a.batch:
        q = jnp.asarray(np.random.default_rng(1).standard_normal((B, 1, K * G, H), np.float32))
        start, end = jnp.zeros((B,), jnp.int32), jnp.full((B,), S, jnp.int32)
        runs = {}
        for dtype in DTYPES:
            caches = make_caches(dtype, L, B, K, S, H)
            fn = step_fn(dtype)
            fn(q, caches, start, end).block_until_ready()  # compile
            runs[dtype] = (fn, caches, [])
        for _ in range(a.repeats):
            for dtype in DTYPES:
                fn, caches, times = runs[dtype]
                t = time.perf_counter()
                fn(q, caches, start, end).block_until_ready()
                times.append((time.perf_counter() - t) / L)
        f32 = statistics.median(runs["float32"][2])
        for dtype in DTYPES:
            _, caches, times = runs[dtype]
            ms, nbytes = statistics.median(times), cache_bytes(caches)
            print(f"| {B} | {dtype} | {nbytes / 2**20:.2f} | {ms * 1e3:.3f} | {nbytes / ms / 1e9:.1f} | "
                  f"{f32 / ms:.2f}x | {nbytes / bw * 1e3:.3f} |")
    print(f"load average {os.getloadavg()[0]:.2f} (at end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
