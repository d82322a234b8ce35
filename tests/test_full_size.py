"""The eval_shape tier: released models' shapes (LLaVA-1.5-7B, Qwen2-VL-7B, Qwen2.5-VL-7B) without
their memory. For each, the HF model's state dict is built on torch's meta device and the mmjax
module's parameters under jax.eval_shape, and the converter's plan must map every tensor onto
every parameter with matching shapes: what converting the real checkpoint checks before it reads
a byte."""
import numpy as np
import pytest

from converters.families import rules_for
from converters.rules import build_plan
from converters.torch2flax import model_param_shapes
from mmjax import registry
from tests.full_size.configs import FULL_SIZE, source_shapes

# parameter counts of the released checkpoints (HF's num_parameters(); mmjax drops CLIP's unused
# last layer and post-norm for LLaVA, and the tied copies)
PARAMS = {"llava-1.5-7b": 7_063_427_072, "qwen2-vl-7b": 8_291_375_616, "qwen2.5-vl-7b": 8_292_166_656}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_converter_plan_covers_the_full_size_model(name):
    family_name, make = FULL_SIZE[name]
    hf = make()
    family = registry.get(family_name)
    cfg = family.config_from_hf(hf.to_dict())
    targets = model_param_shapes(family, cfg)  # jax.eval_shape: nothing allocated
    sources = source_shapes(hf)
    plan = build_plan(sources, rules_for(family_name)(cfg), targets)  # raises on any mismatch
    assert plan.num_sources + len(plan.dropped) == len(sources) and len(plan.origin) == len(targets)
    n_target = sum(int(np.prod(s.shape)) for s in targets.values())
    n_source = sum(int(np.prod(s)) for s, _ in sources.values())
    assert n_source == PARAMS[name], f"{name}: HF model has {n_source:,} parameters"
    dropped = sum(int(np.prod(sources[s][0])) for s, _ in plan.dropped)
    assert n_target == n_source - dropped
