"""Tiny random assets for unified-model tests and smoke runs: an LLM directory with its tokenizer, a VQRAE
checkpoint and the shapes image folder (captions and questions). Nothing is downloaded.

    python -m tests.helpers outputs/tiny_mllm     # the assets configs/mllm/tiny.yaml points at
"""
from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from vqrae import VQRAE, DecoderConfig, EncoderConfig, QuantizerConfig, VQRAEConfig
from vqrae.shapes import caption, questions, sample_attrs, write_imagefolder

CODEBOOK_SIZE = 64  # K of the tiny VQRAE
NUM_TOKENS = 16  # codes per image: 32 px with 8 px patches
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Captions, questions and answers of the shapes data set: every word its texts use."""
    rng = random.Random(seed)
    out = ["user assistant system"]
    for _ in range(n):
        attrs = sample_attrs(rng, "any")
        out.append(caption(attrs, rng))
        out += [f"{q} {a}" for q, a in questions(attrs)]
    return out


def make_tokenizer(sentences: list[str] | None = None, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``sentences`` (default: the shapes texts) with ChatML special tokens."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences or shapes_sentences(), trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def make_llm(family: str, vocab_size: int, seed: int = 0):
    """Tiny random causal LMs: LLaMA with an untied LM head, Qwen3 with a tied one."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=True))
    raise ValueError(f"family must be 'llama' or 'qwen3', got '{family}'")


def write_llm(path: str, family: str = "qwen3", tokenizer: PreTrainedTokenizerFast | None = None) -> str:
    """A tiny LLM directory (weights + tokenizer) that ``MLLMConfig.llm`` can name."""
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    tokenizer.save_pretrained(path)
    make_llm(family, len(tokenizer)).save_pretrained(path)
    return str(path)


def tiny_vqrae_config(image_size: int = 32, codebook_size: int = CODEBOOK_SIZE) -> VQRAEConfig:
    """A VQRAE small enough to run in milliseconds on a CPU (timm SigLIP-shaped encoder, random init)."""
    return VQRAEConfig(
        encoder=EncoderConfig(backend="timm", name="vit_so400m_patch16_siglip_256", pretrained=False,
                              image_size=image_size,
                              model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)),
        quantizer=QuantizerConfig(codebook_size=codebook_size, codebook_dim=16),
        decoder=DecoderConfig(patch_size=8, image_size=image_size),
    )


def write_vqrae(path: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    VQRAE(tiny_vqrae_config()).save_pretrained(str(path))
    return str(path)


def write_tiny_assets(root: str, family: str = "qwen3", num_train: int = 48) -> dict[str, str]:
    """``llm/``, ``vqrae/`` and ``shapes/`` (train + test image folders) under ``root``; returns their paths."""
    paths = {"llm": os.path.join(root, "llm"), "vqrae": os.path.join(root, "vqrae"), "data": os.path.join(root, "shapes")}
    write_llm(paths["llm"], family)
    write_vqrae(paths["vqrae"])
    write_imagefolder(paths["data"], num_train, 4, seed=0, size=32)
    return paths


def deepspeed_run(script: str, config: str, *overrides: str, num_gpus: int = 2,
                  resume: str | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` under the real ``deepspeed`` launcher (CPU ranks without a GPU); fail with its output."""
    port = 29500 + os.getpid() % 2000
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(num_gpus), "--master_port",
           str(port), script, "--config", config, *overrides] + (["--resume", resume] if resume else [])
    # DeepSpeed JIT-builds a CPU communication op once; a shared cache keeps later launches fast.
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/vqrae_torch_ext"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def logged(log: str, key: str) -> list[float]:
    """Every value logged as ``key=value`` (``RunLogger`` console lines), in order."""
    return [float(m) for m in re.findall(rf"{re.escape(key)}=([-\d.e+]+)", log)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="write the tiny unified-model assets")
    ap.add_argument("root", nargs="?", default="outputs/tiny_mllm")
    ap.add_argument("--family", default="qwen3", choices=["llama", "qwen3"])
    ap.add_argument("--train", type=int, default=48, help="training images")
    args = ap.parse_args()
    print(write_tiny_assets(args.root, args.family, args.train))
