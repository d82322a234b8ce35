"""Components by exact name: what a composed model (mmjax.models.composed) is built from.

Three kinds, each a (config dataclass, flax module) pair registered by exact name:
  vision     module(pixel_values, **inputs) -> features [I, P, Dv] (or packed [U, Dv]); config
             has .width (Dv) and .num_features (P; None when it varies per image)
  projector  module(features [.., Dv]) -> [.., D]; config has in_features, out_features and
             num_tokens(P) -> Q
  decoder    embed_tokens / __call__(x, positions, mask, cache, write_index) / logits, like
             LlamaDecoder; config has hidden_size, num_layers, max_position_embeddings
The built-in families (llava, qwen2_vl) are composed from these; a user's own component
registers the same way (register_component) and is then usable by name in a model spec.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigBase, LlamaConfig
from mmjax.decoders.llama import LlamaDecoder
from mmjax.decoders.neox import NeoXConfig, NeoXDecoder
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.mlp import MLP
from mmjax.projectors.linear import LinearProjector, LinearProjectorConfig
from mmjax.projectors.pixel_shuffle import PixelShuffleConfig, PixelShuffleProjector
from mmjax.projectors.resampler import PerceiverResampler, ResamplerConfig
from mmjax.vision.clip_tower import ClipTower, ClipTowerConfig
from mmjax.vision.qwen2vl import VISION_KEYS, Qwen2VLVision, Qwen2VLVisionConfig, vision_inputs
from mmjax.vision.vit import ViT, ViTConfig

__all__ = ["Component", "KINDS", "register_component", "get_component", "component_names",
           "MLPProjectorConfig", "IdentityProjectorConfig"]

KINDS = ("vision", "projector", "decoder")


def square_image_example(cfg) -> tuple[dict, int]:
    """One zero image [1, C, S, S] from cfg.num_channels / cfg.image_size, and its feature count."""
    return {"pixel_values": np.zeros((1, cfg.num_channels, cfg.image_size, cfg.image_size), np.float32)}, \
        cfg.num_features


@dataclasses.dataclass(frozen=True)
class Component:
    kind: str
    name: str
    config_cls: type  # a frozen ConfigBase dataclass
    module_cls: type  # flax module taking (cfg, dtype)
    # vision only: batch keys the module reads besides pixel_values (host-built by the family's
    # prepare step), and cfg -> (one example image's inputs, its feature count) for init.
    inputs: tuple[str, ...] = ()
    example: Callable | None = square_image_example


_COMPONENTS: dict[tuple[str, str], Component] = {}


def register_component(kind: str, name: str, config_cls: type, module_cls: type, *, inputs: tuple[str, ...] = (),
                       example: Callable | None = square_image_example) -> Component:
    from mmjax.errors import InputError

    if kind not in KINDS:
        raise InputError(f"component kind {kind!r} is not one of {', '.join(KINDS)}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, ConfigBase)
            and dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise InputError(f"register_component({kind!r}, {name!r}): config class {config_cls!r} must be a frozen "
                         "dataclass subclassing mmjax.config.ConfigBase (it gives from_dict / to_dict)")
    comp = Component(kind, name, config_cls, module_cls, tuple(inputs), example)
    if _COMPONENTS.get((kind, name), comp) != comp:
        raise InputError(f"{kind} component {name!r} is already registered")
    _COMPONENTS[(kind, name)] = comp
    return comp


def component_names(kind: str) -> list[str]:
    return sorted(n for k, n in _COMPONENTS if k == kind)


def get_component(kind: str, name: str) -> Component:
    try:
        return _COMPONENTS[(kind, name)]
    except KeyError:
        raise ValueError(f"unknown {kind} component {name!r}; registered: {', '.join(component_names(kind))} "
                         "(mmjax.components.register_component adds one)") from None


# ------------------------------------------------------------------ projectors defined here

@dataclasses.dataclass(frozen=True)
class MLPProjectorConfig(ConfigBase):
    """LLaVA's Linear -> act -> Linear (hidden width = out_features)."""
    in_features: int  # Dv, the vision features' width
    out_features: int  # D, the decoder width
    hidden_act: str = "gelu"  # activation between the two Linears (mmjax.layers.activations names)
    use_bias: bool = True  # biases on both Linears
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")

    def num_tokens(self, num_features):
        return num_features


class MLPProjector(nn.Module):
    cfg: MLPProjectorConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [.., Dv] -> [.., D]; params mlp/{fc1, fc2} as in LLaVA's projector
        c = self.cfg
        return MLP(c.in_features, c.out_features, c.hidden_act, c.use_bias, c.out_features, self.dtype, c.kernels,
                   name="mlp")(x)


@dataclasses.dataclass(frozen=True)
class IdentityProjectorConfig(ConfigBase):
    """No projector: the vision tower already ends in the decoder width (Qwen2-VL's merger)."""
    in_features: int  # Dv, the vision features' width (must equal out_features)
    out_features: int  # D, the decoder width

    def __post_init__(self):
        if self.in_features != self.out_features:
            raise ValueError(f"identity projector: in_features {self.in_features} != out_features {self.out_features}")

    def num_tokens(self, num_features):
        return num_features


class IdentityProjector(nn.Module):
    cfg: IdentityProjectorConfig
    dtype: jnp.dtype = jnp.float32

    def __call__(self, x):
        return x


def _qwen2vl_example(cfg: Qwen2VLVisionConfig) -> tuple[dict, int]:
    """One image of one merge unit (grid 1 x m x m): one decoder token."""
    m = cfg.spatial_merge_size
    grid = np.array([[1, m, m]])
    return {"pixel_values": np.zeros((m * m, cfg.patch_dim), np.float32), **vision_inputs(cfg, grid)}, 1


register_component("vision", "vit", ViTConfig, ViT)
register_component("vision", "clip", ClipTowerConfig, ClipTower)
register_component("vision", "qwen2vl", Qwen2VLVisionConfig, Qwen2VLVision, inputs=VISION_KEYS,
                   example=_qwen2vl_example)
register_component("projector", "identity", IdentityProjectorConfig, IdentityProjector)
register_component("projector", "linear", LinearProjectorConfig, LinearProjector)
register_component("projector", "mlp", MLPProjectorConfig, MLPProjector)
register_component("projector", "resampler", ResamplerConfig, PerceiverResampler)
register_component("projector", "pixel_shuffle", PixelShuffleConfig, PixelShuffleProjector)
register_component("decoder", "neox", NeoXConfig, NeoXDecoder)
register_component("decoder", "llama", LlamaConfig, LlamaDecoder)
