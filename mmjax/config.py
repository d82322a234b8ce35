"""Frozen config dataclasses. A family's config is built from the HF config.json once
(at conversion) and stored in mmjax_config.json; variants are data, not subclasses
with behaviour."""
from __future__ import annotations

import dataclasses

from mmjax.config_base import ConfigBase
from mmjax.kernels.policy import KernelPolicy

__all__ = ["ConfigBase", "RopeConfig", "LlamaConfig", "ClipVisionConfig"]


@dataclasses.dataclass(frozen=True)
class RopeConfig(ConfigBase):
    """Rotary position embeddings: frequency base, context scaling, and the rotated fraction of a head."""

    theta: float = 10000.0  # frequency base
    rope_type: str = "default"  # default | linear | llama3 (| mrope via LlamaConfig.mrope_section)
    factor: float = 1.0  # context scaling factor (linear, llama3)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / low_freq_factor are scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: the context the model was trained at
    # fraction of the head dim that is rotated (GPT-NeoX partial rotary); 1.0 = all.
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_hf(cls, hf: dict) -> "RopeConfig":
        # transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
        p = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        theta = p.get("rope_theta", hf.get("rope_theta", 10000.0))
        rtype = p.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        src = {**scaling, **p}
        if rtype not in ("default", "linear", "llama3", "mrope"):
            raise ValueError(f"rope_type {rtype!r} is not supported (default, linear, llama3)")
        return cls(
            theta=float(theta),
            rope_type="default" if rtype == "mrope" else rtype,
            factor=float(src.get("factor", 1.0)),
            low_freq_factor=float(src.get("low_freq_factor", 1.0)),
            high_freq_factor=float(src.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(src.get("original_max_position_embeddings", 8192)),
            partial_rotary_factor=float(src.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        )


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ConfigBase):
    """A Llama-style decoder: RMSNorm, RoPE, GQA, SwiGLU. Qwen2 is this with qkv_bias."""

    vocab_size: int  # V, token embeddings (and logits)
    hidden_size: int  # D, the model width
    intermediate_size: int  # F, SwiGLU hidden width
    num_layers: int  # L, decoder blocks
    num_heads: int  # N, query heads
    num_kv_heads: int  # K, key/value heads (grouped-query attention)
    head_dim: int  # H, per-head width
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    rope: RopeConfig = RopeConfig()  # rotary settings
    max_position_embeddings: int = 4096  # the context length
    tie_word_embeddings: bool = False  # logits from the embedding table (no lm_head)
    qkv_bias: bool = False  # biases on q, k, v (Qwen2)
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # biases on gate, up, down
    # M-RoPE (Qwen2-VL): head-dim sections rotated by the t, h, w position axes.
    mrope_section: tuple[int, ...] | None = None
    # sliding-window attention (None = full causal).
    sliding_window: int | None = None
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")

    @classmethod
    def from_hf(cls, t: dict, *, tie_word_embeddings: bool | None = None, **over) -> "LlamaConfig":
        heads = t["num_attention_heads"]
        rope_params = t.get("rope_parameters") or t.get("rope_scaling") or {}
        mrope = rope_params.get("mrope_section")
        kw = dict(
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_layers=t["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads") or heads,
            head_dim=t.get("head_dim") or t["hidden_size"] // heads,
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(t),
            max_position_embeddings=t.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(
                t.get("tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
            ),
            qkv_bias=bool(t.get("attention_bias", False)),
            o_bias=bool(t.get("attention_bias", False)),
            mlp_bias=bool(t.get("mlp_bias", False)),
            mrope_section=tuple(mrope) if mrope else None,
        )
        if t.get("hidden_act", "silu") != "silu":
            raise ValueError(f"llama decoder: hidden_act {t.get('hidden_act')!r} is not supported (silu)")
        kw.update(over)
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(ConfigBase):
    """CLIP ViT: conv patch stem, class token, learned positions, pre-LN blocks."""

    hidden_size: int  # D, the tower width
    intermediate_size: int  # F, MLP hidden width
    num_layers: int  # L, transformer blocks
    num_heads: int  # N, attention heads
    image_size: int  # input side in pixels (square images)
    patch_size: int  # patch side in pixels
    num_channels: int = 3  # C, input channels
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
    hidden_act: str = "quick_gelu"  # MLP activation (mmjax.layers.activations names)
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")

    @classmethod
    def from_hf(cls, v: dict) -> "ClipVisionConfig":
        return cls(
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_layers=v["num_hidden_layers"],
            num_heads=v["num_attention_heads"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            num_channels=v.get("num_channels", 3),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
            hidden_act=v.get("hidden_act", "quick_gelu"),
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2
