"""EVA-style vision transformer (ViT-g/14 in the released checkpoints).

Shapes: ``B`` batch, ``N`` image tokens (1 class token + patches), ``D`` width, ``H`` heads.
Pre-LN blocks, exact GELU, fused qkv whose bias is ``[q | 0 | v]`` (keys carry no bias); the
post-layernorm output of every token is what the Q-Former reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import MLP, Linear, attention, encoder_self_attention, merge_heads


class VisionAttention(nn.Module):
    fast_kernels: bool = True  # False (exact=True): PyTorch's fused attention kernel, as the reference

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x)
        if self.fast_kernels and (merged := encoder_self_attention(qkv, self.num_heads)) is not None:
            return self.proj(merged)  # float32 on the CPU: ~2x PyTorch's fused kernel at these shapes
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(merge_heads(attention(q, k, v)))  # q, k, v each (B, H, N, D/H)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_size, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Learned positions, bicubically resized when the image grid differs from the trained one."""
        p = self.cfg.patch_size
        gh, gw = height // p, width // p
        n_trained = self.pos_embed.shape[1] - 1
        if gh * gw == n_trained and gh == gw:
            return self.pos_embed
        side = int(n_trained**0.5)
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, side, side, d).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, N, D) post-layernorm features of every token."""
        dtype = self.patch_embed.weight.dtype
        b, _, h, w = pixel_values.shape
        x = self.patch_embed(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (B, N-1, D)
        x = torch.cat([self.class_token.expand(b, -1, -1).to(dtype), x], dim=1)
        x = x + self.position_embedding(h, w).to(dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)
