"""Qwen2-VL / Qwen2.5-VL vision tower: native-resolution ViT over packed patches.

Axis legend: P patches of the call (all images concatenated, padded to a patch bucket),
U = P / m^2 merge units (m = spatial_merge_size; one unit becomes one LLM token),
C channels, t/h/w temporal/height/width pixels inside one patch, D vision width,
F MLP hidden, N heads, H head dim, O output (decoder) width.

Both variants are one module; what differs is data in the config:
  Qwen2-VL:   LayerNorm blocks, fc1/act/fc2 MLP (quick_gelu), every block attends within its image.
  Qwen2.5-VL: RMSNorm blocks, SwiGLU MLP with biases; blocks outside fullatt_block_indexes attend
              within windows of window_size pixels (window_size / patch / m units a side).

Images are packed into one sequence and attention is block-diagonal through segment ids (one per
image frame; -1 marks bucket padding, which sees nothing and is dropped after the merger). The
per-patch index arrays that HF computes from grid_thw inside the model (rotary positions,
cu_seqlens, window index) are built on the host by `vision_inputs`, so the jitted program only
depends on the patch bucket.

Window attention (Qwen2.5-VL): HF reorders merge units so each window is contiguous, runs the blocks,
and undoes the order after the merger. Attention with segment ids is permutation-equivariant, so
the reorder is not needed for correctness; it is kept because it makes every window a contiguous
key range and it reproduces HF's summation order. Windows never split a merge unit, so the merger
sees the same 2x2 groups.

Segments are therefore contiguous runs by construction (images are concatenated, windows made
contiguous by the reorder, bucket padding is one trailing run of -1; `vision_inputs` checks it),
and the attention says so (`MaskSpec(contiguous_segments=True)`): every kernel then works per
image / per window, cost Σ segment² instead of P² (docs/kernels.md, "Packed segments"). Windowed
blocks also give the static bound on a window's length in patches (`max_segment_length`), which
sizes the XLA path's key windows; a full-attention block's only static bound is the bucket.

Param tree: patch_embed [t, h, w, C, D] (torch Conv3d OIDHW -> DHWIO); layers_{i}/{norm1,
attn/{q,k,v: [D, N, H] (+bias [N, H]), o: [N, H, D] (+bias [D])}, norm2, mlp/{fc1,fc2} |
mlp/{gate,up,down}}; merger/{norm, mlp/{fc1 [m^2 D, m^2 D], fc2 [m^2 D, O]}}. HF's fused qkv is
split by the converter (transforms.split_qkv), so the attention kernels stay per head.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigBase, RopeConfig
from mmjax.kernels.attention import MaskSpec, attention
from mmjax.kernels.policy import KernelPolicy
from mmjax.layers.linear import Einsum
from mmjax.layers.mlp import MLP, GatedMLP
from mmjax.layers.norms import make_norm
from mmjax.layers.rope import apply_rope, inv_frequencies

__all__ = ["Qwen2VLVisionConfig", "Qwen2VLVision", "vision_inputs", "window_order", "VISION_KEYS"]

# Batch keys the tower reads besides pixel_values (all built by vision_inputs).
VISION_KEYS = ("vision_positions", "vision_segments", "window_segments", "window_index", "window_inverse")


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig(ConfigBase):
    hidden_size: int  # D, the tower width
    intermediate_size: int  # F, MLP hidden width
    num_layers: int  # transformer blocks
    num_heads: int  # N, attention heads
    out_hidden_size: int  # O, the decoder width
    patch_size: int = 14  # patch side in pixels
    temporal_patch_size: int = 2  # frames per patch (an image is repeated to fill them)
    spatial_merge_size: int = 2  # m, the merger folds m x m patches into one decoder token
    in_channels: int = 3  # C, input channels
    hidden_act: str = "quick_gelu"  # MLP activation (mmjax.layers.activations names)
    norm: str = "layernorm"  # layernorm (Qwen2-VL) | rmsnorm (Qwen2.5-VL)
    gated_mlp: bool = False  # SwiGLU blocks (Qwen2.5-VL)
    window_size: int | None = None  # pixels; None = every block attends within its image
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks that attend within the whole image despite window_size
    rope_theta: float = 10000.0  # frequency base of the 2-D rotary positions
    norm_eps: float = 1e-6  # epsilon of every norm
    kernels: KernelPolicy = KernelPolicy()  # kernel choice per platform (docs/kernels.md, "Kernel policy")

    @classmethod
    def from_hf_qwen2_vl(cls, v: dict, out_hidden_size: int) -> "Qwen2VLVisionConfig":
        width = v.get("embed_dim", 1280)
        return cls(
            hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4)),
            num_layers=v.get("depth", 32), num_heads=v.get("num_heads", 16),
            out_hidden_size=v.get("hidden_size", out_hidden_size), **_common(v, "quick_gelu"),
        )

    @classmethod
    def from_hf_qwen2_5_vl(cls, v: dict, out_hidden_size: int) -> "Qwen2VLVisionConfig":
        return cls(
            hidden_size=v.get("hidden_size", 3584), intermediate_size=v.get("intermediate_size", 3420),
            num_layers=v.get("depth", 32), num_heads=v.get("num_heads", 16),
            out_hidden_size=v.get("out_hidden_size", out_hidden_size), **_common(v, "silu"),
            norm="rmsnorm", gated_mlp=True, window_size=int(v.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def width(self) -> int:  # what follows the tower reads: the merger's output, in the decoder width
        return self.out_hidden_size

    @property
    def num_features(self) -> None:  # varies with each image's size (native resolution)
        return None

    @property
    def patch_dim(self) -> int:
        """Values in one pixel_values row: C * t * ps * ps (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_units(self) -> int | None:
        """Window side in merge units (HF's vit_merger_window_size)."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size


def _common(v: dict, act: str) -> dict:
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(v.get(key), (list, tuple)):
            raise ValueError(f"vision_config.{key}={v[key]!r}: only a single int is supported")
    rope = v.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision_config.rope_parameters.rope_type {rope['rope_type']!r} is not 'axial'")
    return dict(
        patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3),
        hidden_act=v.get("hidden_act", act), rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


# ---------------------------------------------------------------- host side: index arrays

def window_order(cfg: Qwen2VLVisionConfig, grid_thw) -> tuple[np.ndarray, np.ndarray]:
    """HF get_vision_window_index without padding tricks: (unit order [U], window id per unit in
    ORIGINAL unit order [U]). Windows run over (frame, window row, window col), units inside a
    window in raster order; ids are distinct across images."""
    ws = cfg.window_units
    m = cfg.spatial_merge_size
    order, wid, base_unit, base_win = [], [], 0, 0
    for t, gh, gw in np.asarray(grid_thw).tolist():
        lh, lw = gh // m, gw // m
        f, r, c = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        f, r, c = f.ravel(), r.ravel(), c.ravel()
        nh, nw = -(-lh // ws), -(-lw // ws)
        win = (f * nh + r // ws) * nw + c // ws
        # lexsort: last key is the primary one -> (window, row in window, col in window)
        order.append(np.lexsort((c % ws, r % ws, win)) + base_unit)
        wid.append(win + base_win)
        base_unit += t * lh * lw
        base_win += t * nh * nw
    return np.concatenate(order), np.concatenate(wid)


def vision_inputs(cfg: Qwen2VLVisionConfig, grid_thw, num_patches: int | None = None) -> dict[str, np.ndarray]:
    """grid_thw [I, 3] -> the tower's index arrays for num_patches rows (>= the real count; the
    rest is padding). All int32, all in the patch order of pixel_values:
      vision_positions [P, 2]  (row, col) of each patch in its image (rotary angles)
      vision_segments  [P]     image frame of the patch (HF cu_seqlens), -1 = padding
    and with window attention:
      window_segments  [P]     window of the patch, -1 = padding
      window_index     [U]     unit gather that makes windows contiguous (identity on padding)
      window_inverse   [U]     its inverse (applied to the merged output)."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, mu = cfg.spatial_merge_size, cfg.merge_unit
    real = int(np.prod(grid, axis=1).sum())
    P = real if num_patches is None else int(num_patches)
    if P < real or P % mu:
        raise ValueError(f"num_patches={P}: needs >= {real} patches and a multiple of {mu}")
    pos, seg, frame = [], [], 0
    for t, gh, gw in grid.tolist():
        if gh % m or gw % m:
            raise ValueError(f"image_grid_thw row {(t, gh, gw)}: h and w must be multiples of {m}")
        # patch order (t, h/m, w/m, m, m): merge blocks of neighbouring patches are consecutive
        r = np.arange(gh).reshape(gh // m, 1, m, 1)
        c = np.arange(gw).reshape(1, gw // m, 1, m)
        hw = np.stack(np.broadcast_arrays(r, c), axis=-1).reshape(-1, 2)
        pos.append(np.tile(hw, (t, 1)))
        seg.append(np.repeat(np.arange(t) + frame, gh * gw))
        frame += t
    out = {
        "vision_positions": _pad(np.concatenate(pos), P, 0),
        "vision_segments": _pad(np.concatenate(seg), P, -1),
    }
    if cfg.window_size is not None:
        order, wid = window_order(cfg, grid)
        U, n = P // mu, real // mu
        index = np.concatenate([order, np.arange(n, U)])
        out["window_segments"] = _pad(np.repeat(wid, mu), P, -1)
        out["window_index"] = index.astype(np.int32)
        out["window_inverse"] = np.argsort(index).astype(np.int32)
        if np.bincount(wid).max(initial=0) > cfg.window_units ** 2:
            raise ValueError(f"window_segments: a window holds more than {cfg.window_units ** 2} merge units")
    # The tower attends in window_index order (when windowed): every frame and window must be one run there.
    for name in ("vision_segments", "window_segments"):
        if name in out:
            seg = out[name] if "window_index" not in out else out[name].reshape(-1, mu)[out["window_index"]].ravel()
            _check_contiguous(name, seg)
    return out


def _check_contiguous(name: str, seg: np.ndarray) -> None:
    """Every id >= 0 forms one run (what MaskSpec(contiguous_segments=True) promises the kernels)."""
    starts = seg[np.r_[True, seg[1:] != seg[:-1]]]
    starts = starts[starts >= 0]
    if starts.size != np.unique(starts).size:
        raise ValueError(f"{name}: an id occurs in more than one run; the attention kernels assume one")


def _pad(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    out = np.full((rows,) + a.shape[1:], fill, np.int32)
    out[: a.shape[0]] = a
    return out


# ---------------------------------------------------------------- modules

class VisionAttention(nn.Module):
    cfg: Qwen2VLVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, rope, segments, max_len=None):
        """x [1, P, D]; rope (cos, sin) [1, P, H]; segments [1, P], contiguous runs (images or
        windows, -1 padding); max_len: a static bound on a run's length in patches, or None."""
        D, N, H = self.cfg.hidden_size, self.cfg.num_heads, self.cfg.head_dim
        kw = dict(kernels=self.cfg.kernels)
        q = Einsum((D, N, H), "BTD,DNH->BTNH", (N, H), self.dtype, name="q", **kw)(x)
        k = Einsum((D, N, H), "BTD,DNH->BTNH", (N, H), self.dtype, name="k", **kw)(x)
        v = Einsum((D, N, H), "BTD,DNH->BTNH", (N, H), self.dtype, name="v", **kw)(x)
        # HF rotates vision q/k in float32 whatever the weights' dtype.
        cos, sin = rope
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(self.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(self.dtype)
        mask = MaskSpec(causal=False, q_segment_ids=segments, contiguous_segments=True, max_segment_length=max_len)
        out = attention(q, k, v, mask, **kw)
        return Einsum((N, H, D), "BTNH,NHD->BTD", (D,), self.dtype, name="o", **kw)(out)


class VisionBlock(nn.Module):
    cfg: Qwen2VLVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, rope, segments, max_len=None):  # [1, P, D]
        c = self.cfg
        x = x + VisionAttention(c, self.dtype, name="attn")(make_norm(c.norm, c.norm_eps, self.dtype, "norm1")(x),
                                                           rope, segments, max_len)
        h = make_norm(c.norm, c.norm_eps, self.dtype, "norm2")(x)
        if c.gated_mlp:
            return x + GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, True, self.dtype, c.kernels,
                                name="mlp")(h)
        return x + MLP(c.hidden_size, c.intermediate_size, c.hidden_act, True, None, self.dtype, c.kernels,
                       name="mlp")(h)


class PatchMerger(nn.Module):
    """Norm each patch, concatenate each m x m block (consecutive rows), 2-layer GELU MLP."""

    cfg: Qwen2VLVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [1, P, D] -> [U, O]
        c = self.cfg
        x = make_norm(c.norm, c.norm_eps, self.dtype, "norm")(x)
        x = x.reshape(1, -1, c.merge_unit * c.hidden_size)  # [1, U, m^2 D]
        d = c.merge_unit * c.hidden_size
        return MLP(d, d, "gelu", True, c.out_hidden_size, self.dtype, c.kernels, name="mlp")(x)[0]


class Qwen2VLVision(nn.Module):
    cfg: Qwen2VLVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, vision_positions, vision_segments, window_segments=None,
                 window_index=None, window_inverse=None):
        """pixel_values [P, C*t*ps*ps] (HF rows) + vision_inputs arrays -> merged features [U, O],
        in pixel_values' unit order (image by image); padded units come last and are garbage."""
        c = self.cfg
        ps, tp, C, D = c.patch_size, c.temporal_patch_size, c.in_channels, c.hidden_size
        P = pixel_values.shape[0]
        kernel = self.param("patch_embed", nn.initializers.normal(0.02), (tp, ps, ps, C, D), self.dtype)
        # Conv3d with stride = kernel, as one product. The kernel (small) is put in the rows'
        # (C, t, h, w) order: contracting the rows as "PCthw" made XLA transpose pixel_values, a
        # [P, 1176] copy (77 MB for a 16k-patch bucket) in every call.
        w = kernel.transpose(3, 0, 1, 2, 4).reshape(C * tp * ps * ps, D)  # [C*t*h*w, D]
        x = jnp.einsum("PK,KD->PD", pixel_values.astype(self.dtype), w)

        windowed = c.window_size is not None
        if windowed:  # make each window contiguous (see the module docstring)
            x, vision_positions, vision_segments, window_segments = (
                _units(a, window_index, c.merge_unit) for a in (x, vision_positions, vision_segments, window_segments))

        inv = jnp.asarray(inv_frequencies(RopeConfig(theta=c.rope_theta), c.head_dim // 2))  # [H/4]
        ang = vision_positions.astype(jnp.float32)[:, :, None] * inv  # [P, 2, H/4]: row, col angles
        ang = ang.reshape(P, -1)  # [P, H/2] = (row angles | col angles)
        emb = jnp.concatenate([ang, ang], axis=-1)[None]  # [1, P, H]
        rope = (jnp.cos(emb), jnp.sin(emb))

        x = x[None]  # [1, P, D]: one packed sequence
        full, local = vision_segments[None], (window_segments[None] if windowed else None)
        window_len = c.window_units ** 2 * c.merge_unit if windowed else None  # patches in a window
        for i in range(c.num_layers):
            in_windows = windowed and i not in c.fullatt_block_indexes
            seg, max_len = (local, window_len) if in_windows else (full, None)
            x = VisionBlock(c, self.dtype, name=f"layers_{i}")(x, rope, seg, max_len)
            self.sow("intermediates", "hidden_states", x)  # a tuple, one entry per block
        out = PatchMerger(c, self.dtype, name="merger")(x)  # [U, O]
        if windowed:
            out = jnp.take(out, window_inverse, axis=0)
        return out


def _units(a, index, unit: int):
    """Gather whole merge units: a [P, ...] -> a with unit u replaced by unit index[u]."""
    shape = a.shape
    return jnp.take(a.reshape((shape[0] // unit, unit) + shape[1:]), index, axis=0).reshape(shape)
