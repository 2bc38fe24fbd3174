"""
The encoder's eyes: Qwen2.5-VL's vision tower (a ViT over 14 px patches with 2D rotary embeddings,
window attention in most blocks and full attention in a few, and a merger that turns each 2x2 group of
patches into one LLM token), and the three layers it shares with the LLM of model_encoder.py: RMSNorm,
the SwiGLU MLP and rotate_half. Module names and keys are transformers' (`model.visual.*`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import attention


# -----------------------------------------------------------------------------
# layers shared with the LLM

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # normalise in fp32, scale in the input dtype (as Qwen does)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MLP(nn.Module):  # SwiGLU
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -----------------------------------------------------------------------------
# the vision tower

def pack_groups(group):
    """Token indices of each group, padded with -1: (groups, longest). Group ids are 0..S-1, none empty."""
    counts = torch.bincount(group)
    order = torch.argsort(group, stable=True)
    slot = torch.arange(len(group)) - (counts.cumsum(0) - counts)[group[order]]
    idx = torch.full((len(counts), int(counts.max())), -1, dtype=torch.long)
    idx[group[order], slot] = order
    return idx


class VisionAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, groups):
        """x: (N, D) packed patches of all images; groups: (idx, valid) from pack_groups, one row per
        attention window (or per image in full-attention layers)."""
        idx, valid = groups
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, -1).unbind(1)  # (N, H, hd) each
        q, k = ((t.float() * cos + rotate_half(t.float()) * sin).to(t.dtype) for t in (q, k))
        q, k, v = (t[idx.clamp(min=0)].transpose(1, 2) for t in (q, k, v))  # (S, H, L, hd)
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        o = attention(q, k, v, mask=mask).transpose(1, 2)[valid]  # (N, H, hd), in idx order
        out = torch.empty_like(o)
        out[idx[valid]] = o
        return self.proj(out.flatten(1))


class VisionBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1 = RMSNorm(c.vision_hidden_size)
        self.attn = VisionAttention(c.vision_hidden_size, c.vision_num_heads)
        self.norm2 = RMSNorm(c.vision_hidden_size)
        self.mlp = MLP(c.vision_hidden_size, c.vision_intermediate_size, bias=True)

    def forward(self, x, cos, sin, groups):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        p, d = c.patch_size, c.vision_hidden_size
        kernel = (c.temporal_patch_size, p, p)
        self.patch_embed = nn.Module()  # a Conv3d with stride = kernel: run as a Linear over flattened patches
        self.patch_embed.proj = nn.Conv3d(c.in_channels, d, kernel, kernel, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.vision_depth))
        self.merger = nn.Module()  # 2x2 neighbouring patches -> one LLM token
        self.merger.ln_q = RMSNorm(d)
        md = d * c.spatial_merge_size ** 2
        self.merger.mlp = nn.Sequential(nn.Linear(md, md), nn.GELU(), nn.Linear(md, c.hidden_size))
        self.grad_checkpointing = False

    def rotary(self, grid_thw, device):
        """2D rotary: half of each head's frequencies rotate with the patch row, half with its column."""
        m, hd = self.c.spatial_merge_size, self.c.vision_hidden_size // self.c.vision_num_heads
        pos = []
        for t, h, w in grid_thw.tolist():  # patches come in merge-block order: (h/m, w/m, m, m)
            hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
            hw = torch.stack([hh, ww], -1).view(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)
            pos.append(hw.repeat(t, 1))
        pos = torch.cat(pos).to(device).float()  # (N, 2)
        inv_freq = self.c.vision_rope_theta ** (-torch.arange(0, hd // 2, 2, device=device).float() / (hd // 2))
        freqs = (pos[:, :, None] * inv_freq).flatten(1)  # (N, hd/2): [row freqs, column freqs]
        emb = torch.cat([freqs, freqs], -1)[:, None, :]  # (N, 1, hd)
        return emb.cos(), emb.sin()

    def attention_groups(self, grid_thw, device):
        """(image groups, window groups): windows are window_size px squares of merged tokens."""
        m, ws = self.c.spatial_merge_size, self.c.window_size // self.c.spatial_merge_size // self.c.patch_size
        images, windows, offset = [], [], 0
        for i, (t, h, w) in enumerate(grid_thw.tolist()):
            tt, hh, ww = torch.meshgrid(*map(torch.arange, (t, h // m, w // m)), indexing='ij')
            nh, nw = math.ceil(h // m / ws), math.ceil(w // m / ws)
            win = (tt * nh + hh // ws) * nw + ww // ws  # window of each merged token
            windows.append(win.flatten().repeat_interleave(m * m) + offset)
            images.append(torch.full((t * h * w,), i))
            offset += t * nh * nw
        packed = (pack_groups(torch.cat(images)), pack_groups(torch.cat(windows)))
        return [(idx.to(device), (idx >= 0).to(device)) for idx in packed]

    def forward(self, pixel_values, grid_thw):
        """pixel_values: (N, C*T*P*P) from preprocess_image; grid_thw: (images, 3). Returns (N / m², hidden)."""
        w = self.patch_embed.proj.weight
        x = F.linear(pixel_values.to(w.dtype), w.flatten(1))
        cos, sin = self.rotary(grid_thw, x.device)
        full, windowed = self.attention_groups(grid_thw, x.device)
        for i, block in enumerate(self.blocks):
            groups = full if i in self.c.fullatt_block_indexes else windowed
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, groups, use_reentrant=False)
            else:
                x = block(x, cos, sin, groups)
        return self.merger.mlp(self.merger.ln_q(x).view(-1, self.merger.mlp[0].in_features))
