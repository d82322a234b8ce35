"""Qwen2-VL and Qwen2.5-VL: native-resolution vision tower -> 2x2 patch merger -> Qwen2 decoder
with M-RoPE. Image features replace the `<|image_pad|>` token embeddings in order.

Axis legend: B batch rows, T tokens, I images, P patches (all images of a call, padded to a
patch bucket), U = P / m^2 merged tokens, D decoder width, V vocab.

Positions: text tokens advance one position on all three M-RoPE axes (t, h, w); an image of
llm grid (t, h', w') = (t, h/m, w/m) gets (start + t_i, start + row, start + col) and moves the
next position on by max(h', w'), so a sequence's last position is usually below its length. The
difference (rope delta, per row) is what decode adds to a token's cache index:
`mrope_positions` builds both on the host, exactly as HF's get_rope_index.

Host-built batch keys (Family.pad_inputs; also what mmjax.forward uses, at exact sizes):
  position_ids [3, B, T], rope_deltas [B], pixel_values [P, C*t*ps*ps] and the tower's index
  arrays (mmjax.vision.qwen2vl.vision_inputs). Nothing in the jitted program depends on
  image_grid_thw, so one program serves every image layout of a (B, T, P) bucket.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.bucketing import pick
from mmjax.config import ConfigBase, LlamaConfig
from mmjax.decoders.llama import LlamaDecoder
from mmjax.errors import InputError
from mmjax.models.base import merge_at_tokens, param_shapes, prefill_logits
from mmjax.registry import Family, register
from mmjax.sharding.rules import block_rules
from mmjax.vision.qwen2vl import VISION_KEYS, Qwen2VLVision, Qwen2VLVisionConfig, vision_inputs

__all__ = ["Qwen2VLConfig", "Qwen2VL", "mrope_positions", "model_inputs", "FAMILY", "FAMILY_2_5"]


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig(ConfigBase):
    vision: Qwen2VLVisionConfig
    text: LlamaConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    @classmethod
    def from_hf(cls, hf: dict) -> "Qwen2VLConfig":
        kind = hf.get("model_type")
        readers = {"qwen2_vl": Qwen2VLVisionConfig.from_hf_qwen2_vl,
                   "qwen2_5_vl": Qwen2VLVisionConfig.from_hf_qwen2_5_vl}
        if kind not in readers:
            raise ValueError(f"model_type {kind!r} is not qwen2_vl or qwen2_5_vl")
        t = hf.get("text_config") or hf  # transformers 4.4x kept text keys at the top level
        if t.get("use_sliding_window"):
            raise ValueError(f"{kind}: use_sliding_window=True is not supported (no released model uses it)")
        heads = t["num_attention_heads"]
        tie = hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        # Qwen2 attention: biased q/k/v, unbiased o; head dim is always hidden // heads in HF.
        text = LlamaConfig.from_hf(t, tie_word_embeddings=tie, qkv_bias=True, o_bias=False,
                                   head_dim=t["hidden_size"] // heads)
        if text.mrope_section is None:
            raise ValueError(f"{kind}: text_config.rope_parameters has no mrope_section")
        return cls(
            vision=readers[kind](hf.get("vision_config") or {}, text.hidden_size),
            text=text,
            image_token_id=hf.get("image_token_id", 151655),
            video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
        )

    def image_tokens(self, grid_thw) -> np.ndarray:
        """LLM tokens of each image: t * h * w / m^2."""
        return np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=1) // self.vision.merge_unit


class Qwen2VL(nn.Module):
    cfg: Qwen2VLConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.vision = Qwen2VLVision(self.cfg.vision, self.dtype)
        self.decoder = LlamaDecoder(self.cfg.text, self.dtype)

    def image_features(self, batch):
        """pixel_values [P, C*t*ps*ps] + index arrays -> features [U, D] (HF get_image_features)."""
        feats = self.vision(batch["pixel_values"], **{k: batch[k] for k in VISION_KEYS if k in batch})
        self.sow("intermediates", "image_features", feats)
        return feats

    # --- the VLM protocol (mmjax.models.base) -------------------------------------------------
    def embed(self, batch):
        ids = batch["input_ids"]  # [B, T]
        B, T = ids.shape
        x = self.decoder.embed_tokens(ids)  # [B, T, D]
        if batch.get("pixel_values") is not None:
            x = merge_at_tokens(x, self.image_features(batch), ids == self.cfg.image_token_id)
        positions = batch.get("position_ids")  # [3, B, T]; absent = text only, plain positions
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        deltas = batch.get("rope_deltas")
        return x, positions, (jnp.zeros((B,), jnp.int32) if deltas is None else deltas)

    def embed_tokens(self, ids):
        return self.decoder.embed_tokens(ids)

    def decode(self, x, positions, mask, cache=None, write_index=None):
        return self.decoder(x, positions, mask, cache, write_index)

    def logits(self, h):
        return self.decoder.logits(h)

    def __call__(self, batch):
        return prefill_logits(self, batch)

    def example_batch(self):
        """One image of one merge unit (grid 1 x m x m) between two text tokens."""
        c = self.cfg
        m = c.vision.spatial_merge_size
        grid = np.array([[1, m, m]])
        ids = np.array([[c.vision_start_token_id, c.image_token_id, c.vision_end_token_id]], np.int32)
        px = np.zeros((m * m, c.vision.patch_dim), np.float32)
        return {"input_ids": ids, **model_inputs(c, {"input_ids": ids, "pixel_values": px, "image_grid_thw": grid})}

    def cache_shape(self):
        t = self.cfg.text
        return t.num_layers, t.num_kv_heads, t.head_dim

    def param_shapes(self):
        """{"a/b/kernel": ShapeDtypeStruct} (the converter's target shapes), allocating nothing."""
        return param_shapes(self)


# ---------------------------------------------------------------- host side

def mrope_positions(cfg: Qwen2VLConfig, input_ids, attention_mask=None, image_grid_thw=None):
    """HF get_rope_index for images: (position_ids [3, B, T] int32, rope_deltas [B] int32).

    Images are taken in row-major order over the batch, each consuming its t*h*w/m^2 image
    tokens (a run of image tokens may hold several images). Padded positions (mask 0) are 0."""
    ids = np.asarray(input_ids)
    B, T = ids.shape
    mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    m = cfg.vision.spatial_merge_size
    out = np.zeros((3, B, T), np.int32)
    deltas = np.zeros((B,), np.int32)
    k = 0
    for b in range(B):
        row = ids[b][mask[b]]
        is_img = row == cfg.image_token_id
        pos, cur, i = [], 0, 0
        while i < len(row):
            if not is_img[i]:
                j = i + 1
                while j < len(row) and not is_img[j]:
                    j += 1
                pos.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
            else:
                if k >= len(grids):
                    raise InputError(f"row {b}: more image tokens than the {len(grids)} image(s) of image_grid_thw")
                t, h, w = (int(v) for v in grids[k])
                k += 1
                lt, lh, lw = t, h // m, w // m
                j = i + lt * lh * lw
                if j > len(row) or not is_img[i:j].all():
                    raise InputError(f"row {b}: image {k - 1} (grid {(t, h, w)}) needs {lt * lh * lw} consecutive "
                                     f"image tokens at position {i}")
                tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
                pos.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
                cur += max(h, w) // m
            i = j
        if pos:
            p = np.concatenate(pos, axis=1)
            out[:, b, mask[b]] = p
            deltas[b] = p.max() + 1 - len(row)
    if k != len(grids):
        raise InputError(f"image_grid_thw has {len(grids)} image(s) but input_ids hold image tokens for {k}")
    return out, deltas


def model_inputs(cfg: Qwen2VLConfig, inputs: dict, buckets=None, rows: int | None = None,
                 tokens: int | None = None) -> dict:
    """Processor output (HF names) -> the host-built arrays the module reads.

    With buckets (generation) everything is padded: rows/tokens are the batch and prompt
    buckets the caller already chose, patches go up to buckets.patches. buckets=None keeps the
    exact sizes (mmjax.forward). Padding is inert: zero pixels with segment id -1, positions 0."""
    ids = np.asarray(inputs["input_ids"])
    B, T = ids.shape
    Bb, Tb = rows or B, tokens or T
    grid = inputs.get("image_grid_thw")
    pos, deltas = mrope_positions(cfg, ids, inputs.get("attention_mask"), grid)
    out = {"position_ids": np.zeros((3, Bb, Tb), np.int32), "rope_deltas": np.zeros((Bb,), np.int32)}
    out["position_ids"][:, :B, :T] = pos[:, :, :Tb]
    out["position_ids"][:, B:] = np.arange(Tb, dtype=np.int32)  # padding rows: plain positions
    out["rope_deltas"][:B] = deltas
    px = inputs.get("pixel_values")
    if px is not None:
        px = np.asarray(px)
        P = px.shape[0] if buckets is None else pick(px.shape[0], buckets.patches, "number of image patches")
        padded = np.zeros((P, px.shape[1]), px.dtype)
        padded[: px.shape[0]] = px
        out["pixel_values"] = padded
        out.update(vision_inputs(cfg.vision, grid, P))
    return out


def check_inputs(cfg: Qwen2VLConfig, batch) -> None:
    """Host-side: pixel rows, grids and image tokens must agree (HF raises on the same)."""
    ids = np.asarray(batch["input_ids"])
    px, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    if (px is None) != (grid is None):
        raise InputError("pixel_values and image_grid_thw must be given together")
    if np.any(ids == cfg.video_token_id):
        raise InputError(f"input_ids hold video tokens (id {cfg.video_token_id}); videos are not supported")
    found = int((ids == cfg.image_token_id).sum())
    if px is None:
        if found:
            raise InputError(f"input_ids hold {found} image tokens (id {cfg.image_token_id}) but no image was given")
        return
    grid = np.asarray(grid).reshape(-1, 3)
    px_shape = tuple(np.shape(px))
    if len(px_shape) != 2 or px_shape[1] != cfg.vision.patch_dim:
        raise InputError(f"pixel_values: expected [patches, {cfg.vision.patch_dim}], got {px_shape}")
    m = cfg.vision.spatial_merge_size
    if np.any(grid[:, 1:] % m) or np.any(grid <= 0):
        raise InputError(f"image_grid_thw {grid.tolist()}: h and w must be positive multiples of {m}")
    if int(np.prod(grid, axis=1).sum()) != px_shape[0]:
        raise InputError(f"image_grid_thw {grid.tolist()} describes {int(np.prod(grid, axis=1).sum())} patches, "
                         f"pixel_values has {px_shape[0]}")
    want = int(cfg.image_tokens(grid).sum())
    if found != want:
        raise InputError(f"input_ids hold {found} image tokens (id {cfg.image_token_id}) but image_grid_thw "
                         f"{grid.tolist()} gives {want} features")


def _rules(cfg):
    from converters.families.qwen2vl import qwen2vl_rules

    return qwen2vl_rules(cfg)


def _processor(folder, cfg):
    from mmjax.preprocess.qwen2vl import Qwen2VLProcessor

    return Qwen2VLProcessor(folder, cfg)


def _sharding(cfg: Qwen2VLConfig) -> list:
    """Param path regex -> axes in the legend (mmjax.sharding.rules maps letters to mesh axes).

    Decoder and vision blocks: Megatron split (q/k/v and gate/up/fc1 by heads / F columns; o and
    down/fc2 by rows). The merger's fc1/fc2 are split the same way; norms and the patch embedding
    are small and replicated."""
    return [
        (r"decoder/embed/embedding", "VD"),
        (r"decoder/lm_head/kernel", "DV"),
        *block_rules(r"decoder/layers_\d+"),
        *block_rules(r"vision/layers_\d+", kv="N"),  # no GQA in the vision tower
        (r"vision/merger/mlp/fc1/kernel", "DF"),
        (r"vision/merger/mlp/fc1/bias", "F"),
        (r"vision/merger/mlp/fc2/kernel", "FD"),
        (r".*", None),
    ]


def _family(name: str) -> Family:
    return register(Family(
        name=name,
        config_from_hf=Qwen2VLConfig.from_hf,
        config_cls=Qwen2VLConfig,
        build=lambda cfg, dtype=jnp.float32: Qwen2VL(cfg, dtype),
        rules=_rules,
        processor=_processor,
        sharding=_sharding,
        pad_inputs=model_inputs,
        check_inputs=check_inputs,
    ))


FAMILY = _family("qwen2_vl")
FAMILY_2_5 = _family("qwen2_5_vl")
