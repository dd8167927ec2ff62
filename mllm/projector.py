"""MLP that maps the tokenizer's continuous image features into the LLM's input embedding space."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ProjectorConfig:
    depth: int = 2  # Linear layers; 2 = Linear(D, H) GELU Linear(H, H), the LLaVA-1.5 projector


class MLPProjector(nn.Module):
    """Linear(D, H) followed by ``depth - 1`` blocks of GELU + Linear(H, H).

    Args:
        in_dim: D, the VQRAE encoder's feature width.
        out_dim: H, the LLM's hidden size.
        depth: number of Linear layers (>= 1).
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, N, D) -> embeddings (B, N, H)."""
        return self.net(features)
