"""VQRAE tokenizer: a pretrained vision encoder, a SimVQ quantizer and a symmetric ViT decoder."""
from .config import ConfigError, load_config
from .decoder import DecoderConfig, ViTDecoder
from .encoder import EncoderConfig, VFMEncoder
from .model import VQRAE, VQRAEConfig, VQRAEOutput
from .quantizer import QuantizerConfig, SimVQ, VectorQuantizer, nearest_code

__all__ = [
    "ConfigError", "load_config", "DecoderConfig", "ViTDecoder", "EncoderConfig", "VFMEncoder", "VQRAE",
    "VQRAEConfig", "VQRAEOutput", "QuantizerConfig", "SimVQ", "VectorQuantizer", "nearest_code",
]
