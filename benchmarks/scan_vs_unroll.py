"""Decoder layers by `nn.scan` or unrolled: compile time and decode-step time.

    python -m benchmarks.scan_vs_unroll [--layers 12 32] [--hidden 768]

Both variants run the same LlamaBlock on the benchmark decoder's shapes (hidden 768, 12 heads,
4 kv heads, F 2048), batch 1, one new token against a 1088-slot cache, the state donated.
Unrolled: per-layer caches, each updated in place. Scanned: params and caches stacked on a
leading L axis and carried through lax.scan (one compiled body).
"""
from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import LlamaConfig
from mmjax.kernels.policy import KernelPolicy
from mmjax.decoders.llama import LlamaBlock
from mmjax.kernels.attention import MaskSpec
from mmjax.layers.rope import rope_tables


class _ScanBody(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cache, mask, rope, index):
        return LlamaBlock(self.cfg, name="block")(x, mask, rope, cache, index)


class Scanned(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, caches, mask, rope, index):  # caches: {"k","v": [L, B, K, S, H]}
        scan = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=self.cfg.num_layers)
        return scan(self.cfg, name="layers")(x, caches, mask, rope, index)


class Unrolled(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, caches, mask, rope, index):  # caches: list of {"k","v": [B, K, S, H]}
        out = []
        for i in range(self.cfg.num_layers):
            x, c = LlamaBlock(self.cfg, name=f"layers_{i}")(x, mask, rope, caches[i], index)
            out.append(c)
        return x, out


def measure(kind: str, layers: int, hidden: int, S: int = 1088, steps: int = 30):
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=2048, num_layers=layers,
                      num_heads=12, num_kv_heads=4, head_dim=hidden // 12, kernels=KernelPolicy.from_attention_impl("xla"))
    B, K, H = 1, cfg.num_kv_heads, cfg.head_dim
    mod = (Scanned if kind == "scan" else Unrolled)(cfg)
    if kind == "scan":
        caches = {"k": jnp.zeros((layers, B, K, S, H)), "v": jnp.zeros((layers, B, K, S, H))}
    else:
        caches = [{"k": jnp.zeros((B, K, S, H)), "v": jnp.zeros((B, K, S, H))} for _ in range(layers)]
    x = jnp.zeros((B, 1, hidden))
    index = jnp.full((B,), 700, jnp.int32)
    mask = MaskSpec(causal=True, kv_lengths=index + 1, q_offset=index)
    rope = rope_tables(index[:, None], cfg.rope, H, jnp.float32)
    params = jax.jit(mod.init)(jax.random.PRNGKey(0), x, caches, mask, rope, index)

    def step(params, x, caches, index):
        m = MaskSpec(causal=True, kv_lengths=index + 1, q_offset=index)
        r = rope_tables(index[:, None], cfg.rope, H, jnp.float32)
        h, caches = mod.apply(params, x, caches, m, r, index)
        return h, caches

    fn = jax.jit(step, donate_argnums=(2,))
    t = time.perf_counter()
    compiled = fn.lower(params, x, caches, index).compile()
    compile_s = time.perf_counter() - t
    h, caches = compiled(params, x, caches, index)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        h, caches = compiled(params, h, caches, index)
        h.block_until_ready()
        times.append(time.perf_counter() - t)
    return compile_s, statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 32])
    ap.add_argument("--hidden", type=int, default=768)
    args = ap.parse_args(argv)
    print("| layers | variant | compile s | decode step ms (median of 30) |")
    print("|---|---|---|---|")
    for L in args.layers:
        for kind in ("unrolled", "scan"):
            c, ms = measure(kind, L, args.hidden)
            print(f"| {L} | {kind} | {c:.2f} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
