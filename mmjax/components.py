"""Components by exact name, and a VLM composed from them as data.

    cfg = ComposedConfig.from_spec({
        "vision": {"type": "vit", "hidden_size": 64, ...},
        "projector": {"type": "resampler", "dim": 64, "num_queries": 8, ...},
        "decoder": {"type": "neox", "vocab_size": 512, ...},
        "fusion": "prefix",            # or "tokens"
        "image_token_id": 4,
    })
    module = ComposedVLM(cfg)        # implements the VLM protocol of mmjax.models.base

Three kinds of component, each a (config dataclass, flax module) pair registered by exact name:
  vision     module(pixel_values [I, C, Hi, Wi]) -> features [I, P, Dv]; config has .width (Dv)
             and .num_features (P)
  projector  module(features [I, P, Dv]) -> [I, Q, D]; config has in_features, out_features and
             num_tokens(P) -> Q
  decoder    embed_tokens / __call__(x, positions, mask, cache, write_index) / logits, like
             LlamaDecoder; config has hidden_size, num_layers, kv_heads, dim_per_head,
             max_position_embeddings
A user's own component registers the same way (register_component) and is then usable by name.

Fusion (how images join the text):
  "prefix"  each row's image (pixel_values[b]) fills the first Q positions of the sequence; the
            processor reserves them with Q copies of image_token_id. prefix_attention
            "bidirectional" makes those Q positions attend to each other (prefix-LM).
  "tokens"  features replace the image_token_id positions in order (LLaVA).

Axis legend: B rows, I images, T tokens, Q tokens per image, D decoder dim, V vocab.
Param tree: vision/..., projector/..., decoder/... (each component's own tree).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigBase, LlamaConfig
from mmjax.decoders.llama import LlamaDecoder
from mmjax.decoders.neox import NeoXConfig, NeoXDecoder
from mmjax.errors import InputError
from mmjax.kernels.attention import MaskSpec
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.mlp import MLP
from mmjax.models.base import merge_at_tokens, prefill_logits
from mmjax.preprocess.clip_image import CLIPImageProcessor
from mmjax.preprocess.processor import VLMProcessor
from mmjax.projectors.linear import LinearProjector, LinearProjectorConfig
from mmjax.projectors.pixel_shuffle import PixelShuffleConfig, PixelShuffleProjector
from mmjax.projectors.resampler import PerceiverResampler, ResamplerConfig
from mmjax.vision.vit import ViT, ViTConfig

__all__ = ["Component", "register_component", "get_component", "component_names", "MLPProjectorConfig",
           "ComposedConfig", "ComposedVLM", "composed_family", "check_composed_inputs", "composed_sharding",
           "ComposedProcessor"]

KINDS = ("vision", "projector", "decoder")
FUSIONS = ("prefix", "tokens")


@dataclasses.dataclass(frozen=True)
class Component:
    kind: str
    name: str
    config_cls: type  # a frozen ConfigBase dataclass
    module_cls: type  # flax module taking (cfg, dtype)


_COMPONENTS: dict[tuple[str, str], Component] = {}


def register_component(kind: str, name: str, config_cls: type, module_cls: type) -> Component:
    if kind not in KINDS:
        raise ValueError(f"component kind {kind!r} is not one of {', '.join(KINDS)}")
    comp = Component(kind, name, config_cls, module_cls)
    if _COMPONENTS.get((kind, name), comp) != comp:
        raise ValueError(f"{kind} component {name!r} is already registered")
    _COMPONENTS[(kind, name)] = comp
    return comp


def component_names(kind: str) -> list[str]:
    return sorted(n for k, n in _COMPONENTS if k == kind)


def get_component(kind: str, name: str) -> Component:
    try:
        return _COMPONENTS[(kind, name)]
    except KeyError:
        raise ValueError(f"unknown {kind} component {name!r}; registered: {', '.join(component_names(kind))} "
                         "(mmjax.components.register_component adds one)") from None


@dataclasses.dataclass(frozen=True)
class MLPProjectorConfig(ConfigBase):
    """LLaVA's Linear -> act -> Linear (hidden width = out_features), as a component."""
    in_features: int
    out_features: int
    hidden_act: str = "gelu"
    use_bias: bool = True
    kernels: KernelPolicy = KernelPolicy()  # mmjax/kernels/policy.py

    def num_tokens(self, num_features: int) -> int:
        return num_features


class MLPProjectorComponent(nn.Module):
    cfg: MLPProjectorConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [I, P, Dv] -> [I, P, D]; params mlp/{fc1, fc2} as in LLaVA's projector
        c = self.cfg
        return MLP(c.in_features, c.out_features, c.hidden_act, c.use_bias, c.out_features, self.dtype, c.kernels,
                   name="mlp")(x)


