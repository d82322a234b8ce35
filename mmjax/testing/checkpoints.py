"""Tiny random HF checkpoints written by the real `save_pretrained`, for tests, the demo and
benchmarks. Nothing is downloaded: configs come from HF config classes, tokenizers are trained
in-process (mmjax.testing.tokenizers). transformers is imported lazily — it is a test
dependency, not a runtime one."""
from __future__ import annotations

import os
from pathlib import Path

from mmjax.testing.tokenizers import build_tiny_tokenizer, save_hf_tokenizer

__all__ = ["LLAVA_CHAT_TEMPLATE", "tiny_llava_config", "save_tiny_llava"]

# A LLaVA-1.5-style template ("USER: <image>\n... ASSISTANT:"), written for this project.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

LLAVA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def tiny_llava_config(*, vocab_size=512, text_hidden=64, text_layers=2, heads=4, kv_heads=2, inter=128,
                      vision_hidden=32, vision_layers=2, vision_heads=4, vision_inter=64, image_size=32,
                      patch_size=8, feature_layer=-2, strategy="default", tie=False, rope_parameters=None,
                      init_range=0.1, max_positions=2048, image_token_index=4):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_inter,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size, initializer_range=init_range)
    text_kw = dict(vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=inter,
                   num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                   max_position_embeddings=max_positions, initializer_range=init_range,
                   bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=tie)
    if rope_parameters is not None:
        text_kw["rope_parameters"] = rope_parameters
    text = LlamaConfig(**text_kw)
    n_img = (image_size // patch_size) ** 2 + (1 if strategy == "full" else 0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                       image_seq_length=n_img, vision_feature_layer=feature_layer,
                       vision_feature_select_strategy=strategy, tie_word_embeddings=tie)


def save_tiny_llava(folder: str | os.PathLike, config=None, *, dtype="float32", seed=0, max_shard_size=None,
                    safe_serialization=True, chat_template=LLAVA_CHAT_TEMPLATE, vocab_size=None):
    """Build a random LlavaForConditionalGeneration + tokenizer + processor and save_pretrained them.

    Returns (folder, hf_model in eval mode, hf_processor)."""
    import torch
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    config = config or tiny_llava_config()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), **kw)
    if not safe_serialization:
        # transformers 5 writes only safetensors; older checkpoints ship pytorch_model.bin,
        # which is exactly torch.save of the state dict.
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
    tok = build_tiny_tokenizer(vocab_size or min(config.text_config.vocab_size, 512), LLAVA_SPECIALS)
    assert tok.token_to_id("<image>") == config.image_token_index
    hf_tok = save_hf_tokenizer(tok, folder, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                               extra_special_tokens=["<image>"])
    vc = config.vision_config
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": vc.image_size},
                                            crop_size={"height": vc.image_size, "width": vc.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=hf_tok, patch_size=vc.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               chat_template=chat_template, num_additional_image_tokens=1)
    processor.save_pretrained(str(folder))
    return folder, model, processor
