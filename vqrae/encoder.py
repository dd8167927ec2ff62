"""Vision foundation model encoder: a thin adapter over a timm ViT or a Hugging Face vision model.

The adapter never forks the backbone: timm models are used through ``create_model`` / ``forward_features`` /
``pretrained_cfg``, Hugging Face models through ``AutoConfig`` / ``from_pretrained`` / ``last_hidden_state``.
It takes images in [-1, 1], resizes them to the backbone's input size, applies the backbone's own pixel
normalisation and returns patch tokens (B, N, D) with class/register tokens removed.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .untrusted import refuse_pickle, refuse_pickled_weights, refuse_remote_code


@dataclass
class EncoderConfig:
    backend: str = "timm"  # "timm" (model name) or "hf" (hub id or local directory)
    name: str = "vit_so400m_patch16_siglip_256.v2_webli"  # SigLIP2-so400m/16 at 256 px, the paper's VFM
    pretrained: bool = True  # False: random init; VQRAE's semantics come from a pretrained VFM, so it warns
    weights: Optional[str] = None  # local .safetensors/.pth file (timm) or directory (hf) instead of the hub
    image_size: int = 256  # backbone input resolution; images are resized to it
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # timm create_model / HF config overrides
    mean: Optional[List[float]] = None  # pixel normalisation; None: the backbone's own (pretrained_cfg, processor)
    std: Optional[List[float]] = None
    grad_checkpointing: bool = False
    trust_remote_code: bool = False  # HF models with custom code (e.g. InternViT); off unless the user sets it
    hf_config: Dict[str, Any] = field(default_factory=dict)  # filled on save so a checkpoint rebuilds offline


_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _pretrained_warning(name: str) -> None:
    warnings.warn(
        f"encoder '{name}' is randomly initialised (pretrained: false); VQRAE relies on a pretrained vision "
        "foundation model's semantics, so use this only for tests or when loading a saved VQRAE",
        stacklevel=3,
    )


class VFMEncoder(nn.Module):
    """Patch-token encoder over a timm or Hugging Face ViT.

    Args:
        cfg: encoder config. ``self.cfg`` is a copy with ``mean``/``std``/``hf_config`` resolved, so that saving
            it records everything needed to rebuild the architecture without the hub; ``cfg`` itself is left alone.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg = copy.deepcopy(cfg)  # resolved below; the caller's config stays as it was
        if cfg.backend == "timm":
            self._build_timm(cfg)
        elif cfg.backend == "hf":
            self._build_hf(cfg)
        else:
            raise ValueError(f"encoder.backend must be 'timm' or 'hf', got '{cfg.backend}'")
        if cfg.image_size % self.patch_size:
            raise ValueError(
                f"encoder.image_size {cfg.image_size} is not a multiple of the encoder patch size {self.patch_size}"
            )
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    # -- construction -------------------------------------------------------------------------------------
    def _build_timm(self, cfg: EncoderConfig) -> None:
        import timm

        kwargs = dict(cfg.model_kwargs)
        kwargs.setdefault("img_size", cfg.image_size)
        if cfg.weights and not os.path.isfile(cfg.weights):
            raise FileNotFoundError(f"encoder.weights file not found: {cfg.weights}")
        if cfg.pretrained and cfg.weights:
            refuse_pickle(cfg.weights, "encoder.weights", "convert it to a .safetensors file and point encoder.weights at it")
        if cfg.pretrained:
            # timm's own path for a local file: the pretrained_cfg 'file' entry, which also applies the
            # model's checkpoint filter (key remapping, position embedding resampling).
            overlay = {"file": cfg.weights} if cfg.weights else None
            model = timm.create_model(cfg.name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs)
        else:
            _pretrained_warning(cfg.name)
            model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
        if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
            raise ValueError(f"timm model '{cfg.name}' is not a ViT with patch tokens")
        self.model = model
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.dim = int(model.num_features)
        self.depth = len(model.blocks)
        self.num_heads = int(model.blocks[0].attn.num_heads)
        if cfg.mean is None or cfg.std is None:
            pc = model.pretrained_cfg
            cfg.mean, cfg.std = list(pc.get("mean", _IMAGENET[0])), list(pc.get("std", _IMAGENET[1]))

    def _build_hf(self, cfg: EncoderConfig) -> None:
        from transformers import MODEL_MAPPING, AutoConfig

        source = cfg.weights or cfg.name
        if (cfg.pretrained or not cfg.hf_config) and not cfg.trust_remote_code:  # transformers' refusal is multi-line
            refuse_remote_code(source, "encoder", "set encoder.trust_remote_code=true")
        if cfg.pretrained:
            refuse_pickled_weights(source, "encoder", "only safetensors are loaded (use_safetensors=True): save the "
                                   "model with save_pretrained, whose default is safetensors")
        if cfg.hf_config:
            hf_cfg = AutoConfig.for_model(**cfg.hf_config)
        else:
            hf_cfg = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
            # Dual-tower checkpoints (SigLIP, CLIP) hold the vision tower's config as a sub-config.
            hf_cfg = getattr(hf_cfg, "vision_config", None) or hf_cfg
            for k, v in cfg.model_kwargs.items():
                setattr(hf_cfg, k, v)
        model_cls = MODEL_MAPPING[type(hf_cfg)] if type(hf_cfg) in MODEL_MAPPING else None
        if cfg.pretrained:
            if model_cls is None:
                from transformers import AutoModel

                model = AutoModel.from_pretrained(
                    source, config=hf_cfg, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
                )
            else:
                model = model_cls.from_pretrained(source, config=hf_cfg, use_safetensors=True)
        else:
            _pretrained_warning(cfg.name)
            if model_cls is None:
                from transformers import AutoModel

                model = AutoModel.from_config(hf_cfg, trust_remote_code=cfg.trust_remote_code)
            else:
                model = model_cls(hf_cfg)
        self.model = model
        patch = hf_cfg.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        self.dim = int(hf_cfg.hidden_size)
        self.depth = int(hf_cfg.num_hidden_layers)
        self.num_heads = int(hf_cfg.num_attention_heads)
        cfg.hf_config = hf_cfg.to_dict()
        if cfg.mean is None or cfg.std is None:
            cfg.mean, cfg.std = self._hf_norm(source, cfg)

    @staticmethod
    def _hf_norm(source: str, cfg: EncoderConfig) -> tuple[list, list]:
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
            return list(proc.image_mean), list(proc.image_std)
        except Exception:
            warnings.warn(f"no image processor found for '{source}'; using ImageNet mean/std (set encoder.mean/std)")
            return list(_IMAGENET[0]), list(_IMAGENET[1])

    # -- use ----------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.cfg.image_size // self.patch_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.cfg.backend == "timm":
            self.model.set_grad_checkpointing(enable)
        elif enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> patch tokens (B, N, D), N = grid_size**2."""
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = ((images + 1) / 2 - self.mean) / self.std
        if self.cfg.backend == "timm":
            tokens = self.model.forward_features(x)  # (B, prefix + N, D), final norm applied
        else:
            tokens = self.model(pixel_values=x).last_hidden_state
        n = self.grid_size**2
        return tokens[:, tokens.shape[1] - n :]  # drop class/register tokens, which lead the sequence
