"""Real image sizes: mmjax vs HF transformers generating from one large image (issue: attention over
packed images and windows must cost Σ segment², not P²).

    python -m benchmarks.images [--work DIR] [--sizes 896 1344 2048] [--variants qwen2_5_vl qwen2_vl]
                                [--no-warm-cache] [--no-logits]

Builds tiny random Qwen2.5-VL / Qwen2-VL checkpoints (vision hidden 32, 2 layers; decoder hidden 64)
whose processor accepts up to 2048² pixels, converts them, then for each square image size runs
each side in its own fresh process: load, note RSS, reset the peak (/proc/self/clear_refs), generate
4 greedy tokens once (compiles / warms up), then time a second identical call. Reported: that call's
time and the process's peak RSS above its post-load baseline (the warm-up included), plus whether
both sides produced the same tokens.

Then the vision tower alone, the same way in another fresh process per side, on the inputs
generate gives it (mmjax: the patch-bucket padded batch through ComposedVLM.image_features,
jitted; HF: get_image_features): inputs built, RSS noted, one warm-up call (mmjax compiles),
one timed call; peak RSS above that baseline.

Also, unless turned off: mmjax's generate once more with its persistent compilation cache warm
(mmjax's default; a first process fills a cache folder under --work, a second one is measured:
it loads the executables instead of compiling them), and the logits of both sides on the same
inputs (mmjax.forward at exact sizes against HF's forward; max |Δ|).

MMJAX_CPU_ATTENTION=0 in the environment runs mmjax's attention on XLA's ops (the XLA path).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

N_NEW = 4
MAX_PIXELS = 2048 * 2048 + 28 * 28 * 64  # room for 2048² after rounding to multiples of 28

_COMMON = r"""
import json, os, sys, time
import numpy as np
from PIL import Image
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
def peak():
    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
folder, size, n_new, tower = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "tower"
img = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))
prompt = "Describe the image."
"""

# Baseline after load (and, for the tower, after its inputs exist); a warm-up call; a timed call.
_RUN = r"""
base = rss(); open('/proc/self/clear_refs', 'w').write('5')
run(); t = time.perf_counter(); out = run(); dt = time.perf_counter() - t
print(json.dumps({"s": dt, "peak_mb": peak() - base, "tokens": None if tower else out}))
"""

_MMJAX = _COMMON + r"""
import mmjax
model = mmjax.load(folder, compile_cache="MMJAX_COMPILE_CACHE_DIR" in os.environ)
run = lambda: mmjax.generate(model, [img], "<image>" + prompt, max_new_tokens=n_new, min_new_tokens=n_new,
                             chat_template=False).token_ids
if tower:
    import jax, jax.numpy as jnp
    from mmjax.models.composed import ComposedVLM
    inputs = model.preprocess([img], "<image>" + prompt, chat_template=False)
    batch = {k: jnp.asarray(v) for k, v in model.family.prepare(model.config, inputs, model.buckets).items()}
    del inputs
    jax.block_until_ready([x.sum() for x in batch.values()])  # XLA:CPU copies a numpy array in on first use
    vision = jax.jit(lambda p, b: ComposedVLM(model.config).apply({"params": p}, b, method=ComposedVLM.image_features))
    run = lambda: jax.block_until_ready(vision(model.params, batch))
