"""VQRAE tokenizer: a pretrained vision encoder, a SimVQ quantizer and a symmetric ViT decoder."""
import os as _os

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, threads spinning while they wait
# for a descheduled peer made a training step 1.8-3.7x slower at the same thread count; on an idle machine sleeping
# costs up to 1.5x on small steps (docs/benchmarks.md; OMP_WAIT_POLICY=ACTIVE restores spinning). The thread count,
# and so every float sum, is unchanged. OpenMP reads this when torch loads it, so it is set before the first
# ``import torch`` of a process that imports this package first (every script does); a user's value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _import_timm_without_wandb() -> None:
    """Import timm as it imports where wandb is not installed.

    timm imports wandb at import time (``timm.utils.summary``, for its own training script's logs), which nothing
    here uses; where wandb is installed (lmms-eval requires it) that cost 2-3 s at the start of every script and
    every rank. timm expects the ImportError and carries on; the entry is removed afterwards, so a later
    ``import wandb`` (the user's own) loads it as usual. Nothing changes where timm or wandb is already loaded."""
    import sys

    if "timm" in sys.modules or "wandb" in sys.modules:
        return
    sys.modules["wandb"] = None  # type: ignore[assignment]  # `import wandb` raises ImportError while this stands
    try:
        import timm  # noqa: F401
    finally:
        del sys.modules["wandb"]


_import_timm_without_wandb()

from .config import ConfigError, load_config
from .decoder import DecoderConfig, ViTDecoder
from .encoder import EncoderConfig, VFMEncoder
from .model import VQRAE, VQRAEConfig, VQRAEOutput
from .quantizer import QuantizerConfig, SimVQ, VectorQuantizer, nearest_code

__all__ = [
    "ConfigError", "load_config", "DecoderConfig", "ViTDecoder", "EncoderConfig", "VFMEncoder", "VQRAE",
    "VQRAEConfig", "VQRAEOutput", "QuantizerConfig", "SimVQ", "VectorQuantizer", "nearest_code",
]
