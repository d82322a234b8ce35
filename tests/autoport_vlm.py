"""The mmjax port of TowerVLM (tests/autoport_parts.py: AcmeVLM with a vision tower no mmjax
component has): AcmeVLM's spec and rules, with an "autoport" vision component that the
converter fills with `--autoport 'vis.=tests.autoport_parts:Tower(...)'`.

Nothing here imports torch: a converted TowerVLM loads and generates without it.
"""
from __future__ import annotations

from converters.families import register_rules
from mmjax.families.composed import composed_family
from mmjax.models.composed import ComposedConfig
from mmjax.registry import register
from tests.custom_vlm.port import config_from_acme
from tests.custom_vlm.rules import RULES as ACME_RULES

TOWER_KWARGS = {"width": 32, "depth": 2, "heads": 4, "mlp": 64, "patch": 8, "image_size": 32}  # AcmeVLM's sizes
AUTOPORT_FLAG = "vis.=tests.autoport_parts:Tower(" + ", ".join(f"{k}={v}" for k, v in TOWER_KWARGS.items()) + ")"


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