""" + _RUN

_HF = _COMMON + r"""
import torch
from transformers import AutoModelForImageTextToText, Qwen2_5_VLProcessor, Qwen2VLProcessor
from mmjax.testing.qwen_checkpoints import _without_video  # no torchvision here: image-only processor
torch.set_grad_enabled(False)
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
cls = Qwen2_5_VLProcessor if model.config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
proc = _without_video(cls).from_pretrained(folder)
text = "<|vision_start|><|image_pad|><|vision_end|>" + prompt
def run():
    b = proc(images=[img], text=text, return_tensors="pt")
    out = model.generate(**b, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    return out[0, b["input_ids"].shape[1]:].tolist()
if tower:
    b = proc(images=[img], text=text, return_tensors="pt")
    run = lambda: model.model.get_image_features(b["pixel_values"], b["image_grid_thw"])
""" + _RUN


_LOGITS = _COMMON + r"""
import torch, mmjax
from transformers import AutoModelForImageTextToText, Qwen2_5_VLProcessor, Qwen2VLProcessor
from mmjax.testing.qwen_checkpoints import _without_video
torch.set_grad_enabled(False)
hf_dir, flax_dir = folder.split(os.pathsep)
hf = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
cls = Qwen2_5_VLProcessor if hf.config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
proc = _without_video(cls).from_pretrained(hf_dir)
b = proc(images=[img], text="<|vision_start|><|image_pad|><|vision_end|>" + prompt, return_tensors="pt")
want = hf(**b).logits.numpy()
model = mmjax.load(flax_dir, compile_cache=False)
got = mmjax.forward(model, b["input_ids"].numpy(), pixel_values=b["pixel_values"].numpy(),
                    image_grid_thw=b["image_grid_thw"].numpy())
print(json.dumps({"max_abs": float(np.abs(got - want).max())}))
"""


def one(code: str, folder: str, size: int, what: str = "generate", env=None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-c", code, folder, str(size), str(N_NEW), what], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[896, 1344, 2048])
    ap.add_argument("--variants", nargs="+", default=["qwen2_5_vl", "qwen2_vl"])
    ap.add_argument("--sides", nargs="+", default=["hf", "mmjax"])
    ap.add_argument("--no-warm-cache", dest="warm_cache", action="store_false")
    ap.add_argument("--no-logits", dest="logits", action="store_false")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from converters.torch2flax import convert
    from mmjax.testing.qwen_checkpoints import save_tiny_qwen2vl, tiny_qwen2vl_config

    work = args.work or tempfile.mkdtemp(prefix="mmjax-images-")
    rows = []
    for variant in args.variants:
        hf_dir, flax_dir = os.path.join(work, variant, "hf"), os.path.join(work, variant, "flax")
        if not os.path.isdir(flax_dir):
            cfg = tiny_qwen2vl_config(variant, vision_width=32, vision_depth=2, text_hidden=64, max_positions=32768)
            save_tiny_qwen2vl(hf_dir, variant, cfg, max_pixels=MAX_PIXELS)
            convert(hf_dir, flax_dir, progress=False)
        for size in args.sizes:
            res = {}
            for side in args.sides:
                code, folder = (_HF, hf_dir) if side == "hf" else (_MMJAX, flax_dir)
                res[side] = one(code, folder, size)
                tower = one(code, folder, size, "tower")
                res[side].update(vision_s=tower.get("s"), vision_peak_mb=tower.get("peak_mb"))
                if side == "mmjax" and args.warm_cache:
                    cache = {"MMJAX_COMPILE_CACHE_DIR": os.path.join(work, "jax-cache", f"{variant}-{size}")}
                    one(code, folder, size, env=cache)  # fills the cache
                    warm = one(code, folder, size, env=cache)
                    res[side].update(warm_s=warm.get("s"), warm_peak_mb=warm.get("peak_mb"))
            if args.logits:
                res["logits"] = one(_LOGITS, os.pathsep.join([hf_dir, flax_dir]), size)
            rows.append((variant, size, res))
            print(json.dumps({"variant": variant, "size": size, **res}), flush=True)
    print("\n| model | image | HF time | mmjax time | ratio | HF peak MB | mmjax peak MB | ratio | tokens same "
          "| logits max abs diff | HF tower | mmjax tower | HF tower MB | mmjax tower MB "
          "| mmjax, cache warm: time, peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x, f: "" if x is None else format(x, f)
    for variant, size, r in rows:
        h, m = r.get("hf", {}), r.get("mmjax", {})
        if "s" not in h or "s" not in m:
            print(f"| {variant} | {size}² | {h.get('s', h.get('error'))} | {m.get('s', m.get('error'))} |" + " |" * 11)
            continue
        lg = r.get("logits", {})
        print(f"| {variant} | {size}² | {h['s']:.2f} s | {m['s']:.2f} s | {m['s'] / h['s']:.2f}x | "
              f"{h['peak_mb']:.0f} | {m['peak_mb']:.0f} | {m['peak_mb'] / max(h['peak_mb'], 1):.2f}x | "
              f"{'yes' if h['tokens'] == m['tokens'] else 'NO'} | "
              f"{fmt(lg.get('max_abs'), '.1e') or lg.get('error', '')} | "
              f"{fmt(h.get('vision_s'), '.2f')} s | {fmt(m.get('vision_s'), '.2f')} s | "
              f"{fmt(h.get('vision_peak_mb'), '.0f')} | {fmt(m.get('vision_peak_mb'), '.0f')} | "
              + (f"{m['warm_s']:.2f} s, {m['warm_peak_mb']:.0f} |" if m.get("warm_s") is not None else " |"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
