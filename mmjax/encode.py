"""mmjax.encode: run an encoder family (clip, bert), which has no decoder and so no mmjax.generate.

    model = mmjax.load("clip-flax/")
    out = mmjax.encode(model, input_ids=ids, attention_mask=mask, pixel_values=px)
    out["logits_per_image"]  # [I, B]; also logits_per_text [B, I], text_embeds [B, E], image_embeds [I, E]
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import InputError

__all__ = ["encode", "ENCODER_INPUTS"]

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


@functools.partial(jax.jit, static_argnames=("module", "options"))
def _run(params, batch, *, module, options):
    # module is static: its config (and so its kernel policy) is part of the cache key
    return module.apply({"params": params}, batch, **dict(options))


def encode(model, **inputs) -> dict[str, np.ndarray]:
    """Run an encoder family loaded with mmjax.load on HF-named arrays.

    Array keyword arguments (input_ids, attention_mask, token_type_ids, pixel_values) are the
    model inputs; any other keyword is a static option of the module (clip: normalize=True;
    bert: pool="pooler" | "cls" | "mean"). Returns the module's named outputs as numpy arrays.
    One compile per input shape and option set."""
    module = model.module
    accepted = getattr(module, "encoder_inputs", None)
    if accepted is None:
        raise InputError(f"{model.path}: family {model.family.name!r} is not an encoder; use mmjax.generate")
    batch, options = {}, {}
    for k, v in inputs.items():
        if k in ENCODER_INPUTS:
            if k not in accepted:
                raise InputError(f"{k}: family {model.family.name!r} takes only {', '.join(accepted)}")
            if v is not None:
                batch[k] = np.asarray(v)
        elif k in module.encoder_options:
            options[k] = v
        else:
            raise InputError(f"{k}: not an input ({', '.join(accepted)}) or option "
                             f"({', '.join(module.encoder_options)}) of family {model.family.name!r}")
    if not batch:
        raise InputError(f"encode: no inputs given; family {model.family.name!r} takes {', '.join(accepted)}")
    if model.family.prepare is not None:
        model.family.prepare(model.config, batch)
    arrays = {k: jnp.asarray(v, model.dtype if k == "pixel_values" else jnp.int32) for k, v in batch.items()}
    out = _run(model.params, arrays, module=module, options=tuple(sorted(options.items())))
    return {k: np.asarray(v) for k, v in out.items()}
