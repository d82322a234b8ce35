"""Serving benchmark: continuous batching (mmjax.serving.ServingEngine) against the same requests
run one by one through mmjax.generate and through HF transformers' generate, same weights, same run.

    python -m benchmarks.serve [--work bench-out] [--quick] [--requests 64] [--hf-requests 8]

The model is benchmarks.generate's (LLaVA-shaped, decoder 768 x 12 layers, CLIP-B/16 tower).
Requests: one image each (all different), 64-256 prompt tokens, 32-128 new tokens (exactly that
many: min_new_tokens = max_new_tokens, so every side produces the same count). Reported per
setting: output tokens/s, time to first token p50/p99, inter-token latency p50/p99.
  * one by one: mmjax.generate per request; HF generate per request on the first --hf-requests
    (HF is slow here; its tokens/s is over that subset).
  * engine, closed loop at concurrency 1, 4, 8, 16 (a new request enters when one finishes).
  * engine, Poisson arrivals at two rates (requests/s).
  * the decode step with 8 running sequences (paged) against mmjax.generate's static batch-8 step.
Greedy answers of the engine are checked equal to one by one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks.generate import bench_config, prompt_of


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def drive(eng, reqs, *, concurrency=None, arrivals=None):
    """Run reqs through the engine: closed loop (at most `concurrency` in flight) or open loop
    (request i enters at arrivals[i] seconds). -> (wall s, {id: [token times]}, {id: add time}, outputs)."""
    pending = list(range(len(reqs)))
    added, times, final = {}, {}, {}
    t0 = time.perf_counter()
    inflight = 0
    while pending or eng.has_unfinished():
        now = time.perf_counter() - t0
        while pending and ((concurrency is not None and inflight < concurrency)
                           or (arrivals is not None and arrivals[pending[0]] <= now)):
            r = reqs[pending.pop(0)]
            eng.add_request(r)
            added[r.request_id], times[r.request_id] = time.perf_counter(), []
            inflight += 1
        if not eng.has_unfinished():
            time.sleep(max(0.0, arrivals[pending[0]] - (time.perf_counter() - t0)))
            continue
        for out in eng.step():
            times[out.request_id] += [time.perf_counter()] * len(out.new_token_ids)
            if out.finished:
                final[out.request_id] = out
                inflight -= 1
    return time.perf_counter() - t0, times, added, final


T0 = time.perf_counter()


def say(msg):
    """Progress on stderr as each phase ends (the full run takes tens of minutes on 2 cores)."""
    import sys
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def summarize(name, wall, times, added):
    ttft = [times[i][0] - added[i] for i in times if times[i]]
    itl = [b - a for i in times for a, b in zip(times[i], times[i][1:])]
    n = sum(len(t) for t in times.values())
    say(f"{name}: {n} tokens in {wall:.1f} s ({n / wall:.1f} tok/s)")
    return (name, n / wall, pct(ttft, 50), pct(ttft, 99), pct(itl, 50) * 1e3, pct(itl, 99) * 1e3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model and few requests: checks the script runs")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--hf-requests", type=int, default=8)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--rates", default="0.5,2", help="Poisson arrival rates, requests/s")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image

    import mmjax
    from converters.torch2flax import convert
    from mmjax.serving import ServingEngine
    from mmjax.testing.checkpoints import save_tiny_llava

    work = args.work or tempfile.mkdtemp(prefix="mmjax-serve-bench-")
    hf_dir, flax_dir = os.path.join(work, "hf"), os.path.join(work, "flax")
    _, hf_model, _ = save_tiny_llava(hf_dir, bench_config(args.quick), vocab_size=512)
    if not os.path.isdir(flax_dir):
        convert(hf_dir, flax_dir, progress=False)
    model = mmjax.load(flax_dir)
    say("model converted and loaded")
    n = 8 if args.quick else args.requests
    rng = np.random.default_rng(0)
    size = model.config.vision.image_size
    specs = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8))
        new = int(rng.integers(32, 129)) if not args.quick else 8
        specs.append(([image], prompt_of(model.tokenizer, int(rng.integers(64, 257))), new))
    kw = lambda new: dict(max_new_tokens=new, min_new_tokens=new, chat_template=False)  # noqa: E731

    # one by one, mmjax.generate (compiles first: one warm-up per prompt bucket it meets)
    for imgs, prompt, new in specs:
        mmjax.generate(model, imgs, prompt, **{**kw(new), "max_new_tokens": 2, "min_new_tokens": 2})
    say(f"mmjax.generate warmed up on {n} prompts")
    alone, times, added = [], {}, {}
    t0 = time.perf_counter()
    for i, (imgs, prompt, new) in enumerate(specs):
        t = time.perf_counter()
        out = mmjax.generate(model, imgs, prompt, **kw(new))
        first = t + out.timings["preprocess_s"] + out.timings["prefill_s"]
        step = out.timings["decode_s"] / max(out.timings["steps"] - 1, 1)
        times[i], added[i] = [first + k * step for k in range(len(out.token_ids))], t
        alone.append(out.token_ids)
    rows = [summarize("one by one, mmjax.generate", time.perf_counter() - t0, times, added)]

    # one by one, HF
    times, added = {}, {}
    t0 = time.perf_counter()
    for i, (imgs, prompt, new) in enumerate(specs[: args.hf_requests]):
        inputs = model.preprocess(imgs, prompt, chat_template=False)
        pt = {k: torch.tensor(v) for k, v in inputs.items()}
        pt["input_ids"] = pt["input_ids"].long()
        t = time.perf_counter()
        with torch.no_grad():
            first = hf_model.generate(**pt, max_new_tokens=1, do_sample=False)  # TTFT as its own call
            t1 = time.perf_counter()
            hf_model.generate(**pt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        t2 = time.perf_counter()
        step = (t2 - t1 - (t1 - t)) / max(new - 1, 1)
        times[i], added[i] = [t + (t1 - t)] + [t + (t1 - t) + k * step for k in range(1, new)], t
        del first
    hf_wall = sum(t[-1] - added[i] for i, t in times.items())
    rows.append(summarize(f"one by one, HF transformers ({min(n, args.hf_requests)} requests)", hf_wall, times,
                          added))

    eng = ServingEngine(model, max_num_seqs=16, page_size=16)
    make = lambda: [eng.make_request(imgs, prompt, **kw(new)) for imgs, prompt, new in specs]  # noqa: E731
    drive(eng, make()[: min(n, 16)], concurrency=16)  # compile the buckets this mix meets
    say(f"engine warmed up: {eng.steps.compiled()}")
    same = True
    for c in [int(x) for x in args.concurrency.split(",")]:
        reqs = make()
        wall, times, added, final = drive(eng, reqs, concurrency=c)
        same &= all(final[r.request_id].token_ids == a for r, a in zip(reqs, alone))
        rows.append(summarize(f"engine, concurrency {c}", wall, times, added))
    for rate in [float(x) for x in args.rates.split(",")]:
        reqs = make()
        arrivals = np.cumsum(np.random.default_rng(1).exponential(1 / rate, len(reqs)))
        wall, times, added, final = drive(eng, reqs, arrivals=arrivals)
        rows.append(summarize(f"engine, Poisson {rate:g} req/s", wall, times, added))

    # the decode step at 8 running sequences: paged (engine) vs static batch 8 (mmjax.generate)
    imgs, prompt, _ = specs[0]
    static = []
    for _ in range(3):
        r = mmjax.generate(model, [imgs] * 8, [prompt] * 8, **kw(64)).timings
        static.append(r["decode_s"] / (r["steps"] - 1))
    reqs = [eng.make_request(imgs, prompt, **kw(64)) for _ in range(8)]
    for r in reqs:
        eng.add_request(r)
    paged = []
    while eng.has_unfinished():
        full = len(eng.running) == 8 and not eng.waiting
        t = time.perf_counter()
        eng.step()
        if full:
            paged.append(time.perf_counter() - t)
    say("decode step timed")
    static_ms, paged_ms = statistics.median(static) * 1e3, statistics.median(paged) * 1e3

    print(f"\n{n} requests; greedy answers of the engine identical to one by one: {same}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)\n")
    base = rows[0][1]
    print("| setting | output tok/s | x one by one | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    for name, tps, t50, t99, i50, i99 in rows:
        print(f"| {name} | {tps:.1f} | {tps / base:.2f} | {t50:.2f} / {t99:.2f} | {i50:.1f} / {i99:.1f} |")
    print(f"\ndecode step with 8 sequences: paged {paged_ms:.1f} ms, static batch 8 {static_ms:.1f} ms "
          f"({paged_ms / static_ms:.2f}x)")
    print(f"engine stats: {eng.stats()}; compiled: {eng.steps.compiled()}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
