"""Torch parts that no mmjax component covers, written the way research code writes them; the
auto-port tests (tests/test_autoport*.py) port each and compare with torch.

  LatentResampler    perceiver resampler WITHOUT a feed-forward: latents cross-attend to
                     [media; latents] and carry a residual (nn.ModuleDict layers, chunked kv)
  ConvStem           two strided convs, each GroupNorm + SiLU, flattened to tokens
  GatedCrossAttention  Flamingo's block: tanh-gated nn.MultiheadAttention to media (kdim != dim)
                     and a tanh-gated feed-forward
  AttentionPool      one learned query attends over the patches, a key padding mask via
                     masked_fill, einsum products, then an MLP with a residual
  EinsumViTBlock     pre-LN ViT block: q/k/v from one einsum against a [3, N, H, D] weight,
                     F.scaled_dot_product_attention, output einsum, optional layer scale
  Tower              patch conv (no bias), learned positions, EinsumViTBlocks with layer scale,
                     final RMSNorm
  TowerVLM           AcmeVLM (tests/custom_vlm) with Tower as its vision tower; its mmjax port
                     is tests/autoport_vlm.py
  OpZoo              many table entries at once (pooling, interpolation, pads, indexing, ...)
  GridSampleHead     uses F.grid_sample, which the op table does not have
  FFTTower           Tower reading torch.fft.fft2 first (no lowering either)
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from tests.autoport_vlm import TOWER_KWARGS
from tests.custom_vlm.torch_model import ACME_CONFIG, AcmeVLM


class LatentResampler(nn.Module):
    def __init__(self, dim=32, latents=6, depth=2, heads=4, out=48):
        super().__init__()
        self.heads = heads
        self.latents = nn.Parameter(torch.randn(latents, dim))
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm_media": nn.LayerNorm(dim), "norm_latents": nn.LayerNorm(dim),
            "to_q": nn.Linear(dim, dim, bias=False), "to_kv": nn.Linear(dim, 2 * dim, bias=False),
            "to_out": nn.Linear(dim, dim)}) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out)

    def forward(self, media):  # [B, P, D] -> [B, Q, out]
        x = self.latents.unsqueeze(0).repeat(media.shape[0], 1, 1)
        for layer in self.layers:
            m, lat = layer["norm_media"](media), layer["norm_latents"](x)
            q = layer["to_q"](lat)
            k, v = layer["to_kv"](torch.cat([m, lat], dim=1)).chunk(2, dim=-1)
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, N, T, H]
            att = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
            x = x + layer["to_out"]((att @ v).transpose(1, 2).flatten(2))  # no feed-forward: latents residual only
        return self.proj(self.norm(x))


class ConvStem(nn.Module):
    def __init__(self, channels=3, width=32, groups=8):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width // 2, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(groups // 2, width // 2)
        self.conv2 = nn.Conv2d(width // 2, width, 3, stride=2, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, width)
        self.act = nn.SiLU()

    def forward(self, x):  # [B, C, H, W] -> [B, ceil(H/4) * ceil(W/4), width]
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        return x.flatten(2).transpose(1, 2)


class GatedCrossAttention(nn.Module):
    def __init__(self, dim=32, media_dim=24, heads=4, ff=64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=media_dim, vdim=media_dim, batch_first=True)
        self.attn_gate = nn.Parameter(torch.tensor([0.5]))  # Flamingo starts these at 0
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))
        self.ff_gate = nn.Parameter(torch.tensor([-0.3]))

    def forward(self, x, media):  # x [B, T, D], media [B, P, Dm] -> [B, T, D]
        a, _ = self.attn(self.norm(x), media, media, need_weights=False)
        x = x + self.attn_gate.tanh() * a
        return x + self.ff_gate.tanh() * self.ff(x)


class AttentionPool(nn.Module):
    def __init__(self, dim=32, heads=4, mlp=64):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, dim))
        self.q, self.kv, self.o = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, dim))

    def forward(self, x, mask):  # x [B, P, D], mask [B, P] bool (True = a real patch) -> [B, D]
        B, P, D = x.shape
        H = D // self.heads
        q = self.q(self.probe).view(self.heads, H)
        k, v = self.kv(x).view(B, P, 2, self.heads, H).unbind(2)
        logits = torch.einsum("nh,bpnh->bnp", q, k) * H ** -0.5
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        h = self.o(torch.einsum("bnp,bpnh->bnh", logits.softmax(-1), v).reshape(B, D))
        return h + self.mlp(self.norm(h))


class EinsumViTBlock(nn.Module):
    def __init__(self, dim=32, heads=4, mlp=64, layer_scale=None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.wqkv = nn.Parameter(torch.randn(3, heads, dim // heads, dim) * dim ** -0.5)  # [3, N, H, D]
        self.wo = nn.Parameter(torch.randn(dim, heads, dim // heads) * dim ** -0.5)  # [D, N, H]
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.gamma = None if layer_scale is None else nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x):  # [B, P, D]
        h = self.norm1(x)
        q, k, v = torch.einsum("bpd,cnhd->cbnph", h, self.wqkv).unbind(0)  # each [B, N, P, H]
        a = torch.einsum("bnph,dnh->bpd", F.scaled_dot_product_attention(q, k, v), self.wo)
        x = x + (a if self.gamma is None else self.gamma * a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Tower(nn.Module):
    def __init__(self, width=32, depth=2, heads=4, mlp=64, patch=8, image_size=32, channels=3):
        super().__init__()
        self.patch = nn.Conv2d(channels, width, patch, stride=patch, bias=False)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, width) * 0.1)
        self.blocks = nn.ModuleList(EinsumViTBlock(width, heads, mlp, layer_scale=0.5) for _ in range(depth))
        self.norm = nn.RMSNorm(width, eps=1e-6)

    def forward(self, pixels):  # [B, C, S, S] -> [B, P, width]
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TowerVLM(AcmeVLM):
    def __init__(self, c=ACME_CONFIG):
        super().__init__(c)
        self.vis = Tower(**TOWER_KWARGS)


def build_tower_vlm(seed: int = 0) -> TowerVLM:
    torch.manual_seed(seed)
    return randomize(TowerVLM(), seed)


class OpZoo(nn.Module):
    """x [B, 4, H, W] float, idx [B, K] int64 (values < B) -> a tuple covering many table ops."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.dw = nn.Conv1d(4, 4, 3, padding=2, dilation=2, groups=4)
        self.register_buffer("freqs", torch.arange(4.0) / 4, persistent=False)

    def forward(self, x, idx):
        B, C, H, W = x.shape
        flat = x.flatten(2)  # [B, C, H*W]
        shifted = x[:, :, 1:].clone()
        shifted[:, 0] = 0.0  # select_scatter
        counts = torch.zeros(B, 10).scatter_add(1, idx, torch.ones(idx.shape))
        return (
            F.interpolate(x, scale_factor=2, mode="nearest"),
            F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=False),
            F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
            F.pad(x, (1, 2, 0, 1), value=0.5), F.pad(x, (2, 2, 1, 1), mode="reflect"),
            F.pad(x, (1, 1, 1, 1), mode="replicate"),
            self.bn(x), self.up(x), self.dw(flat),
            F.avg_pool2d(x, 2), F.max_pool2d(x, 2), F.adaptive_avg_pool2d(x, 1),
            flat.cumsum(-1), torch.gather(flat, 2, idx[:, None, :].expand(-1, C, -1)),
            self.emb(idx) * self.freqs, torch.arange(W, dtype=torch.float32) * 0.5,
            torch.stack([x.mean((2, 3)), x.amax((2, 3)), x.var((2, 3)), x.std(-1).sum(-1),
                         x.logsumexp(-1).min(-1).values], -1),
            torch.where(x > 0, x, x.exp() - 1).clamp(-0.5, 0.5), x.abs().sqrt().rsqrt(),
            x[:, 1:3, ::2].flip(-1).roll(1, -1), flat[idx[0]], F.log_softmax(x, 1).argmax(1),
            torch.tril(torch.ones(W, W)) @ x.transpose(-1, -2).reshape(B * C, W, H),
            F.hardswish(x) + F.leaky_relu(x) + F.relu6(x) + F.softplus(x) + torch.erf(x) + F.mish(x) + F.elu(x),
            x.to(torch.bfloat16).float() + x.sin() * x.cos() + x.pow(2) + torch.sigmoid(x) + F.silu(x),
            torch.linalg.vector_norm(x, dim=-1), x.topk(2, dim=-1).values, x.sort(dim=-1, descending=True).values,
            shifted, counts, (x > 0.5).any(-1) & (x < 2).all(-1), torch.div(flat, 0.7, rounding_mode="floor"),
            torch.cat(torch.chunk(x, 2, dim=1)[::-1], dim=1) % 0.3,
            # x as [B, N=4, L=H, E=W] for the attention variants that take the reference path
            F.scaled_dot_product_attention(x, x, x, is_causal=True),
            F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(H, H, dtype=torch.bool).tril()),
            F.scaled_dot_product_attention(x, x, x, attn_mask=x[:, :1, :, :1] * x[:, :1, :, :1].transpose(-1, -2)),
            F.scaled_dot_product_attention(x, x[:, :2], x[:, :2], enable_gqa=True),
            torch.cdist(flat, flat), F.instance_norm(x), F.max_pool2d(x[:, :, :4, :4], 3, 2, ceil_mode=True),
            torch.diagonal(x, dim1=-2, dim2=-1), torch.special.erfc(x), torch.var_mean(x, dim=1)[0],
            torch.bucketize(x, torch.tensor([-1.0, 0.0, 1.0])), F.unfold(x, 2, stride=2), F.pixel_shuffle(x, 2),
        )


class GridSampleHead(nn.Module):
    """F.grid_sample (aten.grid_sampler_2d) has no lowering: porting this must fail by name."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, grid):  # x [B, C, H, W], grid [B, h, w, 2]
        sampled = F.grid_sample(x, grid, align_corners=False)
        return self.proj(sampled.flatten(2).transpose(1, 2))


def randomize(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Weights drawn wider than a fresh init, norms' scales around 1, biases small: so a tiny
    random model's outputs are well separated. Returns the module in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return module.eval()


class FFTTower(Tower):
    """Tower's parameters, but a forward that reads an FFT (no lowering): for the converter's
    refusal test, where the checkpoint's tensors must load into the module first."""

    def forward(self, pixels):
        return super().forward(torch.fft.fft2(pixels).real)
