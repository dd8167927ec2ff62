"""Unified multimodal LLM: a VQRAE tokenizer attached to any Hugging Face causal LM, for image
understanding (continuous features -> projector -> input embeddings) and generation (discrete codes as
vocabulary tokens).

Importing the package loads what inference needs; training data (``mllm.data``, which loads ``datasets``) and
the trainer (``mllm.train``) are imported by name.
"""
import vqrae as _vqrae  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
from .model import LoraSettings, MLLMConfig, UnifiedModel, UnifiedOutput
from .projector import MLPProjector, ProjectorConfig
from .prompts import (
    GenerationPrompts, Prompt, generation_prompt_ids, generation_prompts, pad_token_id, understanding_prompt,
)
from .sample import generate_image_codes, generate_text, new_cache
from .sampling import SamplingConfig
from .vocab import ImageVocab, add_image_tokens, code_token, codebook_offsets, resize_embeddings

__all__ = [
    "LoraSettings", "MLLMConfig", "UnifiedModel", "UnifiedOutput", "MLPProjector", "ProjectorConfig",
    "GenerationPrompts", "Prompt", "generation_prompt_ids", "generation_prompts", "pad_token_id",
    "understanding_prompt", "generate_image_codes", "generate_text", "new_cache", "SamplingConfig", "ImageVocab",
    "add_image_tokens", "code_token", "codebook_offsets", "resize_embeddings",
]
