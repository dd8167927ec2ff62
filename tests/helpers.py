"""Tiny random assets for unified-model tests and smoke runs: an LLM directory with its tokenizer, a VQRAE
checkpoint and the shapes image folder (captions and questions). Nothing is downloaded.

    python -m tests.helpers outputs/tiny_mllm     # the assets configs/mllm/tiny.yaml points at
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import runpy
import socket
import subprocess
import sys

import torch
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerFast

from vqrae import VQRAE, DecoderConfig, EncoderConfig, QuantizerConfig, VQRAEConfig
from demo.llm import CHAT_TEMPLATE, standin_llm, word_tokenizer
from demo.shapes import caption, questions, sample_attrs, write_imagefolder

CODEBOOK_SIZE = 64  # K of the tiny VQRAE
NUM_TOKENS = 16  # codes per image: 32 px with 8 px patches
CHATML = CHAT_TEMPLATE  # the stand-in's chat template (demo.llm)
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
    tok = word_tokenizer(sentences or shapes_sentences())
    if not chat_template:
        tok.chat_template = None
    return tok


def make_llm(family: str, vocab_size: int, seed: int = 0):
    """Tiny random causal LMs (``demo.llm.TINY``): LLaMA with an untied LM head, Qwen3 with a tied one."""
    return standin_llm(family, vocab_size, seed)


def write_llm(path: str, family: str = "qwen3", tokenizer: PreTrainedTokenizerFast | None = None) -> str:
    """A tiny LLM directory (weights + tokenizer) that ``MLLMConfig.llm`` can name."""
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    tokenizer.save_pretrained(path)
    make_llm(family, len(tokenizer)).save_pretrained(path)
    return str(path)


def answer_in_words(model) -> list[int]:
    """Zero every LM-head row of ``model`` but the tokenizer's plain words, so only a word can win a greedy step (an
    answer is never empty or cut at once by an eos); returns the word ids."""
    words = [i for t, i in model.tokenizer.get_vocab().items() if t not in model.tokenizer.all_special_tokens
             and i < model.vocab.code_offset]
    with torch.no_grad():
        head = model.llm.get_output_embeddings().weight
        other = torch.ones(head.shape[0], dtype=torch.bool)
        other[words] = False
        head[other] = 0
    return words


def write_answering_model(root, seed: int, distinct_codes: bool = False) -> str:
    """A tiny unified model saved in ``root/model`` (its LLM and VQRAE in ``root/llm``, ``root/vqrae``) whose greedy
    answers are words (``answer_in_words``); ``distinct_codes``: its code rows get small distinct values (the mean
    initialisation makes them all equal), so drawn images differ while greedy answers still pick words."""
    from mllm import MLLMConfig, UnifiedModel

    cfg = MLLMConfig(llm=write_llm(os.path.join(root, "llm"), "llama"), vqrae=write_vqrae(os.path.join(root, "vqrae")),
                     dtype="float32")
    torch.manual_seed(seed)
    model = UnifiedModel.build(cfg)
    words = answer_in_words(model)
    if distinct_codes:
        with torch.no_grad():
            head = model.llm.get_output_embeddings().weight
            noise = torch.randn(len(model.vocab.code_ids), head.shape[1], generator=torch.Generator().manual_seed(2))
            head[list(model.vocab.code_ids)] = 0.1 * head[words].std() * noise
    model.save_pretrained(os.path.join(root, "model"))
    return os.path.join(root, "model")


TINY_TIMM = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)  # a ViT of a few k parameters


def tiny_vqrae_config(image_size: int = 32, codebook_size: int = CODEBOOK_SIZE, codebook_dim: int = 16) -> VQRAEConfig:
    """A VQRAE small enough to run in milliseconds on a CPU (timm SigLIP-shaped encoder, random init)."""
    return VQRAEConfig(
        encoder=EncoderConfig(backend="timm", name="vit_so400m_patch16_siglip_256", pretrained=False,
                              image_size=image_size, model_kwargs=dict(TINY_TIMM)),
        quantizer=QuantizerConfig(codebook_size=codebook_size, codebook_dim=codebook_dim),
        decoder=DecoderConfig(patch_size=8, image_size=image_size),
    )


def write_random_inception(path: str) -> dict:
    """A randomly initialised torch-fidelity InceptionV3 saved as safetensors at ``path``, built without any
    download (its conv weights drawn Kaiming-normal from seed 0, which keeps the random features away from zero);
    returns its state dict."""
    import math

    from safetensors.torch import save_file
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.weight.data.normal_(0.0, math.sqrt(2.0 / mod.weight[0].numel()), generator=gen)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path))
    return state


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


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def plain_env() -> dict:
    """This process's environment without the rank variables a test may have set (``single_rank``): a script
    started with it runs as its own process."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


def launcher_env() -> dict:
    """``plain_env`` for a launched run, with DeepSpeed's CPU extension cache shared by the launches."""
    env = plain_env()
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/vqrae_torch_ext")
    return env


def deepspeed_cmd(ranks: int, *argv: str) -> list[str]:
    """``deepspeed --num_gpus ranks argv`` (CPU ranks without a GPU) on a free port."""
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks), "--master_port",
            str(free_port()), *argv]


def launch_runs(runs: list[dict], ranks: int, plan: str) -> str:
    """``runs`` (a tests/launch_worker.py plan, written to ``plan``) in one launch of ``ranks`` ranks; returns its
    output (stdout, then stderr), failing with it when the launch fails."""
    with open(plan, "w") as f:
        json.dump(runs, f)
    proc = subprocess.run(deepspeed_cmd(ranks, "tests/launch_worker.py", plan), cwd=ROOT, env=launcher_env(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def run_outcomes(run: dict, ranks: int) -> list[str]:
    """What each rank recorded of a launched run: "done", "preempted at N" or "error: ..."."""
    out = []
    for rank in range(ranks):
        with open(f"{run['record']}_rank{rank}.json") as f:
            out.append(json.load(f)["outcome"])
    return out


def write_images(folder: str, n: int = 48, size: int = 40, seed: int = 0) -> None:
    """``n`` RGB PNGs: a random background with a random ellipse."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
        x, y = rng.randint(0, size // 2), rng.randint(0, size // 2)
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        ImageDraw.Draw(img).ellipse([x, y, x + size // 3, y + size // 3], fill=fill)
        img.save(os.path.join(folder, f"{i:03d}.png"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict:
    """The environment the launcher gives a lone rank, on a free port."""
    return dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))


def run_script(name: str, argv: list[str]) -> int:
    """``python scripts/<name> argv`` in this process (its ``__main__`` block runs); returns the exit code."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [name, *argv]
    try:
        runpy.run_path(os.path.join(ROOT, "scripts", name), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def error_line(stderr: str) -> str:
    """The one ``error:`` line a failed run must end stderr with; nothing like a traceback before it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def log_lines(caplog) -> list[str]:
    """The messages the trainers logged (``vqrae`` logger) during a test."""
    return [r.getMessage() for r in caplog.records if r.name == "vqrae"]


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
