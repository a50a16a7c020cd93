"""The ViT image encoder (timm layout, as the official checkpoints store it).

Pre-norm blocks, fused qkv with bias, no classification head: the output is every token after the
final LayerNorm, which is what the text side cross-attends to. The options for small models trained from
scratch (VisionConfig.stem, .pool, .global_context, depth 0; official: "patch", "cls", off, 12) are not in
the official code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .config import VisionConfig


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a (1, 1+N, D) position table to 1+num_patches rows: bicubic on the square grid,
    the class token's row kept (the official `interpolate_pos_embed`)."""
    extra = pos_embed.shape[1] - int(math.isqrt(pos_embed.shape[1] - 1)) ** 2
    old = int(math.isqrt(pos_embed.shape[1] - extra))
    new = int(math.isqrt(num_patches))
    if old == new:
        return pos_embed
    if old * old + extra != pos_embed.shape[1] or new * new != num_patches:
        raise ValueError(f"cannot interpolate a {pos_embed.shape[1]}-row position table to {num_patches} patches")
    head, grid = pos_embed[:, :extra], pos_embed[:, extra:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, dim).to(pos_embed.dtype)
    return torch.cat([head, grid], dim=1)


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvStem(nn.Module):
    """The patch grid from 3x3 convolutions (VisionConfig.stem="conv"): per halving of the resolution a
    convolution, BatchNorm, ReLU and 2x2 max pooling, the first at full resolution, then a 3x3 convolution to
    the width with BatchNorm and ReLU. Why: a linear patch map sees a shape's fragment at a different offset in every image, a
    convolution with pooling sees the same edges; a from-scratch ViT on a few thousand images learns colours in
    ~100 steps but not shapes (benchmarks/vision_probe.py compares the towers). The first convolution runs at
    full resolution so that a shape a few pixels across is seen whole (a stride-2 one skips every other pixel)."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        halvings = patch_size.bit_length() - 1
        channels = [3] + [max(8, width // 6) * 2 ** k for k in range(halvings)]
        layers: list[nn.Module] = []
        for a, b in zip(channels, channels[1:]):
            layers += [nn.Conv2d(a, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        # BatchNorm and ReLU after the last convolution too: non-negative feature detectors, whose maximum
        # over the grid says whether a shape is there (vision_probe measured it against a linear last layer)
        layers += [nn.Conv2d(channels[-1], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.stem = nn.Sequential(*layers)

    def forward(self, x):
        # channels-last: oneDNN's CPU convolutions and BatchNorm run faster in that layout than in NCHW
        return self.stem(x.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)


class PatchConvStem(PatchEmbed):
    """The official patch map plus a ConvStem branch (VisionConfig.stem="patch_conv") scaled per channel by
    weights that start at zero, so training starts from the patch stem: colours reach the tokens through the
    linear map from the first step (the conv stem alone slowed early ITC: its features pass BatchNorms),
    shapes through the convolutions as they learn."""

    def __init__(self, patch_size: int, width: int):
        super().__init__(patch_size, width)
        self.conv = ConvStem(patch_size, width)
        self.scale = nn.Parameter(torch.zeros(width))  # per channel (as LayerScale): the branch starts at zero

    def forward(self, x):
        return super().forward(x) + self.scale * self.conv(x)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if not torch.is_grad_enabled():  # CPU flash attention: 58 ms on contiguous inputs vs 68 on these views
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        x = attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        h = self.fc1(x)
        # Without autograd, GELU in place: 6 ms instead of 24 ms at ViT-B/384 x 8 images on CPU, where a
        # fresh 57 MB output costs more in page faults than the erf itself.
        return self.fc2(F.gelu(h) if torch.is_grad_enabled() else torch.ops.aten.gelu_(h))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path: float, use_checkpoint: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.use_checkpoint = use_checkpoint

    def _forward(self, x):
        if not torch.is_grad_enabled():  # residual adds into the fresh branch outputs (no new buffers)
            x = self.drop_path(self.attn(self.norm1(x))).add_(x)
            return self.drop_path(self.mlp(self.norm2(x))).add_(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


def grid_codes(grid: int, width: int, device=None) -> torch.Tensor:
    """(grid * grid, width) 2D sine-cosine codes (MAE's): half the channels code the row, half the column,
    each as sin and cos at width / 4 frequencies from 1 to 1/10000 (VisionConfig.grid_codes)."""
    k = width // 4
    freq = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float32, device=device) / k)
    pos = torch.arange(grid, dtype=torch.float32, device=device)[:, None] * freq  # (grid, k)
    one = torch.cat([pos.sin(), pos.cos()], 1)  # (grid, 2k)
    rows, cols = one[:, None].expand(grid, grid, -1), one[None].expand(grid, grid, -1)
    codes = torch.cat([rows, cols], -1).flatten(0, 1)  # raster order, as the patch tokens
    return torch.nn.functional.pad(codes, (0, width - codes.shape[1]))


def _max_into_token_0(x: torch.Tensor) -> torch.Tensor:
    """Token 0 replaced by the channel-wise max over the patch tokens (VisionConfig.pool)."""
    return torch.cat([x[:, 1:].amax(1, keepdim=True), x[:, 1:]], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.patch_embed = {"patch": PatchEmbed, "conv": ConvStem, "patch_conv": PatchConvStem}[cfg.stem](
            cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        first_ckpt = cfg.depth - (cfg.checkpoint_layers or cfg.depth)
        self.blocks = nn.ModuleList(
            Block(cfg, rates[i], cfg.grad_checkpointing and i >= first_ckpt) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def position_table(self, num_patches: int) -> torch.Tensor:
        if num_patches + 1 == self.pos_embed.shape[1]:
            return self.pos_embed
        return interpolate_pos_embed(self.pos_embed, num_patches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1 + H*W/patch^2, width) tokens."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size or h != w:
            raise ValueError(f"image size {h}x{w} must be square and a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(images.to(self.cls_token.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_table(x.shape[1] - 1)
        for block in self.blocks:
            x = block(x)
        if self.cfg.pool == "max_prenorm":
            x = _max_into_token_0(x)
        x = self.norm(x)
        if self.cfg.pool == "max":
            x = _max_into_token_0(x)
        if self.cfg.global_context:
            x = torch.cat([x[:, :1], x[:, 1:] + x[:, :1]], dim=1)
        if self.cfg.grid_codes:
            codes = grid_codes(int(math.isqrt(x.shape[1] - 1)), x.shape[-1], x.device).to(x.dtype)
            x = torch.cat([x[:, :1], x[:, 1:] + codes], dim=1)
        return x
