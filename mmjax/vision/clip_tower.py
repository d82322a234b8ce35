"""The CLIP vision tower as a component: hidden states of chosen layers, LLaVA-style.

Axis legend: I images, P patches (+1 with the class token), Dv = D x number of feature layers.

The params are the tower's own (patch_embed, class_embedding, pos_embedding, pre_norm,
layers_{j}), directly under the component's scope; only the blocks up to the deepest feature
layer are built (the rest cannot change the features).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import ClipVisionConfig, ConfigBase
from mmjax.vision.clip import ClipVision

__all__ = ["ClipTowerConfig", "ClipTower"]


@dataclasses.dataclass(frozen=True)
class ClipTowerConfig(ConfigBase):
    tower: ClipVisionConfig  # the CLIP vision transformer itself
    feature_layers: tuple[int, ...] = (-2,)  # hidden-state indices (0 = after the pre-norm), HF's vision_feature_layer
    select_strategy: str = "default"  # default: drop the class token; full: keep it

    def __post_init__(self):
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.select_strategy!r} is not default or full")
        self.feature_indices  # noqa: B018  (raises on an out-of-range layer)

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """feature_layers as non-negative indices into the L+1 hidden states."""
        n = self.tower.num_layers + 1
        for k in self.feature_layers:
            if not -n <= k < n:
                raise ValueError(f"vision_feature_layer {k} is out of range for {self.tower.num_layers} layers")
        return tuple(k % n for k in self.feature_layers)

    @property
    def layers_used(self) -> int:
        return max(self.feature_indices)

    @property
    def width(self) -> int:  # Dv
        return self.tower.hidden_size * len(self.feature_layers)

    @property
    def num_features(self) -> int:  # P
        return self.tower.num_patches + (1 if self.select_strategy == "full" else 0)

    @property
    def image_size(self) -> int:
        return self.tower.image_size

    @property
    def num_channels(self) -> int:
        return self.tower.num_channels


class ClipTower(nn.Module):
    cfg: ClipTowerConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.tower = ClipVision(self.cfg.tower, self.cfg.layers_used, self.dtype)
        nn.share_scope(self, self.tower)  # the tower's params sit directly under this component

    def __call__(self, pixel_values):  # [I, C, Hi, Wi] -> [I, P, Dv] (HF get_image_features before the projector)
        hidden = self.tower(pixel_values)
        sel = [hidden[k] for k in self.cfg.feature_indices]
        if self.cfg.select_strategy == "default":
            sel = [h[:, 1:] for h in sel]
        return jnp.concatenate(sel, axis=-1) if len(sel) > 1 else sel[0]