register_component("vision", "vit", ViTConfig, ViT)
register_component("projector", "linear", LinearProjectorConfig, LinearProjector)
register_component("projector", "mlp", MLPProjectorConfig, MLPProjectorComponent)
register_component("projector", "resampler", ResamplerConfig, PerceiverResampler)
register_component("projector", "pixel_shuffle", PixelShuffleConfig, PixelShuffleProjector)
register_component("decoder", "neox", NeoXConfig, NeoXDecoder)
register_component("decoder", "llama", LlamaConfig, LlamaDecoder)


def _kv_heads(dec) -> int:
    return getattr(dec, "kv_heads", None) or dec.num_kv_heads


def _head_dim(dec) -> int:
    return getattr(dec, "dim_per_head", None) or dec.head_dim


@dataclasses.dataclass(frozen=True)
class ComposedConfig(ConfigBase):
    vision_type: str
    vision: Any  # the vision component's config
    projector_type: str
    projector: Any
    decoder_type: str
    decoder: Any
    fusion: str = "prefix"  # prefix | tokens
    image_token_id: int = 0
    prefix_attention: str = "causal"  # causal | bidirectional (prefix-LM; fusion "prefix" only)

    def __post_init__(self):
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
        p, v, d = self.projector, self.vision, self.decoder
        if p.in_features != v.width:
            raise ValueError(f"ComposedConfig: projector.in_features {p.in_features} != vision width {v.width}")
        if p.out_features != d.hidden_size:
            raise ValueError(f"ComposedConfig: projector.out_features {p.out_features} != decoder.hidden_size "
                             f"{d.hidden_size}")

    # ---- the data form: {"vision": {"type": ..., **fields}, ...}
    @classmethod
    def from_spec(cls, spec: dict) -> "ComposedConfig":
        """Build from the data description (see the module docstring). The projector's
        in_features / out_features default to the vision width and the decoder width."""
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
        unknown = set(spec) - {"fusion", "image_token_id", "prefix_attention"}
        if unknown:
            raise ValueError(f"model spec: unknown keys {sorted(unknown)}")
        return cls(*[x for k in KINDS for x in parts[k]], **spec)

    def to_spec(self) -> dict:
        out = {k: {"type": getattr(self, f"{k}_type"), **dataclasses.asdict(getattr(self, k))} for k in KINDS}
        return {**out, "fusion": self.fusion, "image_token_id": self.image_token_id,
                "prefix_attention": self.prefix_attention}

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
        """The decoder config (mmjax.generate reads text.max_position_embeddings)."""
        return self.decoder

    @property
    def image_seq_length(self) -> int:
        """Decoder tokens per image (Q)."""
        return self.projector.num_tokens(self.vision.num_features)


class ComposedVLM(nn.Module):
    cfg: ComposedConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        self.vision = get_component("vision", c.vision_type).module_cls(c.vision, self.dtype)
        self.projector = get_component("projector", c.projector_type).module_cls(c.projector, self.dtype)
        self.decoder = get_component("decoder", c.decoder_type).module_cls(c.decoder, self.dtype)

    def image_features(self, pixel_values):  # [I, C, Hi, Wi] -> [I, Q, D]
        feats = self.vision(pixel_values)
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
        if batch.get("pixel_values") is not None:
            feats = self.image_features(batch["pixel_values"]).astype(x.dtype)  # [I, Q, D]
            if c.fusion == "prefix":
                Q = feats.shape[1]
                # row b takes image b; generation pads images and rows to their own buckets
                feats = feats[:B] if feats.shape[0] >= B else jnp.pad(feats, ((0, B - feats.shape[0]), (0, 0), (0, 0)))
                x = jnp.concatenate([feats, x[:, Q:]], axis=1)
            else:
                x = merge_at_tokens(x, feats.reshape(-1, feats.shape[-1]), ids == c.image_token_id)
        self.sow("intermediates", "decoder_inputs", x)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return x, positions, jnp.zeros((B,), jnp.int32)

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

    def __call__(self, batch):
        return prefill_logits(self, batch)

    def example_batch(self):
        c, v = self.cfg, self.cfg.vision
        q = c.image_seq_length
        ids = np.zeros((1, q + 2), np.int32)
        ids[0, (0 if c.fusion == "prefix" else 1):][:q] = c.image_token_id
        px = np.zeros((1, v.num_channels, v.image_size, v.image_size), np.float32)
        return {"input_ids": ids, "pixel_values": px}

    def param_shapes(self):
        """Flat {"a/b/kernel": ShapeDtypeStruct}, allocating nothing (what the converter reads)."""
        from mmjax.models.base import param_shapes

        return param_shapes(self)

    def cache_shape(self):
        d = self.cfg.decoder
        return d.num_layers, _kv_heads(d), _head_dim(d)


