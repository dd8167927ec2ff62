"""Symmetric ViT pixel decoder: quantized patch tokens -> transformer blocks -> pixel patches -> image.

By default it mirrors the encoder's depth, width and heads. Its patch size may differ from the encoder's, so
a 16x16 token grid from a p14 encoder at 224 px decodes to 256 px with p16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint


@dataclass
class DecoderConfig:
    depth: Optional[int] = None  # None: the encoder's depth (symmetric decoder)
    width: Optional[int] = None  # None: the encoder's width
    num_heads: Optional[int] = None  # None: the encoder's heads
    mlp_ratio: float = 4.0
    patch_size: int = 16  # pixels per token side at the output
    image_size: int = 256  # output resolution; must equal token grid * patch_size
    grad_checkpointing: bool = False


class ViTDecoder(nn.Module):
    """Args:
    in_dim: width of the incoming tokens (encoder width D).
    grid_size: tokens per side of the incoming square grid.
    depth, width, num_heads, mlp_ratio: transformer shape.
    patch_size: output pixels per token side.
    grad_checkpointing: recompute block activations in backward to save memory.
    """

    def __init__(self, in_dim: int, grid_size: int, depth: int, width: int, num_heads: int, mlp_ratio: float, patch_size: int, grad_checkpointing: bool = False):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"decoder width {width} is not divisible by its {num_heads} heads")
        self.grid_size, self.patch_size = grid_size, patch_size
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Linear(in_dim, width) if in_dim != width else nn.Identity()
        self.pos_embed = nn.Parameter(torch.randn(1, grid_size * grid_size, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.last_layer = nn.Linear(width, patch_size * patch_size * 3)  # its weight drives the adaptive GAN weight

    @property
    def image_size(self) -> int:
        return self.grid_size * self.patch_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D) -> images (B, 3, H, W), H = W = grid_size * patch_size."""
        b, n, _ = tokens.shape
        if n != self.grid_size**2:
            raise ValueError(f"decoder expects {self.grid_size ** 2} tokens, got {n}")
        x = self.embed(tokens) + self.pos_embed  # (B, N, W)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        x = self.last_layer(self.norm(x))  # (B, N, p*p*3)
        g, p = self.grid_size, self.patch_size
        x = x.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, g, p, g, p)
        return x.reshape(b, 3, g * p, g * p)


def build_decoder(cfg: DecoderConfig, in_dim: int, grid_size: int, depth: int, width: int, num_heads: int) -> ViTDecoder:
    """Decoder from config; unset shape fields take the encoder's (depth, width, num_heads)."""
    if grid_size * cfg.patch_size != cfg.image_size:
        raise ValueError(
            f"decoder.image_size {cfg.image_size} must equal the token grid {grid_size} x decoder.patch_size "
            f"{cfg.patch_size} = {grid_size * cfg.patch_size}"
        )
    return ViTDecoder(
        in_dim=in_dim,
        grid_size=grid_size,
        depth=cfg.depth or depth,
        width=cfg.width or width,
        num_heads=cfg.num_heads or num_heads,
        mlp_ratio=cfg.mlp_ratio,
        patch_size=cfg.patch_size,
        grad_checkpointing=cfg.grad_checkpointing,
    )
