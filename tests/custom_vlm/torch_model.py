"""AcmeVLM: a small PyTorch VLM written the way a research codebase might write it, with its own
tensor names and layouts. It is the "before" of the porting tutorial (docs/custom_models.md);
nothing in it knows about mmjax.

  vision   conv patch stem, class token, learned positions [1, P+1, W], pre-LN blocks with a
           fused qkv Linear (rows q | k | v), exact GELU, final LayerNorm, class token dropped
  bridge   perceiver resampler: Q latents cross-attend to [media; latents] (fused to_kv Linear,
           rows k | v), SwiGLU feed-forward with a fused w12 Linear (rows gate | up)
  decoder  GPT-NeoX-like: LayerNorms with biases, parallel residual, tanh GELU, fused c_attn
           Linear laid out per head (rows [N, 3, H]: q_h | k_h | v_h), rotary on the first
           `rotary_dim` dims of each head with *interleaved* pairs (GPT-J style)
  fusion   the Q image tokens are prepended to the text embeddings; the prefix attends to
           itself bidirectionally, text is causal (prefix-LM)
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

ACME_CONFIG = {
    "model_type": "acme_vlm",
    "image_size": 32, "patch": 8, "vis_width": 32, "vis_depth": 2, "vis_heads": 4, "vis_mlp": 64,
    "n_latents": 6, "rs_depth": 2, "rs_heads": 4, "rs_head_dim": 8, "rs_ffn": 48,
    "vocab": 384, "d_model": 64, "n_layer": 2, "n_head": 4, "d_ff": 128, "rotary_dim": 8,
    "rotary_base": 10000.0, "max_seq": 512, "image_token_id": 4,
}


class VisionAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, P, W = x.shape
        q, k, v = self.qkv(x).view(B, P, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(W // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, P, W))


class VisionBlock(nn.Module):
    def __init__(self, width, heads, mlp):
        super().__init__()
        self.ln_a, self.ln_b = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = VisionAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def forward(self, x):
        x = x + self.attn(self.ln_a(x))
        return x + self.mlp(self.ln_b(x))


class VisionTower(nn.Module):
    def __init__(self, c):
        super().__init__()
        w, n = c["vis_width"], (c["image_size"] // c["patch"]) ** 2
        self.stem = nn.Conv2d(3, w, c["patch"], stride=c["patch"])
        self.cls = nn.Parameter(torch.randn(1, 1, w) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, n + 1, w) * 0.1)
        self.blocks = nn.ModuleList(VisionBlock(w, c["vis_heads"], c["vis_mlp"]) for _ in range(c["vis_depth"]))
        self.ln_out = nn.LayerNorm(w, eps=1e-6)

    def forward(self, pixels):
        x = self.stem(pixels).flatten(2).transpose(1, 2)  # [B, P, W]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.ln_out(x)[:, 1:]


class PerceiverBlock(nn.Module):
    def __init__(self, width, heads, head_dim, ffn):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.ln_media, self.ln_latents, self.ff_ln = (nn.LayerNorm(width) for _ in range(3))
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)
        self.ff_w12 = nn.Linear(width, 2 * ffn, bias=False)
        self.ff_w3 = nn.Linear(ffn, width, bias=False)

    def forward(self, latents, media):
        B, Q, _ = latents.shape
        m, lat = self.ln_media(media), self.ln_latents(latents)
        heads = lambda t: t.view(B, t.shape[1], self.heads, self.head_dim).transpose(1, 2)
        q = heads(self.to_q(lat))
        k, v = (heads(t) for t in self.to_kv(torch.cat([m, lat], dim=1)).chunk(2, dim=-1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        latents = latents + self.to_out((att @ v).transpose(1, 2).reshape(B, Q, -1))
        gate, up = self.ff_w12(self.ff_ln(latents)).chunk(2, dim=-1)
        return latents + self.ff_w3(F.silu(gate) * up)


class Resampler(nn.Module):
    def __init__(self, c):
        super().__init__()
        w = c["vis_width"]
        self.latents = nn.Parameter(torch.randn(c["n_latents"], w) * 0.1)
        self.blocks = nn.ModuleList(PerceiverBlock(w, c["rs_heads"], c["rs_head_dim"], c["rs_ffn"])
                                    for _ in range(c["rs_depth"]))
        self.ln_final = nn.LayerNorm(w)
        self.proj = nn.Linear(w, c["d_model"])

    def forward(self, media):
        lat = self.latents.expand(media.shape[0], -1, -1)
        for blk in self.blocks:
            lat = blk(lat, media)
        return self.proj(self.ln_final(lat))


def rotate_interleaved(x, pos, rotary_dim, base):
    """x [B, N, T, H]: rotate pairs (x0, x1), (x2, x3), ... of the first rotary_dim dims."""
    inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    ang = pos.float()[:, None] * inv[None, :]  # [T, R/2]
    cos, sin = ang.cos(), ang.sin()
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


class DecoderAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.n_head, self.rotary_dim, self.base = c["n_head"], c["rotary_dim"], c["rotary_base"]
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x, allowed):  # allowed [T, T] bool
        B, T, D = x.shape
        H = D // self.n_head
        q, k, v = self.c_attn(x).view(B, T, self.n_head, 3, H).permute(3, 0, 2, 1, 4)  # per-head q|k|v
        pos = torch.arange(T)
        q = rotate_interleaved(q, pos, self.rotary_dim, self.base)
        k = rotate_interleaved(k, pos, self.rotary_dim, self.base)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(H)
        att = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, D))


class DecoderBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.ln_attn, self.ln_mlp = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = DecoderAttention(c)
        self.up, self.down = nn.Linear(d, c["d_ff"]), nn.Linear(c["d_ff"], d)

    def forward(self, x, allowed):
        # parallel residual: attention and MLP both read the block input
        return x + self.down(F.gelu(self.up(self.ln_mlp(x)), approximate="tanh")) + self.attn(self.ln_attn(x), allowed)


class AcmeVLM(nn.Module):
    def __init__(self, c=ACME_CONFIG):
        super().__init__()
        self.config = dict(c)
        self.vis = VisionTower(c)
        self.bridge = Resampler(c)
        self.tok = nn.Embedding(c["vocab"], c["d_model"])
        self.lm = nn.ModuleList(DecoderBlock(c) for _ in range(c["n_layer"]))
        self.ln_f = nn.LayerNorm(c["d_model"])
        self.head = nn.Linear(c["d_model"], c["vocab"], bias=False)
        # kept in the state dict, as some codebases do; the port recomputes it from the config
        r = c["rotary_dim"]
        self.register_buffer("rotary_inv_freq", 1.0 / (c["rotary_base"] ** (torch.arange(0, r, 2).float() / r)))

    def forward(self, pixels, text_ids):
        """pixels [B, 3, S, S], text_ids [B, T] -> logits [B, Q + T, V] (image prefix first)."""
        prefix = self.bridge(self.vis(pixels))  # [B, Q, D]
        x = torch.cat([prefix, self.tok(text_ids)], dim=1)
        n, q = x.shape[1], prefix.shape[1]
        i = torch.arange(n)
        allowed = (i[None, :] <= i[:, None]) | ((i[:, None] < q) & (i[None, :] < q))
        for blk in self.lm:
            x = blk(x, allowed)
        return self.head(self.ln_f(x))


def build_acme(seed=0, std=0.1):
    """A random AcmeVLM in eval mode. Weights are drawn wider than a fresh init (std 0.1) so the
    logits of the tiny model are well separated and greedy decoding is decisive."""
    torch.manual_seed(seed)
    model = AcmeVLM().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            else:  # LayerNorm weights around 1
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def torch_greedy(torch_model, px, ids, eos, n: int = 32) -> list[int]:
    """n greedy tokens from a (pixels, text ids) -> logits model, without a cache (the whole
    sequence again at every step); stop tokens are never eligible (as min_new_tokens=n)."""
    import torch

    ref = []
    with torch.no_grad():
        for _ in range(n):
            logits = torch_model(px, ids)[0, -1]
            logits[eos] = -float("inf")
            ref.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[ref[-1]]])], dim=1)
    return ref
