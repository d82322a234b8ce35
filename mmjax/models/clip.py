"""CLIPModel: a ViT image tower and a causal text tower, each pooled and projected into one
embedding space; logits are scaled cosine similarities. Also `encode`, the entry point of the
encoder families (clip, bert), which have no decoder and so no mmjax.generate.

    model = mmjax.load("clip-flax/")
    out = encode(model, input_ids=ids, attention_mask=mask, pixel_values=px)
    out["logits_per_image"]  # [I, B]; also logits_per_text [B, I], text_embeds [B, E], image_embeds [I, E]

Axis legend: B texts, I images, T tokens, D tower width (Dv vision, Dt text), E projection dim,
C channels.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import ClipVisionConfig, ConfigBase
from mmjax.errors import InputError
from mmjax.layers.linear import Einsum
from mmjax.layers.norms import LayerNorm
from mmjax.models.base import param_shapes
from mmjax.registry import Family, register
from mmjax.text.clip_text import ClipText, ClipTextConfig
from mmjax.vision.clip import ClipVision

__all__ = ["ClipConfig", "Clip", "FAMILY", "encode", "check_token_inputs", "ENCODER_INPUTS"]

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


@dataclasses.dataclass(frozen=True)
class ClipConfig(ConfigBase):
    vision: ClipVisionConfig
    text: ClipTextConfig
    projection_dim: int = 512  # E

    @classmethod
    def from_hf(cls, hf: dict) -> "ClipConfig":
        return cls(vision=ClipVisionConfig.from_hf(hf["vision_config"]),
                   text=ClipTextConfig.from_hf(hf["text_config"]),
                   projection_dim=hf.get("projection_dim", 512))


def l2_normalize(x):  # [..., E]
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class Clip(nn.Module):
    cfg: ClipConfig
    dtype: jnp.dtype = jnp.float32

    # What `encode` may pass: arrays (by HF name) and static options of __call__.
    encoder_inputs = ("input_ids", "attention_mask", "pixel_values")
    encoder_options = ("normalize",)

    def setup(self):
        c = self.cfg
        E = c.projection_dim
        self.vision = ClipVision(c.vision, c.vision.num_layers, self.dtype)
        # HF's vision post_layernorm acts on the pooled class token only. ClipVision does not
        # own it: LLaVA reads raw hidden states, which never pass through it.
        self.vision_post_norm = LayerNorm(c.vision.layer_norm_eps, self.dtype)
        self.text = ClipText(c.text, self.dtype)
        self.visual_projection = Einsum((c.vision.hidden_size, E), "ID,DE->IE", None, self.dtype,
                                        kernels=c.vision.kernels)
        self.text_projection = Einsum((c.text.hidden_size, E), "BD,DE->BE", None, self.dtype, kernels=c.text.kernels)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.dtype)

    def image_embeds(self, pixel_values, normalize: bool = True):
        """pixel_values [I, C, Hi, Wi] -> [I, E]; normalize=False is HF get_image_features."""
        hidden = self.vision(pixel_values)[-1]  # [I, P+1, Dv]
        e = self.visual_projection(self.vision_post_norm(hidden[:, 0]))
        return l2_normalize(e) if normalize else e

    def text_embeds(self, input_ids, attention_mask=None, normalize: bool = True):
        """input_ids [B, T] -> [B, E]; normalize=False is HF get_text_features."""
        _, pooled = self.text(input_ids, attention_mask)
        e = self.text_projection(pooled)
        return l2_normalize(e) if normalize else e

    def __call__(self, batch, normalize: bool = True):
        """Either tower or both: text_embeds [B, E] if input_ids, image_embeds [I, E] if
        pixel_values, and with both logits_per_text [B, I] and logits_per_image [I, B]."""
        out = {}
        if batch.get("pixel_values") is not None:
            out["image_embeds"] = self.image_embeds(batch["pixel_values"], normalize)
        if batch.get("input_ids") is not None:
            out["text_embeds"] = self.text_embeds(batch["input_ids"], batch.get("attention_mask"), normalize)
        if len(out) == 2:
            img, txt = out["image_embeds"], out["text_embeds"]
            if not normalize:
                img, txt = l2_normalize(img), l2_normalize(txt)
            logits = jnp.exp(self.logit_scale) * jnp.einsum("BE,IE->BI", txt, img)
            out["logits_per_text"], out["logits_per_image"] = logits, logits.T
        return out

    def example_batch(self):
        v = self.cfg.vision
        return {"input_ids": np.zeros((1, 2), np.int32),
                "pixel_values": np.zeros((1, v.num_channels, v.image_size, v.image_size), np.float32)}

    def param_shapes(self):
        return param_shapes(self)


# ----------------------------------------------------------------------------- encode


@functools.partial(jax.jit, static_argnames=("module", "options"))
def _run(params, batch, *, module, options):
    # On a mesh the module's KernelPolicy has no CPU custom calls (mmjax.load).
    return module.apply({"params": params}, batch, **dict(options))


def encode(model, **inputs) -> dict[str, np.ndarray]:
    """Run an encoder family (clip, bert) loaded with mmjax.load on HF-named arrays.

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
    if model.family.check_inputs is not None:
        model.family.check_inputs(model.config, batch)
    arrays = {k: jnp.asarray(v, model.dtype if k == "pixel_values" else jnp.int32) for k, v in batch.items()}
    out = _run(model.params, arrays, module=module, options=tuple(sorted(options.items())))
    return {k: np.asarray(v) for k, v in out.items()}


def check_token_inputs(batch, vocab_size: int, max_positions: int, type_vocab_size: int | None = None) -> None:
    """Host-side: shapes agree and ids are in range (jnp.take would clamp them silently)."""
    if "input_ids" not in batch:
        if any(k in batch for k in ("attention_mask", "token_type_ids")):
            raise InputError("attention_mask / token_type_ids given without input_ids")
        return
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise InputError(f"input_ids: expected [B, T], got shape {ids.shape}")
    if ids.shape[1] > max_positions:
        raise InputError(f"input_ids: {ids.shape[1]} tokens exceed max_position_embeddings={max_positions}")
    ranges = {"input_ids": vocab_size, "attention_mask": 2, "token_type_ids": type_vocab_size}
    for name, hi in ranges.items():
        if name not in batch:
            continue
        a = np.asarray(batch[name])
        if a.shape != ids.shape:
            raise InputError(f"{name}: expected shape {ids.shape} (as input_ids), got {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= hi):
            raise InputError(f"{name}: values must lie in [0, {hi}), got {a.min()}..{a.max()}")


def _check_inputs(cfg: ClipConfig, batch) -> None:
    check_token_inputs(batch, cfg.text.vocab_size, cfg.text.max_position_embeddings)
    px = batch.get("pixel_values")
    v = cfg.vision
    want = (v.num_channels, v.image_size, v.image_size)
    if px is not None and (np.ndim(px) != 4 or tuple(np.shape(px)[1:]) != want):
        raise InputError(f"pixel_values: expected [I, {', '.join(map(str, want))}], got shape {np.shape(px)}")


def _rules(cfg):
    from converters.families.clip import clip_rules

    return clip_rules(cfg)


FAMILY = register(Family(
    name="clip",
    config_from_hf=ClipConfig.from_hf,
    config_cls=ClipConfig,
    build=lambda cfg, dtype=jnp.float32: Clip(cfg, dtype),
    rules=_rules,
    processor=None,  # encoders take HF-tokenized arrays (see docs/text_encoders.md)
    check_inputs=_check_inputs,
))
