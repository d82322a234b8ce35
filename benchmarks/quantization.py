"""Quantized weights on the benchmark model: what int8 costs in accuracy, what narrow weights buy
in decode speed.

    python -m benchmarks.quantization [--work bench-out] [--quick] [--rounds 3]

The model of benchmarks/generate.py (LLaVA-shaped: decoder 768 x 12 layers, vocab 32000, CLIP-B
tower), converted three ways: float32, bfloat16 (--dtype bfloat16) and int8 weight-only (--quantize
int8 from the float32 folder; "int8+head" with --quantize-lm-head too; "int8+head+kv8" that model
with kv_cache_dtype="int8"; "int8+head+kv8+hp" also with its params on 2 MiB pages,
mmjax.load(huge_pages=True)). Reports
  * accuracy of int8 (and bf16) against float32 over 256 prefill positions: top-1 agreement of
    the logits, and mean KL(p_fp32 || p_quant) in nats;
  * decode tokens/s at batch 1 and 8 (64 new tokens, min_new_tokens=64), fp32 / bf16 / int8 side
    by side, runs alternating between the three, median of --rounds, with the memory roofline
    (bytes one decode step reads / bandwidth measured in this run).
The machine may be shared: the load average before and after is printed with the numbers, and
speeds measured under load are lower bounds (rerun on a quiet machine for the real ones).
Random weights (init 0.02) give flat logits, which makes top-1 the harsher of the two numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks.generate import N_NEW, bench_config, prompt_of
from benchmarks.roofline import decode_bytes, measure_bandwidth

POSITIONS = 256
KINDS = ("fp32", "bf16", "int8", "int8+head")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def agreement(ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    """top-1 agreement and mean KL(ref || other) over positions ([T, V] each)."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).mean()
    return {"top1": float(top1), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "max_abs_logit_diff": float(np.abs(ref_logits - logits).max())}


def convert_narrow(hf_dir: str, fp32_dir: str, work: str) -> dict[str, str]:
    """The benchmark checkpoint as bf16 (from the HF folder), int8 and int8 + LM head (from the
    float32 one): {kind: folder}."""
    from converters.torch2flax import convert

    dirs = {k: os.path.join(work, k) for k in KINDS[1:]}
    convert(hf_dir, dirs["bf16"], dtype="bfloat16", overwrite=True, progress=False)
    convert(fp32_dir, dirs["int8"], quantize="int8", overwrite=True)
    # the LM head is a quarter of the decoder's weights here (768 x 32000): int8 with it too
    convert(fp32_dir, dirs["int8+head"], quantize="int8", quantize_lm_head=True, overwrite=True)
    return dirs


def decode_speeds(models: dict, image, prompt: str, rounds: int, batches=(1, 8)) -> dict[int, dict[str, float]]:
    """{batch: {kind: decode tok/s}}: N_NEW tokens each, the kinds alternating within each round
    (the machine drifts over minutes), median of `rounds` after one compile run."""
    import mmjax

    out = {}
    for B in batches:
        kw = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, chat_template=False)
        for m in models.values():
            mmjax.generate(m, [[image]] * B, [prompt] * B, **kw)  # compile
        runs = {k: [] for k in models}
        for _ in range(rounds):
            for k, m in models.items():
                runs[k].append(mmjax.generate(m, [[image]] * B, [prompt] * B, **kw).timings["decode_tok_s"])
        out[B] = {k: statistics.median(v) for k, v in runs.items()}
    return out


def speed_row(kind: str, B: int, tps: float, fp32_tps: float, params, bw: float) -> str:
    """One kind's decode speed against fp32 mmjax and its memory roofline (weights one step
    reads / bandwidth bw)."""
    step_bytes = decode_bytes(params)
    roof = bw / step_bytes * B  # tokens/s if a step only streamed its weights at bw
    return (f"batch {B} {kind:16s} {tps:7.1f} tok/s  x{tps / fp32_tps:4.2f} fp32   weights/step "
            f"{step_bytes / 2**20:6.1f} MiB  roofline {roof:7.1f} tok/s ({tps / roof:4.0%})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantization", description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="a small model: a smoke run of this script")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per kind and batch (median)")
    args = ap.parse_args(argv)

    from PIL import Image

    import mmjax
    from converters.torch2flax import convert
    from mmjax.testing.checkpoints import save_tiny_llava

    load0 = os.getloadavg()
    work = args.work or tempfile.mkdtemp(prefix="mmjax-quant-bench-")
    hf_dir = os.path.join(work, "hf")
    t = time.perf_counter()
    save_tiny_llava(hf_dir, bench_config(args.quick), vocab_size=512)
    convert(hf_dir, os.path.join(work, "fp32"), overwrite=True, progress=False)
    dirs = {"fp32": os.path.join(work, "fp32"), **convert_narrow(hf_dir, os.path.join(work, "fp32"), work)}
    print(f"built + converted in {time.perf_counter() - t:.0f} s ({work})", flush=True)
    models = {k: mmjax.load(d, compile_cache=False) for k, d in dirs.items()}

    # 1. accuracy over POSITIONS prefill positions (text only: every position is a token)
    tok = models["fp32"].tokenizer
    ids = np.asarray([tok.encode(prompt_of(tok, POSITIONS + 8).replace("<image> ", ""))[:POSITIONS]], np.int32)
    logits = {k: mmjax.forward(m, ids)[0] for k, m in models.items()}
    print(f"\naccuracy against fp32 over {ids.shape[1]} positions (vocab {logits['fp32'].shape[-1]}):")
    for k in KINDS[1:]:
        a = agreement(logits["fp32"], logits[k])
        print(f"  {k:9s} top-1 agreement {a['top1']:.4f}   mean KL {a['kl_mean']:.3e} nats (max {a['kl_max']:.2e})"
              f"   max |dlogit| {a['max_abs_logit_diff']:.3e}")

    # 2. decode speed, the kinds alternating within each round; + the int8 model with an int8 KV
    # cache (mmjax.load(kv_cache_dtype="int8"): a scale per token and kv head)
    models["int8+head+kv8"] = mmjax.load(dirs["int8+head"], compile_cache=False, kv_cache_dtype="int8")
    # + the params on 2 MiB pages (mmjax.load(huge_pages=True), opt-in: it costs load time)
    models["int8+head+kv8+hp"] = mmjax.load(dirs["int8+head"], compile_cache=False, kv_cache_dtype="int8",
                                            huge_pages=True)
    size = models["fp32"].config.vision.image_size
    image = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))
    prompt = prompt_of(tok, 128)
    bw = measure_bandwidth()
    print(f"\ndecode tokens/s ({N_NEW} new tokens; median of {args.rounds} alternating rounds; "
          f"bandwidth {bw / 1e9:.1f} GB/s measured now):")
    for B, speeds in decode_speeds(models, image, prompt, args.rounds).items():
        for k, m in models.items():
            print("  " + speed_row(k, B, speeds[k], speeds["fp32"], m.params, bw), flush=True)
    load1 = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) before {tuple(round(x, 2) for x in load0)}, after "
          f"{tuple(round(x, 2) for x in load1)} on {os.cpu_count()} cores" +
          ("; the machine was shared: speeds are lower bounds, rerun it quietly" if max(load0[0], load1[0]) > 0.5
           else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
