"""PatchGAN discriminator: a stack of 4x4 convolutions whose output is one real/fake logit per image patch."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: under data parallel each rank would normalise with the statistics of its own
    # small batch (there is no SyncBatchNorm in a plain DeepSpeed engine), and real and fake images go through
    # in separate calls, so batch statistics would differ by batch type and leak the label to the network.
    # GroupNorm normalises each sample on its own, identically on every rank and at any batch size.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """NLayer PatchGAN: conv 4x4 stride 2 blocks with LeakyReLU(0.2), then two stride-1 convs to logits.

    For a 256x256 input and ``layers=3`` the output is (B, 1, 30, 30); each logit sees a 70x70 receptive field.

    Args:
        in_channels: image channels.
        channels: width of the first conv; it doubles per block up to 8x.
        layers: number of stride-2 blocks.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last block keeps the resolution and only widens the receptive field
            blocks += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # N(0, 0.02) conv weights, as in the original PatchGAN
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 3, H, W) -> (B, 1, h, w) patch logits
