"""Training losses for the VQRAE tokenizer.

Every term function here returns an UNWEIGHTED term; ``generator_loss`` multiplies them by the weights in
``LossConfig`` and also returns each term on its own for logging. Stage 1 trains the quantizer and decoder against a frozen
encoder (reconstruction + perceptual + GAN + codebook/commit terms); stage 2 also unfreezes the encoder and
adds the self-distillation term that keeps it close to its frozen copy (lambda_d).
"""
from __future__ import annotations

import copy
import functools
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model import VQRAEOutput


@dataclass
class LossConfig:
    recon: str = "l2"  # pixel loss: "l2" (MSE) or "l1"
    recon_weight: float = 1.0
    perceptual_weight: float = 1.1  # LPIPS term
    lpips_net: str = "vgg"  # LPIPS trunk: "vgg", "alex" or "squeeze"
    lpips_backbone: str = "pretrained"  # "pretrained" (torchvision ImageNet weights via the torch hub cache), "random" (offline tests) or a path to a local state dict (.safetensors)
    gan_weight: float = 0.1  # multiplies the adaptive weight below
    gan_start_step: int = 50000  # the generator sees the adversarial term from this step on
    adaptive_gan_weight: bool = True  # scale the GAN term by ||grad nll|| / ||grad g|| at the decoder's last layer
    disc_lr: float = 4e-5
    disc_layers: int = 3  # stride-2 conv blocks in the PatchGAN discriminator
    disc_channels: int = 64  # width of its first conv
    distill_weight: float = 1.0  # lambda_d: self-distillation to the frozen encoder, stage 2 only
    # Quantizer loss ||sg(c) - z||^2 + beta ||c - sg(z)||^2, z the projected encoder token, c its code:
    commit_weight: float = 1.0  # ||sg(c) - z||^2, moves the encoder side (projection; encoder in stage 2) to its code
    codebook_weight: float = 0.25  # beta: ||c - sg(z)||^2, moves the codebook (W) toward the encoder


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean pixel loss between images; ``kind`` is "l2" (MSE) or "l1"."""
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    raise ValueError(f"unknown reconstruction loss '{kind}'; expected 'l2' or 'l1'")


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    from .untrusted import read_safetensors

    # A pickled state dict (.pth) can run code when loaded; the trunk is read from safetensors only.
    if not path.endswith(".safetensors"):
        raise ValueError(
            f"LPIPS backbone '{path}' is not a .safetensors file (pickles such as .pth can run code when loaded); "
            "convert it once with safetensors.torch.save_file and set lpips_backbone to that file"
        )
    return read_safetensors(path, "LPIPS backbone")


def _build_lpips(net: str, pretrained_trunk: bool) -> nn.Module:
    """lpips' module: the calibrated heads, and the trunk with torchvision's ImageNet weights or random ones."""
    import lpips

    # A random trunk is drawn from a fixed seed, not the global RNG: it is not saved with checkpoints, so a
    # resumed run must rebuild the very same loss, and building it must not shift the training RNG.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # lpips still passes torchvision's deprecated ``pretrained=`` flag
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        try:
            # pnet_rand=True builds the trunk with random init and no download; a local file is loaded afterwards
            return lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_trunk, verbose=False)
        except OSError as e:  # URLError is an OSError: no cached weights and no network
            raise ValueError(
                f"cannot get ImageNet {net} weights for LPIPS ({e}); set lpips_backbone to a local torchvision "
                f"state dict file or place the file in {torch.hub.get_dir()}/checkpoints"
            ) from None


@functools.lru_cache(maxsize=None)
def _random_lpips(net: str) -> nn.Module:
    """The random-trunk LPIPS, built once per process and copied for each loss (the same values every time).
    Building it took 1.5 s on a CPU, nearly all of it torchvision drawing the 120M-parameter classifier that lpips
    discards; the test suite builds one per tiny run."""
    return _build_lpips(net, pretrained_trunk=False)


class PerceptualLoss(nn.Module):
    """Frozen LPIPS distance between images in [-1, 1]; ``forward`` returns the batch mean.

    The calibrated linear heads ship inside the ``lpips`` package. The trunk comes from torchvision's
    ImageNet weights ("pretrained", read from the torch hub cache or fetched once), stays random ("random",
    for tests: never touches the network), or is read from a local torchvision state dict file (keys
    ``features.N.*``; a full classifier checkpoint works, its ``classifier.*`` keys are ignored).

    Args:
        net: LPIPS trunk, "vgg", "alex" or "squeeze".
        backbone: "pretrained", "random" or a path to a local trunk state dict.
    """

    def __init__(self, net: str = "vgg", backbone: str = "pretrained"):
        super().__init__()
        if net not in ("vgg", "alex", "squeeze"):
            raise ValueError(f"unknown LPIPS net '{net}'; expected 'vgg', 'alex' or 'squeeze'")
        if backbone not in ("pretrained", "random") and not os.path.isfile(backbone):
            raise ValueError(f"LPIPS backbone file not found: {backbone} (use 'pretrained', 'random' or a state dict path)")
        if backbone == "random":
            self.lpips = copy.deepcopy(_random_lpips(net))
        else:
            self.lpips = _build_lpips(net, pretrained_trunk=backbone == "pretrained")
            if backbone != "pretrained":
                self._load_trunk(backbone)
        self.requires_grad_(False)
        self.eval()

    def _load_trunk(self, path: str) -> None:
        # lpips splits torchvision's ``features`` Sequential into slices that keep each layer's index as its
        # name (slice1.0, slice1.2, ..., slice2.5), so ``features.N.*`` maps to ``sliceK.N.*``.
        slice_of = {idx: f"{sname}.{idx}" for sname, sl in self.lpips.net.named_children() for idx, _ in sl.named_children()}
        state = _load_state_dict_file(path)
        mapped = {}
        for key, value in state.items():
            parts = key.split(".", 2)  # features, layer index, the rest (squeezenet's Fire blocks nest deeper)
            if len(parts) == 3 and parts[0] == "features" and parts[1] in slice_of:
                mapped[f"{slice_of[parts[1]]}.{parts[2]}"] = value
        expected = set(self.lpips.net.state_dict().keys())
        missing = sorted(expected - mapped.keys())
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} trunk tensors (e.g. features.{missing[0].split('.', 1)[1]}); expected a torchvision state dict")
        self.lpips.net.load_state_dict(mapped)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        # Always eval: the LPIPS heads contain dropout, which a parent's .train() must not switch on.
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        # Only CPU autocast is switched off (a GPU's stays on): a CPU without bf16 instructions emulates bf16
        # convolutions, and the trunk's forward took 18x as long as in fp32 (32 px, a 2-core VM).
        with torch.autocast("cpu", enabled=False):
            return self.lpips(pred.to(dtype), target.to(dtype)).mean()


def distillation_loss(features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Self-distillation ||E(x) - E0(x)||^2 (mean squared error) to the frozen encoder's features.

    The teacher is detached, so only the trained encoder E receives gradient.
    """
    return F.mse_loss(features, teacher_features.detach())


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial loss -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor | None, max_weight: float = 1e4
) -> torch.Tensor:
    """Balance of the GAN term: ||grad nll|| / (||grad g|| + 1e-4) at the decoder's last layer weight.

    Both gradients are taken with ``torch.autograd.grad`` (nothing is written to ``.grad``) and the graph is
    kept for the caller's backward. The result is clamped to [0, max_weight] and detached.

    Returns 1.0 when ``last_layer_weight`` is None or holds no local elements. Callers pass None where the
    gradient cannot be taken faithfully: the weight is partitioned across ranks (DeepSpeed ZeRO-3 leaves an
    empty placeholder), or the decoder uses reentrant activation checkpointing (``use_reentrant=True`` does
    not support ``autograd.grad``).
    """
    if last_layer_weight is None or last_layer_weight.numel() == 0:
        return torch.tensor(1.0, device=g_loss.device)
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = torch.norm(nll_grad.float()) / (torch.norm(g_grad.float()) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def gan_active(step: int, start_step: int) -> bool:
    """Whether the adversarial terms are on at ``step`` (they start at ``start_step``)."""
    return step >= start_step


@dataclass
class GeneratorLoss:
    total: torch.Tensor  # weighted sum the optimizer sees
    terms: Dict[str, torch.Tensor]  # unweighted terms, detached, for logging
    gan_weight: torch.Tensor  # the adversarial weight applied this step (0 before gan_start_step), detached


def match_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Reconstruction target at the decoder's output resolution."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def generator_loss(
    out: "VQRAEOutput",
    target: torch.Tensor,
    cfg: LossConfig,
    step: int,
    perceptual: Optional[PerceptualLoss] = None,
    discriminator: Optional[nn.Module] = None,
    teacher_features: Optional[torch.Tensor] = None,
    last_layer: Optional[torch.Tensor] = None,
) -> GeneratorLoss:
    """Weighted tokenizer loss from a forward pass; every term is also returned unweighted. Nothing here reads
    a value back to the host.

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
    applied = torch.zeros((), device=total.device)
    if discriminator is not None and cfg.gan_weight > 0 and gan_active(step, cfg.gan_start_step):
        discriminator.requires_grad_(False)  # the generator loss must not train the discriminator
        g = generator_adv_loss(discriminator(recon.to(next(discriminator.parameters()).dtype)).float())
        discriminator.requires_grad_(True)
        terms["gan"] = g
        scale = adaptive_weight(total, g, last_layer) if cfg.adaptive_gan_weight else torch.ones((), device=g.device)
        applied = cfg.gan_weight * scale.float()
        total = total + applied * g
    return GeneratorLoss(total=total, terms={k: v.detach() for k, v in terms.items()}, gan_weight=applied.detach())


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss on real images vs detached reconstructions."""
    dtype = next(discriminator.parameters()).dtype
    return hinge_d_loss(discriminator(real.to(dtype)).float(), discriminator(fake.detach().to(dtype)).float())
