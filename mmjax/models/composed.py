"""A VLM composed from registered components (mmjax.components), described as data.

    cfg = ComposedConfig.from_spec({
        "vision": {"type": "vit", "hidden_size": 64, ...},
        "projector": {"type": "resampler", "dim": 64, "num_queries": 8, ...},
        "decoder": {"type": "neox", "vocab_size": 512, ...},
        "fusion": "prefix",            # or "tokens"
        "image_token_id": 4,
    })
    module = ComposedVLM(cfg)        # implements the VLM protocol of mmjax.models.base

This is the one door for every VLM: the built-in families (llava: clip + mlp + llama, tokens;
qwen2_vl: qwen2vl + identity + llama with M-RoPE, tokens) are specs like a user's own.

Fusion (how images join the text):
  "prefix"  each row's image (pixel_values[b]) fills the first Q positions of the sequence; the
            processor reserves them with Q copies of image_token_id. prefix_attention
            "bidirectional" makes those Q positions attend to each other (prefix-LM).
  "tokens"  features (row-major over images) replace the image_token_id positions in order
            (LLaVA, Qwen2-VL).
Positions: batch["position_ids"] ([B, T], or [3, B, T] for M-RoPE) when the family's prepare
step built them, else 0..T-1; batch["rope_deltas"] [B] is what decode adds to a cache index.
batch["image_features"] (what image_features returned for the same images) replaces the pixels:
the serving engine encodes an image once and keeps its features (mmjax.serving.encoder_cache).

Axis legend: B rows, I images, T tokens, Q tokens per image, U packed image tokens,
D decoder dim, V vocab.
Param tree: vision/..., projector/..., decoder/... (each component's own tree).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.components import KINDS, get_component
from mmjax.config import ConfigBase
from mmjax.kernels.attention import MaskSpec
from mmjax.models.base import merge_at_tokens, param_shapes, prefill_logits
from mmjax.quantization import QuantConfig

__all__ = ["ComposedConfig", "ComposedVLM", "FUSIONS"]

FUSIONS = ("prefix", "tokens")


@dataclasses.dataclass(frozen=True)
class ComposedConfig(ConfigBase):
    vision_type: str  # the vision component's registered name
    vision: Any  # the vision component's config
    projector_type: str  # the projector's registered name
    projector: Any  # the projector's config
    decoder_type: str  # the decoder's registered name
    decoder: Any  # the decoder's config
    fusion: str = "prefix"  # prefix: image b fills row b's first Q positions | tokens: features replace image tokens
    image_token_id: int = 0  # the id that marks image positions in input_ids
    prefix_attention: str = "causal"  # causal | bidirectional (prefix-LM; fusion "prefix" only)
    # int8 weights: which kernels, as data (mmjax/quantization.py); None = every kernel in the model dtype
    quant: QuantConfig | None = None

    def __post_init__(self):
        if isinstance(self.quant, dict):  # from mmjax_config.json or a spec
            object.__setattr__(self, "quant", QuantConfig.from_dict(self.quant))
        for kind in KINDS:
            comp = get_component(kind, getattr(self, f"{kind}_type"))
            if not isinstance(getattr(self, kind), comp.config_cls):
                raise ValueError(f"ComposedConfig.{kind}: a {comp.config_cls.__name__} is needed for "
                                 f"{kind} type {comp.name!r}, got {type(getattr(self, kind)).__name__}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"ComposedConfig.fusion {self.fusion!r} is not one of {', '.join(FUSIONS)}")
        if self.prefix_attention not in ("causal", "bidirectional"):
            raise ValueError(f"ComposedConfig.prefix_attention {self.prefix_attention!r} is not "
                             "'causal' or 'bidirectional'")
        if self.prefix_attention == "bidirectional" and self.fusion != "prefix":
            raise ValueError("ComposedConfig: prefix_attention='bidirectional' needs fusion='prefix'")
        if self.fusion == "prefix" and self.image_seq_length is None:
            raise ValueError("ComposedConfig: fusion='prefix' needs a fixed number of tokens per image")
        p, v, d = self.projector, self.vision, self.decoder
        if p.in_features != v.width:
            raise ValueError(f"ComposedConfig: projector.in_features {p.in_features} != vision width {v.width}")
        if p.out_features != d.hidden_size:
            raise ValueError(f"ComposedConfig: projector.out_features {p.out_features} != decoder.hidden_size "
                             f"{d.hidden_size}")

    # ---- the data form: {"vision": {"type": ..., **fields}, ...}
    @classmethod
    def from_spec(cls, spec: dict, **extra) -> "ComposedConfig":
        """Build from the data description (see the module docstring). The projector's
        in_features / out_features default to the vision width and the decoder width. `extra`:
        fields of a subclass (a family's own ids)."""
        spec = dict(spec)
        missing = [k for k in KINDS if not isinstance(spec.get(k), dict) or "type" not in spec[k]]
        if missing:
            raise ValueError(f"model spec: {', '.join(missing)} must be a dict with a 'type' (e.g. "
                             f"{{'type': 'vit', ...}})")
        parts = {}
        for kind in ("vision", "decoder", "projector"):
            fields = dict(spec.pop(kind))
            name = fields.pop("type")
            if kind == "projector":
                fields.setdefault("in_features", parts["vision"][1].width)
                fields.setdefault("out_features", parts["decoder"][1].hidden_size)
            comp = get_component(kind, name)
            try:
                parts[kind] = (name, comp.config_cls.from_dict(fields))
            except TypeError as e:
                raise ValueError(f"model spec: {kind} {name!r}: {e}") from None
        own = {f.name for f in dataclasses.fields(cls)} - {f"{k}{s}" for k in KINDS for s in ("", "_type")}
        unknown = set(spec) - own
        if unknown:
            raise ValueError(f"model spec: unknown keys {sorted(unknown)}")
        return cls(*[x for k in KINDS for x in parts[k]], **spec, **extra)

    def to_spec(self) -> dict:
        out = {k: {"type": getattr(self, f"{k}_type"), **dataclasses.asdict(getattr(self, k))} for k in KINDS}
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in out
                and not f.name.endswith("_type")}
        return {**out, **rest}

    @classmethod
    def from_dict(cls, d: dict) -> "ComposedConfig":
        """The dataclasses.asdict form (what mmjax_config.json stores), or the data form."""
        if isinstance(d.get("vision"), dict) and "type" in d["vision"]:
            return cls.from_spec(d)
        d = dict(d)
        for kind in KINDS:
            comp = get_component(kind, d[f"{kind}_type"])
            d[kind] = comp.config_cls.from_dict(d[kind])
        return cls(**d)

    # ---- what the rest of mmjax reads
    @property
    def text(self):
        """The decoder config (generation reads text.max_position_embeddings, text.vocab_size)."""
        return self.decoder

    @property
    def image_seq_length(self) -> int | None:
        """Decoder tokens per image (Q); None when it depends on the image (native resolution)."""
        n = self.vision.num_features
        return None if n is None else self.projector.num_tokens(n)


