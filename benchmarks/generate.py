"""Side-by-side generation benchmark: mmjax vs HF transformers on the same weights, same process.

    python -m benchmarks.generate [--work bench-out] [--quick]

Builds a LLaVA-shaped random model (decoder hidden 768, 12 layers, 12 heads, 4 kv heads,
F 2048, vocab 32000; CLIP-B/16-shaped vision tower at 224 px), saves it with save_pretrained,
converts it, checks both produce the same greedy tokens, then times:
prefill (image + 128-token prompt, batch 1), decode tokens/s at batch 1 and 8 (64 new tokens,
min_new_tokens=64 so both sides time exactly 64), time to first token in a fresh process (cold,
and with the persistent compile cache warm), peak RSS, and decode ms/token against the memory
roofline (bytes one decode step reads / bandwidth measured in this run). Then the same weights
as bf16, int8 and int8 + LM head, and with an int8 KV cache: decode tokens/s at batch 1 and 8
against fp32 mmjax, HF fp32 and each one's own roofline (--no-narrow skips them;
benchmarks/quantization.py adds their accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.roofline import decode_bytes, measure_bandwidth

N_NEW = 64
# Peak RSS of the current process in MB. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
# exec, so a child forked from this (large) process would report the parent's peak.
PEAK_RSS_MB = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])/1024"


def bench_config(quick: bool):
    from mmjax.testing.checkpoints import tiny_llava_config

    if quick:  # a smoke run of the script itself
        return tiny_llava_config(vocab_size=1024, text_hidden=128, text_layers=2, heads=4, kv_heads=2, inter=256,
                                 vision_hidden=64, vision_layers=2, vision_heads=4, vision_inter=128,
                                 image_size=64, patch_size=16)
    return tiny_llava_config(vocab_size=32000, text_hidden=768, text_layers=12, heads=12, kv_heads=4, inter=2048,
                             vision_hidden=768, vision_layers=12, vision_heads=12, vision_inter=3072,
                             image_size=224, patch_size=16, init_range=0.02, max_positions=4096)


def prompt_of(tokenizer, n_tokens: int) -> str:
    words = ("the red cat sat on a wooden table near the window while a small dog ran in the green field "
             "under a blue sky and two children played with a yellow ball ").split()
    out = []
    while len(tokenizer.encode(" ".join(out))) < n_tokens:
        out.append(words[len(out) % len(words)])
    return "<image> " + " ".join(out[:-1])


def median_time(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def fresh_process_ttft(flax_dir: str, cache_dir: str) -> dict:
    """Load + first token in a new interpreter, with the persistent compile cache at cache_dir."""
    code = (
        "import time, json; t0=time.perf_counter(); import mmjax; from PIL import Image; "
        "t1=time.perf_counter(); m=mmjax.load(%r); img=Image.new('RGB',(64,48),(90,120,200)); "
        "o=mmjax.generate(m,[img],'<image> Describe it.',max_new_tokens=1,chat_template=False); "
        "t2=time.perf_counter(); print(json.dumps({'import_s':t1-t0,'ttft_s':t2-t1,"
        "'rss_mb':%s}))" % (flax_dir, PEAK_RSS_MB))
    env = {**os.environ, "MMJAX_COMPILE_CACHE": "1", "MMJAX_COMPILE_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def hf_process_rss(hf_dir: str, inputs_npz: str, n_new: int) -> float:
    """Peak RSS of a fresh process that loads the HF model and generates n_new tokens."""
    code = (
        "import torch, numpy as np; from transformers import LlavaForConditionalGeneration as L; "
        "m=L.from_pretrained(%r).eval(); d=dict(np.load(%r)); "
        "b={k: torch.tensor(v).long() if k!='pixel_values' else torch.tensor(v) for k,v in d.items()}; "
        "torch.no_grad().__enter__(); m.generate(**b,max_new_tokens=%d,min_new_tokens=%d,do_sample=False); "
        "print(%s)" % (hf_dir, inputs_npz, n_new, n_new, PEAK_RSS_MB))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="tiny model, to check the script runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-narrow", action="store_true", help="skip the bf16 / int8 weight and int8 KV cache rows")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image

    import mmjax
    from converters.torch2flax import convert
    from mmjax.testing.checkpoints import save_tiny_llava

    work = args.work or tempfile.mkdtemp(prefix="mmjax-bench-")
    hf_dir, flax_dir = os.path.join(work, "hf"), os.path.join(work, "flax")
    t = time.perf_counter()
    _, hf_model, hf_proc = save_tiny_llava(hf_dir, bench_config(args.quick), vocab_size=512)
    convert(hf_dir, flax_dir, overwrite=True, progress=False)
    print(f"built + converted in {time.perf_counter() - t:.0f} s ({work})", flush=True)
    model = mmjax.load(flax_dir, compile_cache=False)
    size = model.config.vision.image_size
    image = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))
    prompt = prompt_of(model.tokenizer, 128)
    inputs = model.preprocess([image], prompt, chat_template=False)
    T = inputs["input_ids"].shape[1]
    pt = {k: torch.tensor(v) for k, v in inputs.items()}
    pt["input_ids"] = pt["input_ids"].long()

    def hf_generate(rows, n):
        batch = {k: v.repeat(rows, *([1] * (v.ndim - 1))) for k, v in pt.items()}
        with torch.no_grad():
            return hf_model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    # 1. same greedy tokens
    ours = mmjax.generate(model, [image], prompt, max_new_tokens=16, chat_template=False)
    theirs = hf_generate(1, 16)[0, T:].tolist()
    same = theirs[: len(ours.token_ids)] == ours.token_ids
    print(f"greedy tokens identical to HF: {same}", flush=True)

    # The machine's speed drifts by 10-20% over minutes, so every figure below interleaves the
    # two sides (mmjax, HF, mmjax, HF, ...) and takes medians: neither gets the quiet minute.
    # 2. prefill latency, batch 1 (our compiled prefill vs the HF forward that fills a cache).
    # HF side: the forward its generate() runs first, which asks for the last position's logits
    # only (logits_to_keep=1), as mmjax's prefill does. (Sessions 1-2 timed all 322 positions'
    # logits, ~40 ms more of HF's time.)
    def ours_prefill():
        return mmjax.generate(model, [image], prompt, max_new_tokens=1, chat_template=False).timings["prefill_s"]

    def hf_prefill():
        with torch.no_grad():
            return median_time(lambda: hf_model(**pt, use_cache=True, logits_to_keep=1), 1)

    ours_prefill(), hf_prefill()
    pf = [(ours_prefill(), hf_prefill()) for _ in range(max(5, args.repeats))]
    ours_pf, hf_pf = (statistics.median(x) for x in zip(*pf))

    # 3. decode tokens/s, batch 1 and 8, exactly N_NEW tokens each
    rows = {}
    for B in (1, 8):
        kw = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, chat_template=False)
        mmjax.generate(model, [[image]] * B, [prompt] * B, **kw)  # compile
        hf_generate(B, 2)
        ours, hf_total, hf_first = [], [], []
        for _ in range(args.repeats):
            r = mmjax.generate(model, [[image]] * B, [prompt] * B, **kw).timings
            ours.append(r["decode_s"] / (r["steps"] - 1))
            hf_total.append(median_time(lambda: hf_generate(B, N_NEW), 1))
            hf_first.append(median_time(lambda: hf_generate(B, 1), 1))
        ours_ms = statistics.median(ours) * 1e3
        hf_ms = (statistics.median(hf_total) - statistics.median(hf_first)) / (N_NEW - 1) * 1e3
        rows[B] = (ours_ms, hf_ms)
        print(f"decode batch {B}: mmjax {ours_ms:.1f} ms/step, HF {hf_ms:.1f} ms/step", flush=True)

    # 4. roofline: bytes one decode step reads / bandwidth measured now
    bw = measure_bandwidth()
    nbytes = decode_bytes(model.params)
    floor_ms = nbytes / bw * 1e3

    # 4b. narrow weights and KV cache: the same checkpoint as bf16, int8, int8 + LM head, and that
    # with an int8 KV cache, alternating with fp32 mmjax in each round (benchmarks/quantization.py
    # adds their accuracy against fp32); the HF side is its fp32 speed from 3.
    narrow = []
    if not args.no_narrow:
        from benchmarks.quantization import convert_narrow, decode_speeds, speed_row

        dirs = convert_narrow(hf_dir, flax_dir, work)
        models = {"fp32": model, **{k: mmjax.load(d, compile_cache=False) for k, d in dirs.items()}}
        models["int8+head+kv8"] = mmjax.load(dirs["int8+head"], compile_cache=False, kv_cache_dtype="int8")
        speeds = decode_speeds(models, image, prompt, args.repeats)
        narrow = ["", f"narrow weights and KV cache, decode (medians of {args.repeats} rounds alternating with fp32 "
                      f"mmjax; HF = HF transformers fp32 above):"]
        for B, sp in speeds.items():
            hf_tps = B * 1e3 / rows[B][1]
            narrow += [f"  {speed_row(k, B, sp[k], sp['fp32'], m.params, bw)}  x{sp[k] / hf_tps:4.2f} HF"
                       for k, m in models.items()]
        del models

    # 5. fresh-process time to first token, cold and with the persistent cache warm; peak RSS
    cache_dir = tempfile.mkdtemp(prefix="mmjax-jaxcache-")
    cold = fresh_process_ttft(flax_dir, cache_dir)
    warm = fresh_process_ttft(flax_dir, cache_dir)
    npz = os.path.join(work, "inputs.npz")
    np.savez(npz, **inputs)
    hf_rss = hf_process_rss(hf_dir, npz, N_NEW)

    b1, b8 = rows[1], rows[8]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {__import__('jax').__version__}, torch {torch.__version__}; fp32; prompt {T} tokens "
        f"({model.config.image_seq_length} image + text); medians of {args.repeats} interleaved runs "
        f"(prefill: {max(5, args.repeats)})",
        "",
        "| figure | mmjax | HF transformers | ratio (HF / mmjax time) |",
        "|---|---|---|---|",
        f"| prefill, batch 1 | {ours_pf * 1e3:.0f} ms | {hf_pf * 1e3:.0f} ms | {hf_pf / ours_pf:.2f}x |",
        f"| decode, batch 1 | {1e3 / b1[0]:.1f} tok/s ({b1[0]:.1f} ms) | {1e3 / b1[1]:.1f} tok/s ({b1[1]:.1f} ms) "
        f"| {b1[1] / b1[0]:.2f}x |",
        f"| decode, batch 8 | {8e3 / b8[0]:.0f} tok/s ({b8[0]:.1f} ms) | {8e3 / b8[1]:.0f} tok/s ({b8[1]:.1f} ms) "
        f"| {b8[1] / b8[0]:.2f}x |",
        f"| time to first token, fresh process, cold | {cold['ttft_s']:.1f} s (+{cold['import_s']:.1f} s import) | | |",
        f"| time to first token, fresh process, cache warm | {warm['ttft_s']:.1f} s | | |",
        f"| peak RSS (load + generate, own process) | {cold['rss_mb']:.0f} MB | {hf_rss:.0f} MB | "
        f"{hf_rss / cold['rss_mb']:.2f}x |",
        "",
        f"roofline: one decode step reads {nbytes / 1e6:.0f} MB (all weights but the input embedding table); "
        f"bandwidth measured now {bw / 1e9:.1f} GB/s (1 GiB float32, all cores, median of 5) -> floor "
        f"{floor_ms:.1f} ms/token = {1e3 / floor_ms:.0f} tok/s; mmjax batch 1 reaches "
        f"{floor_ms / b1[0] * 100:.0f}% of it.",
        f"greedy tokens identical to HF: {same}",
        *narrow,
    ]
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
