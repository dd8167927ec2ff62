"""Tokenizer training steps, callable from the training script and from tests.

Stage 1 freezes the encoder and trains the projections, W and the decoder; stage 2 unfreezes the encoder at
its own small lr and adds self-distillation to a frozen copy of the initial encoder so its semantics survive.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DataConfig
from .discriminator import PatchDiscriminator
from .losses import (
    LossConfig,
    PerceptualLoss,
    adaptive_weight,
    distillation_loss,
    gan_active,
    generator_adv_loss,
    hinge_d_loss,
    reconstruction_loss,
)
from .model import VQRAE, VQRAEConfig, VQRAEOutput
from .quantizer import FeatureStats, check_finite_features
from .training import OptimConfig, RunConfig


@dataclass
class TokenizerTrainConfig:
    stage: int = 1  # 1: encoder frozen; 2: encoder trained at encoder_lr with self-distillation
    init_from: Optional[str] = None  # stage 2 (required): a stage-1 model export, e.g. <stage1 output>/model
    encoder_lr: float = 1e-5  # stage-2 encoder lr (the paper's 1e-5); same schedule shape as optim.lr
    quantizer_lr: Optional[float] = None  # projections and W; None: optim.lr. Lower keeps a k-means codebook spread
    codebook_window: int = 100  # steps over which codebook use % and perplexity are measured
    model: VQRAEConfig = field(default_factory=VQRAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(source=""))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/tokenizer"))


@dataclass
class GeneratorLoss:
    total: torch.Tensor  # weighted sum the optimizer sees
    terms: Dict[str, torch.Tensor]  # unweighted terms, detached, for logging
    gan_weight: float  # the adversarial weight actually applied this step (0 before gan_start_step)


def set_stage(model: VQRAE, stage: int) -> None:
    """Freeze or unfreeze the encoder; the base codebook C' is a buffer and never trains."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    model.requires_grad_(True)
    model.encoder.requires_grad_(stage == 2)


def tokenizer_param_groups(model: VQRAE, cfg: "TokenizerTrainConfig") -> list:
    """AdamW groups: decoder at optim.lr, quantizer at quantizer_lr (default optim.lr), and in stage 2 the
    encoder at encoder_lr. Frozen parameters (the stage-1 encoder) are left out."""
    from .training import param_groups

    optim = cfg.optim
    named = list(model.named_parameters())
    groups = param_groups(((n, p) for n, p in named if n.startswith("decoder.")), optim.lr, optim.weight_decay, "decoder")
    q_lr = optim.lr if cfg.quantizer_lr is None else cfg.quantizer_lr
    groups += param_groups(((n, p) for n, p in named if n.startswith("quantizer.")), q_lr, optim.weight_decay, "quantizer")
    if cfg.stage == 2:
        groups += param_groups(((n, p) for n, p in named if n.startswith("encoder.")), cfg.encoder_lr,
                               optim.weight_decay, "encoder")
    return groups


def make_teacher(encoder: nn.Module) -> nn.Module:
    """Frozen copy E0 of the encoder for stage-2 self-distillation."""
    teacher = copy.deepcopy(encoder).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def feature_stats(encoder: nn.Module, batches) -> Optional[FeatureStats]:
    """Per-channel statistics of the encoder's features over ``batches`` (image tensors), merged exactly in
    float64 (``FeatureStats``); None when there was no batch. A NaN or inf feature is a ``ValueError``."""
    stats = None
    for images in batches:
        f = encoder(images).float().flatten(0, 1)  # (B*N, D)
        check_finite_features(f, "encoder feature")
        batch = FeatureStats.of(f)
        stats = batch if stats is None else stats.merge(batch)
    return stats


def merge_stats(parts: "list[FeatureStats]") -> FeatureStats:
    """One ``FeatureStats`` from those of several ranks (in rank order, so every rank gets the same bits)."""
    return functools.reduce(FeatureStats.merge, parts)


def build_discriminator(cfg: LossConfig) -> PatchDiscriminator:
    return PatchDiscriminator(in_channels=3, channels=cfg.disc_channels, layers=cfg.disc_layers)


def match_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Reconstruction target at the decoder's output resolution."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def generator_loss(
    out: VQRAEOutput,
    target: torch.Tensor,
    cfg: LossConfig,
    step: int,
    perceptual: Optional[PerceptualLoss] = None,
    discriminator: Optional[nn.Module] = None,
    teacher_features: Optional[torch.Tensor] = None,
    last_layer: Optional[torch.Tensor] = None,
) -> GeneratorLoss:
    """Weighted tokenizer loss from a forward pass; every term is also returned unweighted.

    Args:
        out: the model's forward output.
        target: images at the decoder resolution, in [-1, 1].
        cfg: loss weights.
        step: optimizer step (decides whether the GAN term is on).
        perceptual: LPIPS module, or None when ``cfg.perceptual_weight`` is 0.
        discriminator: the discriminator; its parameters receive no gradient from this loss.
        teacher_features: E0(x) in stage 2, else None.
        last_layer: decoder last-layer weight for the adaptive GAN weight (None: weight 1).
    """
    recon = out.reconstruction.float()
    target = target.float()
    terms = {"recon": reconstruction_loss(recon, target, cfg.recon), "codebook": out.codebook_loss, "commit": out.commit_loss}
    total = cfg.recon_weight * terms["recon"] + cfg.codebook_weight * out.codebook_loss + cfg.commit_weight * out.commit_loss
    if perceptual is not None and cfg.perceptual_weight > 0:
        terms["perceptual"] = perceptual(recon, target)
        total = total + cfg.perceptual_weight * terms["perceptual"]
    if teacher_features is not None:
        terms["distill"] = distillation_loss(out.features.float(), teacher_features.float())
        total = total + cfg.distill_weight * terms["distill"]
    applied = 0.0
    if discriminator is not None and cfg.gan_weight > 0 and gan_active(step, cfg.gan_start_step):
        discriminator.requires_grad_(False)  # the generator loss must not train the discriminator
        g = generator_adv_loss(discriminator(recon.to(next(discriminator.parameters()).dtype)).float())
        discriminator.requires_grad_(True)
        terms["gan"] = g
        scale = adaptive_weight(total, g, last_layer) if cfg.adaptive_gan_weight else 1.0
        applied = cfg.gan_weight * float(scale)
        total = total + applied * g
    return GeneratorLoss(total=total, terms={k: v.detach() for k, v in terms.items()}, gan_weight=applied)


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss on real images vs detached reconstructions."""
    dtype = next(discriminator.parameters()).dtype
    return hinge_d_loss(discriminator(real.to(dtype)).float(), discriminator(fake.detach().to(dtype)).float())
