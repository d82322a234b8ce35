"""The protocol every generatable model implements, and helpers the families share.

A VLM module (flax.linen) provides:
  embed(batch) -> (x [B, T, D], positions [B, T] | [3, B, T], pos_offset [B])
      fuse images and text into decoder input embeddings. pos_offset is what decode adds to a
      token's cache index to get its rope position (0 for plain RoPE; M-RoPE's rope delta).
  embed_tokens(ids [B, T]) -> [B, T, D]      text-only embeddings (what decode steps feed)
  decode(x, positions, mask, cache=None, write_index=None) -> (hidden [B, T, D], cache)
      the decoder stack. Without a cache, the returned cache is this call's own keys, per layer
      {"k","v": [B, T, K, H]}; with one (per layer {"k","v": [B, K, S, H]}: S beside H, so decode
      contracts it without a transpose) it is the updated cache.
  logits(hidden) -> [B, T, V] float32
  __call__(batch) -> logits [B, T, V]   (embed + decode without cache; init and parity)
  example_batch() -> dict of small numpy arrays for init / eval_shape
  param_shapes() -> {"a/b/kernel": ShapeDtypeStruct} (usually `return param_shapes(self)`)
Generation (mmjax.generation) needs nothing else. Every VLM mmjax ships is a ComposedVLM
(mmjax.models.composed), which implements these; a model of your own composes it too.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.kernels.attention import MaskSpec

from mmjax.tree import flatten_params

__all__ = ["param_shapes", "merge_at_tokens", "prefill_logits"]


def param_shapes(module) -> dict:
    """{"a/b/kernel": ShapeDtypeStruct} of the module's params, allocating nothing. With
    `module.cfg.quant` set, the quantized layout (int8 kernels + their scales, mmjax.quantization)."""
    shapes, contractions, _ = abstract_init(module)
    quant = getattr(getattr(module, "cfg", None), "quant", None)
    if quant is not None:
        from mmjax.quantization import quantized_layout

        return quantized_layout(dict(shapes), quant, dict(contractions))
    return dict(shapes)


@functools.lru_cache(maxsize=8)
def abstract_init(module) -> tuple[dict, dict, dict]:
    """One abstract init of `module` (nothing allocated; ~1 s for the benchmark model), cached
    per module config: its flat param shapes, {"a/b/kernel": contracted leading axes} of every
    Einsum, and {"a/b": FUSIONS} of every module that declares projections it can fuse
    (mmjax.layers.fusion), found by intercepting their calls. mmjax.load needs all three: the
    quantized layout, the weight panels and the fused projections. Callers copy before changing
    any."""
    import flax.linen as nn

    from mmjax.layers.linear import Einsum
    from mmjax.quantization import contracted_axes

    found: dict[str, int] = {}
    fusable: dict[str, tuple] = {}

    def record(next_fn, args, kwargs, context):
        if context.method_name == "__call__":
            if isinstance(context.module, Einsum):
                found["/".join(context.module.path) + "/kernel"] = contracted_axes(context.module.eqn)
            elif getattr(context.module, "FUSIONS", None):
                fusable["/".join(context.module.path)] = context.module.FUSIONS
        return next_fn(*args, **kwargs)

    batch = module.example_batch()
    with nn.intercept_methods(record):
        tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), batch))
    return flatten_params(tree["params"]), found, fusable


def decode_params(module, params: dict) -> dict:
    """The params a decode step reads (embed_tokens, decode, logits), for the engines to pass to
    their decode programs: `module.decode_params(params)` where the module says (a VLM: its
    decoder's, not the vision tower's or the projector's), else all of them. Each leaf passed is
    one more array the step's dispatch handles on the host: on the benchmark model 196 leaves
    instead of 447, which cut the host time per step about in half, time a 2-core machine
    otherwise takes from the step's kernels."""
    select = getattr(module, "decode_params", None)
    return params if select is None else select(params)


def merge_at_tokens(text_embeds, features, token_mask):
    """Place features [M, D] (row-major over images) at the True positions of token_mask [B, T].

    Equivalent to HF's masked_scatter: the k-th marked token (row-major) gets feature k.
    Extra (padded) features are never read; the host checks the counts match beforehand."""
    B, T, D = text_embeds.shape
    flat_mask = token_mask.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat_mask.astype(jnp.int32)) - 1, 0, features.shape[0] - 1)
    gathered = jnp.take(features.astype(text_embeds.dtype), idx, axis=0).reshape(B, T, D)
    return jnp.where(token_mask[..., None], gathered, text_embeds)


def prefill_logits(module, batch):
    """embed + decode without a cache -> logits [B, T, V]: a VLM's __call__ (init and parity).
    batch["lengths"] [B] masks right padding (default: every token is real)."""
    x, positions, _ = module.embed(batch)
    lengths = batch.get("lengths")
    if lengths is None:
        lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
    h, _ = module.decode(x, positions, MaskSpec(causal=True, kv_lengths=lengths))
    return module.logits(h)
