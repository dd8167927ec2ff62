import os

import pytest
import torch

from vqrae import DecoderConfig, EncoderConfig, QuantizerConfig, VQRAEConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_TIMM = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def tiny_vqrae_config(image_size: int = 32, codebook_size: int = 64, codebook_dim: int = 16) -> VQRAEConfig:
    """A VQRAE small enough to train in seconds on a CPU (timm SigLIP-shaped encoder, random init)."""
    return VQRAEConfig(
        encoder=EncoderConfig(
            backend="timm", name="vit_so400m_patch16_siglip_256", pretrained=False, image_size=image_size,
            model_kwargs=dict(TINY_TIMM),
        ),
        quantizer=QuantizerConfig(codebook_size=codebook_size, codebook_dim=codebook_dim),
        decoder=DecoderConfig(patch_size=8, image_size=image_size),
    )


@pytest.fixture
def tiny_config() -> VQRAEConfig:
    return tiny_vqrae_config()
