"""Unified multimodal LLM: a VQRAE tokenizer attached to any Hugging Face causal LM, for image
understanding (continuous features -> projector -> input embeddings) and generation (discrete codes as
vocabulary tokens)."""
import vqrae as _vqrae  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
from .data import (
    Batch, Example, ExampleRows, GenerationPrompts, Prompt, Skipped, collate, generation_example,
    generation_prompt_ids, generation_prompts, insert_codes, load_conversations, open_image_text, pad_token_id,
    understanding_example, understanding_prompt,
)
from .sample import SamplingConfig, generate_image_codes, generate_text, new_cache
from .model import LoraSettings, MLLMConfig, UnifiedModel, UnifiedOutput
from .projector import MLPProjector, ProjectorConfig
from .vocab import ImageVocab, add_image_tokens, code_token, codebook_offsets, resize_embeddings

__all__ = [
    "Batch", "Example", "ExampleRows", "GenerationPrompts", "Prompt", "Skipped", "collate", "generation_example",
    "generation_prompt_ids", "generation_prompts", "insert_codes", "load_conversations", "open_image_text",
    "pad_token_id", "understanding_example", "understanding_prompt", "SamplingConfig",
    "generate_image_codes", "generate_text", "new_cache", "LoraSettings", "MLLMConfig", "UnifiedModel",
    "UnifiedOutput", "MLPProjector", "ProjectorConfig", "ImageVocab", "add_image_tokens", "code_token",
    "codebook_offsets", "resize_embeddings",
]
