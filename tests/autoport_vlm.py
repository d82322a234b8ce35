"""TowerVLM: AcmeVLM (tests/custom_vlm) with its vision tower replaced by tests.autoport_parts.Tower
(einsum q/k/v, scaled_dot_product_attention, layer scale, RMSNorm: nothing mmjax's `vit`
component has), and its mmjax port: the tower is an "autoport" vision component that the
converter fills with `--autoport 'vis.=tests.autoport_parts:Tower(...)'`; the rest is AcmeVLM's
spec and rules, unchanged.
"""
from __future__ import annotations

import torch

from converters.families import register_rules
from mmjax.families.composed import composed_family
from mmjax.models.composed import ComposedConfig
from mmjax.registry import register
from tests.autoport_parts import Tower, randomize
from tests.custom_vlm.port import config_from_acme
from tests.custom_vlm.rules import RULES as ACME_RULES
from tests.custom_vlm.torch_model import ACME_CONFIG, AcmeVLM

TOWER_KWARGS = {"width": ACME_CONFIG["vis_width"], "depth": 2, "heads": 4, "mlp": 64, "patch": ACME_CONFIG["patch"],
                "image_size": ACME_CONFIG["image_size"]}
AUTOPORT_FLAG = "vis.=tests.autoport_parts:Tower(" + ", ".join(f"{k}={v}" for k, v in TOWER_KWARGS.items()) + ")"


class TowerVLM(AcmeVLM):
    def __init__(self, c=ACME_CONFIG):
        super().__init__(c)
        self.vis = Tower(**TOWER_KWARGS)


def build_tower_vlm(seed: int = 0) -> TowerVLM:
    torch.manual_seed(seed)
    return randomize(TowerVLM(), seed)


def config_from_tower_vlm(c: dict) -> ComposedConfig:
    """AcmeVLM's spec with an "autoport" vision: its sizes given, its graph filled by the converter."""
    spec = config_from_acme(c).to_spec()
    spec["vision"] = {"type": "autoport", "image_size": c["image_size"], "num_channels": 3, "width": c["vis_width"],
                      "num_features": (c["image_size"] // c["patch"]) ** 2}
    return ComposedConfig.from_spec(spec)


def tower_vlm_rules(cfg):
    """AcmeVLM's rules without the vision tower's (--autoport writes those)."""
    return [r for r in ACME_RULES(cfg) if not r.sources[0].startswith("vis.")]


FAMILY = register(composed_family("acme_tower_vlm", config_from_tower_vlm))
register_rules("acme_tower_vlm", tower_vlm_rules)
