"""LLaVA checkpoint layout -> the llava family's param tree (mmjax.families.llava: a composed
model with a `clip` vision tower, an `mlp` projector and a `llama` decoder).

Four key layouts are accepted (each source tensor matches exactly one of them):
  hub (llava-hf/*):      vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head
  transformers 5:        vision_tower.*,              multi_modal_projector.*, language_model.model.*, language_model.lm_head
  transformers 4.5x:     model.vision_tower.vision_model.*, model.multi_modal_projector.*, model.language_model.*, lm_head
  transformers 5 state_dict() (what torch.save of the live model writes): model.vision_tower.*, ... as 4.5x
"""
from __future__ import annotations

from converters.families.common import clip_vision_rules, linear, llama_rules
from converters.rules import Rule

__all__ = ["llava_rules"]

# Each layout's prefixes; the layouts share some, so each list holds distinct prefixes only.
_VISION = ("vision_tower.vision_model", "vision_tower", "model.vision_tower.vision_model", "model.vision_tower")
_PROJECTOR = ("multi_modal_projector", "model.multi_modal_projector")
_DECODER = (("language_model.model", "language_model.lm_head"), ("model.language_model", "lm_head"))


def llava_rules(cfg) -> list[Rule]:
    """cfg: the composed config (vision = ClipTowerConfig, projector = MLPProjectorConfig)."""
    v, p = cfg.vision, cfg.projector
    rules: list[Rule] = []
    for vis in _VISION:
        rules += clip_vision_rules(vis, "vision", v.tower.num_layers, v.layers_used)
    for proj in _PROJECTOR:
        rules += linear(f"{proj}.linear_1", "projector/mlp/fc1", p.use_bias)
        rules += linear(f"{proj}.linear_2", "projector/mlp/fc2", p.use_bias)
    for dec, head in _DECODER:
        rules += llama_rules(dec, head, "decoder", cfg.decoder)
    return rules
