"""A Family for a composed VLM: what the built-in VLM families and a user's own are made with.

    FAMILY = register(composed_family("acme_vlm", config_from_acme))

The family's converter rules are registered on the converters side
(converters.families.register_rules) or given to the converter as a --rules file.
"""
from __future__ import annotations

import jax.numpy as jnp

from mmjax.models.composed import ComposedConfig, ComposedVLM
from mmjax.preprocess.composed import ComposedProcessor, prepare_composed
from mmjax.registry import Family
from mmjax.sharding.rules import block_rules

__all__ = ["composed_family", "composed_sharding"]


def composed_sharding(cfg: ComposedConfig) -> list:
    """Param path regex -> axes in the legend (mmjax.sharding.rules maps letters to mesh axes).

    Decoder and vision blocks: Megatron split (q/k/v and gate/up/fc1 by heads / F columns; o and
    down/fc2 by rows: two all-reduces per block), embedding and lm_head over V. A tower's k/v
    have every head (no GQA). Projectors, norms, patch and position embeddings are small and
    replicated, except a patch merger's MLP (Qwen2-VL), split like a block's."""
    return [
        (r"decoder/embed/embedding", "VD"),
        (r"decoder/lm_head/kernel", "DV"),
        *block_rules(r"decoder/layers_\d+"),
        *block_rules(r"vision/layers_\d+", kv="N"),
        (r"vision/merger/mlp/fc1/kernel", "DF"),
        (r"vision/merger/mlp/fc1/bias", "F"),
        (r"vision/merger/mlp/fc2/kernel", "FD"),
        (r".*", None),
    ]


def composed_family(name: str, config_from_hf, *, config_cls: type = ComposedConfig, processor=ComposedProcessor,
                    prepare=prepare_composed, sharding=composed_sharding) -> Family:
    """config_from_hf: the checkpoint's config.json dict -> a ComposedConfig (or subclass)."""
    return Family(
        name=name,
        config_from_hf=config_from_hf,
        config_cls=config_cls,
        build=lambda cfg, dtype=jnp.float32: ComposedVLM(cfg, dtype),
        processor=processor,
        sharding=sharding,
        prepare=prepare,
    )
