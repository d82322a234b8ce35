"""Qwen2-VL and Qwen2.5-VL: a composed model — native-resolution vision tower with its 2x2 patch
merger (`qwen2vl`, ending in the decoder width) -> no projector -> Qwen2 decoder with M-RoPE.
Image features replace the `<|image_pad|>` tokens in order; the prepare step
(mmjax.preprocess.qwen2vl.prepare) builds the M-RoPE positions and the tower's index arrays."""
from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.components import IdentityProjectorConfig
from mmjax.config import LlamaConfig
from mmjax.families.composed import composed_family
from mmjax.models.composed import ComposedConfig
from mmjax.preprocess.qwen2vl import Qwen2VLProcessor, prepare
from mmjax.registry import register
from mmjax.vision.qwen2vl import Qwen2VLVisionConfig

__all__ = ["Qwen2VLConfig", "FAMILY", "FAMILY_2_5"]


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig(ComposedConfig):
    """The composed config plus the special token ids the processor and prepare step check."""
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @classmethod
    def from_hf(cls, hf: dict) -> "Qwen2VLConfig":
        kind = hf.get("model_type")
        readers = {"qwen2_vl": Qwen2VLVisionConfig.from_hf_qwen2_vl,
                   "qwen2_5_vl": Qwen2VLVisionConfig.from_hf_qwen2_5_vl}
        if kind not in readers:
            raise ValueError(f"model_type {kind!r} is not qwen2_vl or qwen2_5_vl")
        t = hf.get("text_config") or hf  # transformers 4.4x kept text keys at the top level
        if t.get("use_sliding_window"):
            raise ValueError(f"{kind}: use_sliding_window=True is not supported (no released model uses it)")
        heads = t["num_attention_heads"]
        tie = hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        # Qwen2 attention: biased q/k/v, unbiased o; head dim is always hidden // heads in HF.
        text = LlamaConfig.from_hf(t, tie_word_embeddings=tie, qkv_bias=True, o_bias=False,
                                   head_dim=t["hidden_size"] // heads)
        if text.mrope_section is None:
            raise ValueError(f"{kind}: text_config.rope_parameters has no mrope_section")
        vision = readers[kind](hf.get("vision_config") or {}, text.hidden_size)
        return cls("qwen2vl", vision, "identity", IdentityProjectorConfig(vision.width, text.hidden_size),
                   "llama", text, fusion="tokens", image_token_id=hf.get("image_token_id", 151655),
                   video_token_id=hf.get("video_token_id", 151656),
                   vision_start_token_id=hf.get("vision_start_token_id", 151652),
                   vision_end_token_id=hf.get("vision_end_token_id", 151653))

    def image_tokens(self, grid_thw) -> np.ndarray:
        """LLM tokens of each image: t * h * w / m^2."""
        return np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=1) // self.vision.merge_unit


def _family(name: str):
    return register(composed_family(name, Qwen2VLConfig.from_hf, config_cls=Qwen2VLConfig,
                                    processor=Qwen2VLProcessor, prepare=prepare))


FAMILY = _family("qwen2_vl")
FAMILY_2_5 = _family("qwen2_5_vl")
