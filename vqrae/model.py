"""VQRAE: VFM encoder -> SimVQ -> symmetric ViT decoder, with self-contained checkpoints."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file

from .config import from_dict, to_dict
from .decoder import DecoderConfig, build_decoder
from .encoder import EncoderConfig, VFMEncoder
from .quantizer import QuantizerConfig, build_quantizer

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class VQRAEConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class VQRAEOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W) in [-1, 1] scale (unclamped)
    features: torch.Tensor  # (B, N, D) continuous encoder features, used for understanding and distillation
    quantized: torch.Tensor  # (B, N, D) straight-through quantized features
    indices: torch.Tensor  # (B, N) code indices, used for generation
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor


class VQRAE(nn.Module):
    """Args:
    cfg: model config. The encoder's pretrained weights are fetched as the config says; ``from_pretrained``
        instead rebuilds the architecture offline and loads the saved weights.
    """

    def __init__(self, cfg: VQRAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VFMEncoder(cfg.encoder)
        enc = self.encoder
        self.quantizer = build_quantizer(cfg.quantizer, enc.dim)
        self.decoder = build_decoder(cfg.decoder, enc.dim, enc.grid_size, enc.depth, enc.dim, enc.num_heads)

    @property
    def grid_size(self) -> int:
        return self.encoder.grid_size

    @property
    def num_tokens(self) -> int:
        return self.encoder.grid_size**2

    @property
    def codebook_size(self) -> int:
        return self.cfg.quantizer.codebook_size

    @property
    def image_size(self) -> int:
        """Resolution of reconstructions (the decoder's output)."""
        return self.decoder.image_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> continuous features (B, N, D)."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> VQRAEOutput:
        features = self.encoder(images)
        q = self.quantizer(features)
        return VQRAEOutput(
            reconstruction=self.decoder(q.quantized),
            features=features,
            quantized=q.quantized,
            indices=q.indices,
            codebook_loss=q.codebook_loss,
            commit_loss=q.commit_loss,
        )

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images -> code indices (B, N)."""
        return self.quantizer(self.encoder(images)).indices

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """code indices (B, N) -> images (B, 3, H, W) in [-1, 1] scale."""
        return self.decoder(self.quantizer.indices_to_codes(indices))

    # -- checkpoints --------------------------------------------------------------------------------------
    def save_pretrained(self, path: str, state_dict: Optional[dict] = None) -> None:
        """Write config.yaml + model.safetensors; ``state_dict`` (e.g. EMA weights) overrides the live ones.

        Written to a temporary name and renamed, so an interrupted save never leaves a half checkpoint.
        """
        os.makedirs(path, exist_ok=True)
        cfg = copy.deepcopy(self.cfg)
        cfg.encoder.pretrained = False  # the weights travel in model.safetensors; never re-fetch the VFM
        cfg.encoder.weights = None
        sd = state_dict if state_dict is not None else self.state_dict()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        tmp_w, tmp_c = os.path.join(path, WEIGHTS_NAME + ".tmp"), os.path.join(path, CONFIG_NAME + ".tmp")
        save_file(tensors, tmp_w, metadata={"format": "pt"})
        with open(tmp_c, "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        os.replace(tmp_w, os.path.join(path, WEIGHTS_NAME))
        os.replace(tmp_c, os.path.join(path, CONFIG_NAME))

    @classmethod
    def load_config(cls, path: str) -> VQRAEConfig:
        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no VQRAE checkpoint at '{path}' (missing {CONFIG_NAME})")
        with open(file) as f:
            return from_dict(VQRAEConfig, yaml.safe_load(f))

    @classmethod
    def from_pretrained(cls, path: str, map_location: str | torch.device = "cpu") -> "VQRAE":
        """Rebuild from a ``save_pretrained`` directory with nothing else (no hub access)."""
        cfg = cls.load_config(path)
        cfg.encoder.pretrained = False
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random init is immediately overwritten by the saved weights
            model = cls(cfg)
        state = load_file(os.path.join(path, WEIGHTS_NAME), device=str(map_location))
        model.load_state_dict(state, strict=True)
        return model
