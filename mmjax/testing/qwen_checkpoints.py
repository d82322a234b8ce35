"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints written by the real `save_pretrained`, for tests,
the demo and benchmarks. Nothing is downloaded: configs come from HF config classes, the
tokenizer is trained in-process (mmjax.testing.tokenizers). transformers is imported lazily —
it is a test dependency, not a runtime one.

Sizes: a 2-layer Qwen2 decoder (D 64, 4 heads, 2 kv heads, M-RoPE sections 2/3/3 of the 8
rotary frequencies), a 2-block vision tower of width 32 with 14 px patches and 2x2 merging.
Qwen2.5-VL's window is 56 px = 2x2 merged tokens, so a 112x112 image splits into 4 windows,
and block 1 attends over the whole image (fullatt_block_indexes=[1]). The image processor keeps
images between 2x2 and 6x6 merged tokens (min_pixels 28*28*4, max_pixels 28*28*36).
"""
from __future__ import annotations

import os
from pathlib import Path

from mmjax.testing.tokenizers import build_tiny_tokenizer, save_hf_tokenizer

__all__ = ["QWEN_CHAT_TEMPLATE", "QWEN_SPECIALS", "tiny_qwen2vl_config", "save_tiny_qwen2vl"]

# A ChatML template in Qwen's style (image parts -> vision tokens), written for this project.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ids 0..6, in this order
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
_ID = {t: i for i, t in enumerate(QWEN_SPECIALS)}

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 36


def tiny_qwen2vl_config(variant: str = "qwen2_vl", *, vocab_size=512, text_hidden=64, text_layers=2, heads=4,
                        kv_heads=2, inter=128, mrope_section=(2, 3, 3), vision_width=32, vision_depth=2,
                        vision_heads=4, window_size=56, fullatt_block_indexes=(1,), init_range=0.1,
                        max_positions=2048, tie=False):
    """An HF Qwen2VLConfig (variant "qwen2_vl") or Qwen2_5_VLConfig ("qwen2_5_vl")."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=inter,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=max_positions, initializer_range=init_range,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
                bos_token_id=None, eos_token_id=_ID["<|im_end|>"], pad_token_id=_ID["<|endoftext|>"],
                tie_word_embeddings=tie)
    common = dict(depth=vision_depth, num_heads=vision_heads, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, initializer_range=init_range)
    ids = dict(image_token_id=_ID["<|image_pad|>"], video_token_id=_ID["<|video_pad|>"],
               vision_start_token_id=_ID["<|vision_start|>"], vision_end_token_id=_ID["<|vision_end|>"],
               tie_word_embeddings=tie)
    if variant == "qwen2_vl":
        vision = dict(common, embed_dim=vision_width, hidden_size=text_hidden, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if variant == "qwen2_5_vl":
        vision = dict(common, hidden_size=vision_width, out_hidden_size=text_hidden, intermediate_size=48,
                      window_size=window_size, fullatt_block_indexes=list(fullatt_block_indexes))
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"variant {variant!r} is not qwen2_vl or qwen2_5_vl")


def save_tiny_qwen2vl(folder: str | os.PathLike, variant: str = "qwen2_vl", config=None, *, seed=0,
                      chat_template=QWEN_CHAT_TEMPLATE, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """Build a random Qwen2VL/Qwen2_5_VLForConditionalGeneration + tokenizer + processor and
    save_pretrained them. Returns (folder, hf_model in eval mode, hf_processor)."""
    import torch
    from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessorPil, Qwen2VLProcessor)

    config = config or tiny_qwen2vl_config(variant)
    model_cls, proc_cls = {"qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
                           "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)}[variant]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok = build_tiny_tokenizer(min(config.text_config.vocab_size, 512), QWEN_SPECIALS, bos=None)
    hf_tok = save_hf_tokenizer(tok, folder, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                               extra_special_tokens=list(QWEN_SPECIALS[1:]))
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                               patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = _without_video(proc_cls)(image_processor=image_processor, tokenizer=hf_tok, chat_template=chat_template)
    processor.save_pretrained(str(folder))
    return folder, model, processor


def _without_video(proc_cls):
    """proc_cls without its video processor: HF checks every sub-processor's class, and the video
    processor's base class needs torchvision, which this project does not install. Same class
    name, so save_pretrained writes the processor_config.json HF writes for an image-only use."""
    @classmethod
    def get_attributes(cls):
        return [a for a in proc_cls.get_attributes() if a != "video_processor"]

    return type(proc_cls.__name__, (proc_cls,), {"get_attributes": get_attributes})