def check_composed_inputs(cfg: ComposedConfig, batch) -> None:
    """Host-side: images and image tokens must agree with the fusion (InputError otherwise)."""
    ids = np.asarray(batch["input_ids"])
    px = batch.get("pixel_values")
    n_img = 0 if px is None else int(np.asarray(px).shape[0])
    q, tid = cfg.image_seq_length, cfg.image_token_id
    marks = ids == tid
    if cfg.fusion == "tokens":
        if int(marks.sum()) != n_img * q:
            raise InputError(f"input_ids hold {int(marks.sum())} image tokens (id {tid}) but {n_img} image(s) give "
                             f"{n_img * q} features ({q} each)")
        return
    if n_img == 0:
        if cfg.prefix_attention == "bidirectional":
            raise InputError("this model attends bidirectionally over an image prefix: every row needs an image")
        if marks.any():
            raise InputError(f"input_ids hold image tokens (id {tid}) but no pixel_values were given")
        return
    if n_img != ids.shape[0]:
        raise InputError(f"prefix fusion takes one image per row: {n_img} image(s) for {ids.shape[0]} row(s)")
    if ids.shape[1] < q or not marks[:, :q].all() or marks[:, q:].any():
        raise InputError(f"prefix fusion: every row must start with exactly {q} image tokens (id {tid}), the "
                         "positions the image features fill (Model.preprocess puts them there)")


def composed_sharding(cfg: ComposedConfig) -> list:
    """Megatron-style rules (mmjax.sharding.rules) for the built-in components; replicate the rest."""
    dec, vis = r"decoder/layers_\d+", r"vision/layers_\d+"
    return [
        (r"decoder/embed/embedding", "VD"),
        (r"decoder/lm_head/kernel", "DV"),
        (rf"({dec}|{vis})/attn/q/kernel", "DNH"),
        (rf"({dec}|{vis})/attn/q/bias", "NH"),
        (rf"({dec}|{vis})/attn/[kv]/kernel", "DKH"),
        (rf"({dec}|{vis})/attn/[kv]/bias", "KH"),
        (rf"({dec}|{vis})/attn/o/kernel", "NHD"),
        (rf"{dec}/mlp/(gate|up)/kernel", "DF"),
        (rf"{dec}/mlp/down/kernel", "FD"),
        (rf"({dec}|{vis})/mlp/fc1/kernel", "DF"),
        (rf"({dec}|{vis})/mlp/fc2/kernel", "FD"),
        (r".*", None),
    ]


class ComposedProcessor(VLMProcessor):
    """Model.preprocess for a composed model: CLIP-style image processing (the folder's
    preprocessor_config.json) and the image tokens its fusion needs."""

    def __init__(self, folder, cfg: ComposedConfig, tokenizer=None):
        super().__init__(folder, tokenizer, CLIPImageProcessor.from_folder(folder))
        self.config = cfg
        tok_id = self.tokenizer.token_to_id(self.image_token)
        if tok_id is not None and tok_id != cfg.image_token_id:
            raise InputError(f"{folder}: tokenizer maps {self.image_token} to {tok_id}, config says "
                             f"image_token_id={cfg.image_token_id}")

    def image_inputs(self, images):
        return {"pixel_values": self.image_processor(images)}, [self.config.image_seq_length] * len(images)

    def expand(self, ids, counts):
        if self.config.fusion == "tokens":
            return super().expand(ids, counts)
        if len(counts) > 1:
            raise InputError(f"prefix fusion takes one image per prompt, got {len(counts)}")
        tid = self.config.image_token_id  # the image goes first, wherever <image> was written
        return [tid] * sum(counts) + [t for t in ids if t != tid]


def composed_family(name: str, config_from_hf, rules, processor=ComposedProcessor):
    """A Family (mmjax.registry) for a composed model; register it with mmjax.registry.register.

    config_from_hf: the checkpoint's config.json dict -> ComposedConfig.
    rules: ComposedConfig -> list of converters.rules.Rule."""
    from mmjax.registry import Family

    return Family(
        name=name,
        config_from_hf=config_from_hf,
        config_cls=ComposedConfig,
        build=lambda cfg, dtype=jnp.float32: ComposedVLM(cfg, dtype),
        rules=rules,
        processor=processor,
        sharding=composed_sharding,
        check_inputs=check_composed_inputs,
    )
