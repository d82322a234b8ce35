"""`make demo`: build a small LLaVA checkpoint locally (no hub), convert it, generate from a
sample image, check the tokens against HF transformers, and print timings.

    python -m mmjax.demo [--out demo-out] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw


def sample_image(size=(320, 240)) -> Image.Image:
    """A drawn scene (sky, grass, sun, a red box), so the demo needs no image file."""
    img = Image.new("RGB", size, (120, 170, 235))
    d = ImageDraw.Draw(img)
    w, h = size
    d.rectangle([0, int(h * 0.65), w, h], fill=(70, 150, 60))
    d.ellipse([int(w * 0.7), 20, int(w * 0.7) + 50, 70], fill=(250, 220, 60))
    d.rectangle([int(w * 0.2), int(h * 0.45), int(w * 0.45), int(h * 0.75)], fill=(200, 40, 40))
    return img


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="work folder (recreated)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import mmjax
    from mmjax.testing.checkpoints import save_tiny_llava, tiny_llava_config

    shutil.rmtree(args.out, ignore_errors=True)
    hf_dir, flax_dir = os.path.join(args.out, "hf"), os.path.join(args.out, "flax")
    t = time.perf_counter()
    cfg = tiny_llava_config(text_hidden=128, text_layers=4, heads=4, kv_heads=2, inter=256,
                            vision_hidden=64, vision_layers=3, image_size=64, patch_size=16)
    _, hf_model, hf_proc = save_tiny_llava(hf_dir, cfg)
    print(f"1. built a random LLaVA checkpoint with save_pretrained -> {hf_dir} ({time.perf_counter() - t:.1f} s)")
    # the user's command (mmjax itself never imports the converter)
    cmd = [sys.executable, "-m", "converters.torch2flax", hf_dir, "--out", flax_dir]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout + done.stderr)
        return done.returncode
    print(f"2. {' '.join(['python'] + cmd[1:])}\n   {done.stdout.strip()}")
    t = time.perf_counter()
    model = mmjax.load(flax_dir)
    print(f"3. mmjax.load ({time.perf_counter() - t:.2f} s)")

    image, prompt = sample_image(), "<image> Describe the picture."
    out = mmjax.generate(model, [image], prompt, max_new_tokens=args.max_new_tokens)
    print(f"4. mmjax.generate, first call (includes compilation): prefill {out.timings['prefill_s'] * 1e3:.0f} ms, "
          f"decode {out.timings['decode_s'] * 1e3:.0f} ms")
    out = mmjax.generate(model, [image], prompt, max_new_tokens=args.max_new_tokens)
    print(f"   second call (compiled): prefill {out.timings['prefill_s'] * 1e3:.1f} ms, "
          f"{out.timings['decode_tok_s']:.0f} tokens/s")
    print(f"   text: {out.text!r}  (random weights: noise, but HF's noise exactly, see 5.)")

    inputs = model.preprocess([image], prompt)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.tensor(inputs["input_ids"], dtype=torch.long),
                                attention_mask=torch.tensor(inputs["attention_mask"]),
                                pixel_values=torch.tensor(inputs["pixel_values"]),
                                max_new_tokens=args.max_new_tokens, do_sample=False)
    ref_ids = ref[0, inputs["input_ids"].shape[1]:].tolist()
    same = ref_ids[: len(out.token_ids)] == out.token_ids
    print(f"5. HF transformers greedy tokens {'match' if same else 'DIFFER from'} mmjax's "
          f"({len(out.token_ids)} tokens)")
    logits = mmjax.forward(model, **{k: v for k, v in inputs.items()})
    with torch.no_grad():
        ref_logits = hf_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    print(f"   prefill logits max |delta| vs HF: {np.abs(logits - ref_logits).max():.2e}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
