"""VQRAE: VFM encoder -> SimVQ -> symmetric ViT decoder, with self-contained checkpoints."""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file

from .config import ConfigError, from_dict, to_dict
from .decoder import DecoderConfig, build_decoder
from .encoder import EncoderConfig, VFMEncoder
from .hub import PushToHub, resolve
from .quantizer import QuantizerConfig, build_quantizer, check_finite_features
from .untrusted import read_safetensors, refuse_pickled_weights

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


class VQRAE(nn.Module, PushToHub):
    """Args:
    cfg: model config. The encoder's pretrained weights are fetched as the config says; ``from_pretrained``
        instead rebuilds the architecture offline and loads the saved weights.
    """

    HUB_KIND = "vqrae"  # the model card push_to_hub writes

    def __init__(self, cfg: VQRAEConfig):
        super().__init__()
        self.encoder = VFMEncoder(cfg.encoder)
        self.cfg = cfg = dataclasses.replace(cfg, encoder=self.encoder.cfg)  # with the encoder's resolved settings
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
        """images -> code indices (B, N); a NaN or inf feature is a ``ValueError``, never a silent code 0."""
        features = self.encoder(images)
        check_finite_features(features, "encoder feature")
        return self.quantizer(features).indices

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
        try:
            with open(file) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"VQRAE config '{file}' is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"VQRAE config '{file}' holds no settings")
        return from_dict(VQRAEConfig, data)

    @classmethod
    def from_pretrained(
        cls, path: str, map_location: str | torch.device = "cpu", trust_remote_code: bool = False,
        revision: Optional[str] = None,
    ) -> "VQRAE":
        """Rebuild from a ``save_pretrained`` directory, or a hub id (``owner/name``) at ``revision``, with nothing
        else: a hub id is fetched once into the Hugging Face cache (``vqrae.hub.resolve``) and read from there.

        ``trust_remote_code`` is the caller's decision: a saved config whose encoder needs model code shipped
        with it (``encoder.trust_remote_code``, an ``auto_map``) is refused without it, and weights are read
        from ``model.safetensors`` only.
        """
        path = resolve(path, revision, "VQRAE checkpoint")
        cfg = cls.load_config(path)
        _refuse_widening(cfg.encoder, path, trust_remote_code)
        cfg.encoder.pretrained = False
        cfg.encoder.weights = None  # the weights are the ones saved here; never read another file
        cfg.encoder.trust_remote_code = cfg.encoder.trust_remote_code and trust_remote_code
        file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(file):
            refuse_pickled_weights(path, "VQRAE checkpoint", f"only {WEIGHTS_NAME} is read: save it with "
                                   "VQRAE.save_pretrained")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random init is immediately overwritten by the saved weights
            model = cls(cfg)
        state = read_safetensors(file, "VQRAE weights", device=str(map_location))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # weights of another architecture than config.yaml describes
            detail = " ".join(str(e).split())[:300]
            raise ConfigError(f"VQRAE weights '{file}' do not match {CONFIG_NAME}: {detail}") from None
        return model


# timm create_model arguments that read a file: a saved config rebuilds from model.safetensors alone.
_FILE_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")


def _refuse_widening(enc: EncoderConfig, path: str, trust_remote_code: bool) -> None:
    """Saved encoder settings that would run or read more than the checkpoint itself need the caller's consent
    (remote code) or are refused outright (extra files)."""
    opt_in = "pass trust_remote_code=True (training: model.encoder.trust_remote_code=true)"
    if not trust_remote_code:
        if enc.trust_remote_code:
            raise ConfigError(
                f"VQRAE checkpoint '{path}' asks to run model code shipped with its encoder "
                f"(encoder.trust_remote_code: true in {CONFIG_NAME}); {opt_in} only if you trust its source"
            )
        if isinstance(enc.hf_config, dict) and "auto_map" in enc.hf_config:
            raise ConfigError(
                f"VQRAE checkpoint '{path}' names custom encoder code (encoder.hf_config.auto_map in {CONFIG_NAME}); "
                f"{opt_in} only if you trust its source"
            )
    files = sorted(set(enc.model_kwargs) & set(_FILE_KWARGS))
    if files:
        raise ConfigError(f"VQRAE checkpoint '{path}': encoder.model_kwargs.{files[0]} in {CONFIG_NAME} would load "
                          f"another file; a saved VQRAE loads {WEIGHTS_NAME} only")
    if enc.backend == "hf" and not enc.hf_config:
        raise ConfigError(f"VQRAE checkpoint '{path}' has no encoder.hf_config in {CONFIG_NAME}, so it cannot be "
                          "rebuilt offline; save it again with VQRAE.save_pretrained")
