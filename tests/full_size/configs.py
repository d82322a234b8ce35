"""Full-size HF configs (the released models' shapes), built from transformers' config classes:
no weights are downloaded or allocated. The eval_shape tier (tests/test_full_size.py) and the
lowering tier read them."""
from __future__ import annotations

QWEN2VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                           "mrope_section": [16, 24, 24]})


def llava_1_5_7b():
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px, 2-layer GELU projector, Llama-2-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def qwen2_vl_7b():
    """Qwen/Qwen2-VL-7B-Instruct."""
    from transformers import Qwen2VLConfig

    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=QWEN2VL_7B_TEXT, vision_config=vision, image_token_id=151655,
                         video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def qwen2_5_vl_7b():
    """Qwen/Qwen2.5-VL-7B-Instruct."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31])
    return Qwen2_5_VLConfig(text_config=QWEN2VL_7B_TEXT, vision_config=vision, image_token_id=151655,
                            video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


FULL_SIZE = {"llava-1.5-7b": ("llava", llava_1_5_7b), "qwen2-vl-7b": ("qwen2_vl", qwen2_vl_7b),
             "qwen2.5-vl-7b": ("qwen2_5_vl", qwen2_5_vl_7b)}


def source_shapes(hf_config) -> dict:
    """{tensor name: (shape, dtype name)} of the HF model's state dict, built on the meta device
    (shapes only, no memory), with save_pretrained's names (transformers 5 layout)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    return {k: (tuple(v.shape), "float32") for k, v in model.state_dict().items()}