class ComposedVLM(nn.Module):
    cfg: ComposedConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        self.vision = get_component("vision", c.vision_type).module_cls(c.vision, self.dtype)
        self.projector = get_component("projector", c.projector_type).module_cls(c.projector, self.dtype)
        self.decoder = get_component("decoder", c.decoder_type).module_cls(c.decoder, self.dtype)

    def image_features(self, batch):
        """pixel_values (+ the vision component's own inputs) -> features [I, Q, D] (or [U, D])."""
        extra = get_component("vision", self.cfg.vision_type).inputs
        feats = self.vision(batch["pixel_values"], **{k: batch[k] for k in extra if k in batch})
        self.sow("intermediates", "vision_features", feats)
        out = self.projector(feats)
        self.sow("intermediates", "image_features", out)
        return out

    # --- the VLM protocol (mmjax.models.base) -------------------------------------------------
    def embed(self, batch):
        c = self.cfg
        ids = batch["input_ids"]  # [B, T]
        B, T = ids.shape
        x = self.decoder.embed_tokens(ids)  # [B, T, D]
        feats = batch.get("image_features")  # precomputed (the serving engine's encoder cache)
        if feats is None and batch.get("pixel_values") is not None:
            feats = self.image_features(batch)
        if feats is not None:
            feats = feats.astype(x.dtype)  # [I, Q, D] or [U, D]
            if c.fusion == "prefix":
                Q = feats.shape[1]
                # row b takes image b; generation pads images and rows to their own buckets
                feats = feats[:B] if feats.shape[0] >= B else jnp.pad(feats, ((0, B - feats.shape[0]), (0, 0), (0, 0)))
                x = jnp.concatenate([feats, x[:, Q:]], axis=1)
            else:
                x = merge_at_tokens(x, feats.reshape(-1, feats.shape[-1]), ids == c.image_token_id)
        self.sow("intermediates", "decoder_inputs", x)
        positions = batch.get("position_ids")  # [B, T] or [3, B, T] (M-RoPE), from the prepare step
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        deltas = batch.get("rope_deltas")
        return x, positions, (jnp.zeros((B,), jnp.int32) if deltas is None else deltas)

    def embed_tokens(self, ids):
        return self.decoder.embed_tokens(ids)

    def decode(self, x, positions, mask: MaskSpec, cache=None, write_index=None):
        c = self.cfg
        if c.prefix_attention == "bidirectional" and mask.causal:
            # prefix-LM: the image prefix sees itself both ways; text stays causal. Decode steps
            # (positions past the prefix) are unaffected.
            prefix = jnp.full((x.shape[0],), c.image_seq_length, jnp.int32)
            mask = dataclasses.replace(mask, prefix_lengths=prefix)
        return self.decoder(x, positions, mask, cache, write_index)

    def logits(self, h):
        return self.decoder.logits(h)

    def decode_params(self, params: dict) -> dict:
        """The part of `params` that embed_tokens, decode and logits read (mmjax.models.base.decode_params)."""
        return {"decoder": params["decoder"]}

    def __call__(self, batch):
        return prefill_logits(self, batch)

    def example_batch(self):
        c = self.cfg
        comp = get_component("vision", c.vision_type)
        images, n = comp.example(c.vision)
        q = c.projector.num_tokens(n)
        ids = np.zeros((1, q + 2), np.int32)
        ids[0, (0 if c.fusion == "prefix" else 1):][:q] = c.image_token_id
        return {"input_ids": ids, **images}

    def param_shapes(self):
        """Flat {"a/b/kernel": ShapeDtypeStruct}, allocating nothing (what the converter reads)."""
        return param_shapes(self)
