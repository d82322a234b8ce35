"""mmjax.models.base.decode_params: decode steps get only the params they read (a VLM's decoder),
and a module that does not say gets all of them."""
import jax
import numpy as np

import mmjax
from mmjax.models.base import decode_params


def test_a_vlm_decodes_from_its_decoder_params_alone(tiny_llava):
    m = mmjax.load(tiny_llava.flax)
    sub = decode_params(m.module, m.params)
    assert set(sub) == {"decoder"} and sub["decoder"] is m.params["decoder"]
    assert {"vision", "projector"} <= set(m.params)
    # the decode steps (SYNC_EVERY to a call) are called with the decoder's params only
    seen = []
    step = m.engine.decode_steps

    def spy(params, *a, **k):
        seen.append(set(params))
        return step(params, *a, **k)

    m.engine.decode_steps = spy
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    out = mmjax.generate(m, [[image]], ["hi"], max_new_tokens=4, min_new_tokens=4)
    assert len(out.token_ids[0]) == 4 and seen == [{"decoder"}]  # 3 steps in one call


def test_a_module_without_the_method_gets_all_params():
    class Plain:
        pass

    params = {"a": np.ones(2), "b": {"c": np.zeros(1)}}
    assert decode_params(Plain(), params) is params
    assert jax.tree.structure(decode_params(Plain(), params)) == jax.tree.structure(params)
