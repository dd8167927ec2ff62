"""Inference with a saved unified model: text-to-image generation and questions about an image.

These are the steps behind ``scripts/generate.py``, usable from Python::

    model = load_model("outputs/demo/mllm/model", device="cuda")
    result = generate_images(model, ["a red circle"], SamplingConfig(seed=0), num_images=4)
    faster = generate_images(model, ["a red circle"], model.sampling_config(seed=0, decoding="jacobi"))
    saved = save_images(result, "outputs/generated")
    answer = answer_question(model, read_image("photo.png"), "What colour is the shape?")

Prompts are laid out exactly as in training (``mllm.prompts``); sampling is ``mllm.sample``. Every input
problem is raised as a ``ValueError`` (or ``FileNotFoundError``) with a one-line message.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from vqrae.hub import is_hub_id
from vqrae.images import center_view, load_image

from .model import LLM_DTYPES, UnifiedModel
from .prompts import GenerationPrompts, generation_prompt_ids, pad_token_id, turn_end, understanding_prompt
from .sample import generate_image_codes, generate_text
from .sampling import SamplingConfig, answer_sampling

GRID_NAME = "grid.png"


@dataclass
class GeneratedImages:
    images: torch.Tensor  # (P * n, 3, H, W) in [-1, 1] on the CPU; image j of prompt i is row i * n + j
    codes: torch.Tensor  # (P * n, N) VQRAE code indices the images were decoded from
    prompts: list[str]  # the P prompts
    num_images: int  # n, images per prompt


@dataclass
class SavedImages:
    paths: list[str]  # one PNG per image, in the row order of GeneratedImages
    grid: str  # all images in one PNG: a row per prompt (one prompt: a near-square grid)


# ----------------------------------------------------------------------------- model


def load_model(
    path: str, device: Union[str, torch.device] = "cpu", dtype: Optional[str] = None, trust_remote_code: bool = False
) -> UnifiedModel:
    """A ``save_pretrained`` directory as an inference model on ``device``, in eval mode, LoRA merged.

    Args:
        path: the model directory.
        device: where to run, e.g. "cpu", "cuda", "cuda:1".
        dtype: LLM weights "float32", "bfloat16" or "float16"; None keeps the saved dtype on CUDA and uses
            float32 elsewhere (half-precision matrix products are slow or missing on CPUs). The projector and
            VQRAE keep their dtype.
        trust_remote_code: run Python code shipped in the directory; a model that needs it is refused without.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    if dtype is not None and dtype not in LLM_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(LLM_DTYPES)}, got '{dtype}'")
    if not os.path.isdir(path) and not is_hub_id(path):  # a hub id resolves in from_pretrained
        raise FileNotFoundError(f"no model directory at '{path}'")
    model = UnifiedModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    if model.cfg.lora.enabled:
        model.merge_lora()  # one plain LLM: no adapter branches on every decode step
    if dtype is None:
        dtype = model.cfg.dtype if device.type == "cuda" else "float32"
    model.llm.to(LLM_DTYPES[dtype])
    return model.to(device).eval()


def _max_positions(model: UnifiedModel) -> Optional[int]:
    text = model.llm.config.get_text_config(decoder=True)
    return getattr(text, "max_position_embeddings", None)


def answer_budget(model: UnifiedModel, prompt_len: int, max_new_tokens: int, what: str, advice: str = "") -> int:
    """``max_new_tokens`` cut to the positions the LLM has left after a prompt of ``prompt_len`` tokens; a
    prompt that fills them is a ``ValueError`` naming ``what`` it is (and ``advice``)."""
    positions = _max_positions(model)
    if positions is None:
        return max_new_tokens
    if prompt_len >= positions:
        raise ValueError(f"{what} is {prompt_len} tokens but this model holds at most {positions} positions{advice}")
    return min(max_new_tokens, positions - prompt_len)


def max_prompt_tokens(model: UnifiedModel) -> Optional[int]:
    """Longest generation prompt (in tokens) that leaves room for ``<boi>`` and the image's N codes; None if
    the LLM states no position limit."""
    positions = _max_positions(model)
    return None if positions is None else positions - model.vqrae.num_tokens - 1


# ----------------------------------------------------------------------------- generation


def build_generation_prompts(
    model: UnifiedModel, prompts: Sequence[str], negative_prompt: Optional[str] = None
) -> GenerationPrompts:
    """Token ids of each prompt and of the unconditional prompt, as the model saw them in training.

    ``negative_prompt`` replaces the empty caption of the unconditional branch, so guidance steers away
    from it. Raises ``ValueError`` for an empty prompt or one too long to leave room for the image.
    """
    if not prompts:
        raise ValueError("no prompts given")
    for i, text in enumerate(prompts):
        if not text.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    tok = model.tokenizer
    cond = [generation_prompt_ids(tok, text) for text in prompts]
    uncond = generation_prompt_ids(tok, negative_prompt or "")
    limit = max_prompt_tokens(model)
    if limit is not None:
        named = [(f"prompt {i + 1}" if len(prompts) > 1 else "the prompt", ids) for i, ids in enumerate(cond)]
        for name, ids in named + [("the negative prompt", uncond)]:
            if len(ids) > limit:
                raise ValueError(
                    f"{name} is {len(ids)} tokens but this model takes at most {limit} "
                    f"({_max_positions(model)} positions minus {model.vqrae.num_tokens + 1} for the image)"
                )
    return GenerationPrompts(cond=cond, uncond=uncond)


def generate_images(
    model: UnifiedModel,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    num_images: int = 1,
    negative_prompt: Optional[str] = None,
    batch_size: int = 8,
    generator: Optional[torch.Generator] = None,
    compile_step: bool = False,
) -> GeneratedImages:
    """``num_images`` images for each prompt: sample H*W image codes with guidance, decode them with the VQRAE.

    The images are a deterministic function of the prompts, ``num_images``, ``batch_size`` and the seed: one
    generator is drawn from batch after batch, so a different batch size gives different (equally valid)
    images.

    Args:
        model: from ``load_model``.
        prompts: P captions.
        sampling: temperature / top-k / top-p / guidance scale / decoding; its seed seeds the generator when
            none is passed. ``cfg_scale == 1`` runs the conditional branch only. ``decoding="jacobi"`` draws the
            same distribution of images in fewer LLM forwards (``mllm.sample``).
        num_images: n, images per prompt.
        negative_prompt: text for the unconditional branch instead of the empty caption.
        batch_size: images per sampler call (a guided call runs twice as many rows).
        generator: RNG on the model's device, drawn from across all batches.
        compile_step: on CUDA, compile the one-token decode step of autoregressive decoding (``mllm.sample``).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = build_generation_prompts(model, prompts, negative_prompt)
    device = next(model.llm.parameters()).device
    if generator is None and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    guided = sampling.cfg_scale != 1
    rows = [cond for cond in ids.cond for _ in range(num_images)]
    pad_id = pad_token_id(model.tokenizer)
    codes, images = [], []
    for start in range(0, len(rows), batch_size):
        batch_codes = generate_image_codes(
            model.llm, rows[start : start + batch_size], model.vocab, model.vqrae.num_tokens, sampling, uncond_ids=[ids.uncond] if guided else None,
            pad_id=pad_id, generator=generator, compile_step=compile_step, positions=model.image_position_table(),
        )  # (b, N)
        pixels = model.decode_image_codes(batch_codes)  # (b, 3, H, W)
        codes.append(batch_codes.cpu())
        images.append(pixels.float().clamp(-1, 1).cpu())
    return GeneratedImages(
        images=torch.cat(images), codes=torch.cat(codes), prompts=list(prompts), num_images=num_images
    )


# ----------------------------------------------------------------------------- images on disk


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (..., 3, H, W) in [-1, 1] -> uint8 in [0, 255], same shape; values outside are clamped."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, columns: int, padding: int = 2, fill: int = 255) -> torch.Tensor:
    """uint8 images (B, 3, H, W) tiled row by row into one (3, rows * (H + p) + p, columns * (W + p) + p)
    image, with ``padding`` pixels of ``fill`` around and between the tiles."""
    b, c, h, w = images.shape
    columns = max(1, min(columns, b))
    rows = math.ceil(b / columns)
    grid = images.new_full((c, rows * (h + padding) + padding, columns * (w + padding) + padding), fill)
    for k in range(b):
        r, col = divmod(k, columns)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[k]
    return grid


def grid_layout(num_prompts: int, num_images: int, max_shown: Optional[int] = None) -> tuple[int, int]:
    """(images shown, columns) of the grid of ``num_images`` images per prompt: a row per prompt when there are
    several, else one prompt's images near-square. With ``max_shown``, the first images up to it (whole prompt
    rows where a row fits; a near-square grid where none does)."""
    total = num_prompts * num_images
    limit = total if max_shown is None else max_shown
    if num_prompts > 1 and num_images <= limit:
        return min(total, num_images * (limit // num_images)), num_images
    shown = min(total, limit)
    return shown, math.ceil(math.sqrt(shown))


def save_png(image: torch.Tensor, path: str) -> None:
    """Write a uint8 image (3, H, W) as a PNG (byte-identical for identical pixels)."""
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")


def image_file_name(prompt_index: int, image_index: int, prompt: str) -> str:
    """``{prompt:03d}_{image:02d}_{prompt words}.png``: the name of image ``image_index`` of prompt ``prompt_index``,
    its words lower-cased, joined by "-" and cut to 40 characters (none: no suffix)."""
    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:40].strip("-")
    return f"{prompt_index:03d}_{image_index:02d}" + (f"_{slug}" if slug else "") + ".png"


def save_images(result: GeneratedImages, out_dir: str, max_shown: Optional[int] = None) -> SavedImages:
    """Write one PNG per image (``image_file_name``) and ``grid.png`` (``grid_layout``: the first ``max_shown``
    images, default all) into ``out_dir``.

    Files of an earlier run with the same names are overwritten.
    """
    os.makedirs(out_dir, exist_ok=True)
    pixels = to_uint8(result.images)
    paths = []
    for k in range(pixels.shape[0]):
        i, j = divmod(k, result.num_images)
        paths.append(os.path.join(out_dir, image_file_name(i, j, result.prompts[i])))
        save_png(pixels[k], paths[-1])
    grid = os.path.join(out_dir, GRID_NAME)
    shown, columns = grid_layout(len(result.prompts), result.num_images, max_shown)
    save_png(image_grid(pixels[:shown], columns), grid)
    return SavedImages(paths=paths, grid=grid)


# ----------------------------------------------------------------------------- understanding


def read_image(path: str) -> Image.Image:
    """An image file as RGB; ``FileNotFoundError`` / ``ValueError`` (one line) when it cannot be used."""
    image, status = load_image(path)
    if status == "missing":
        raise FileNotFoundError(f"no image file at '{path}'")
    if image is None:
        raise ValueError(f"cannot read image '{path}': {status.replace('_', ' ')}")
    return image


def stop_ids(model: UnifiedModel) -> list[int]:
    """Token ids that end an answer: the tokenizer's and LLM's eos, and the chat template's end-of-turn token
    (the answer targets of training end with it)."""
    tok = model.tokenizer
    ids = {tok.eos_token_id}
    eos = model.llm.generation_config.eos_token_id if model.llm.generation_config is not None else None
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if getattr(tok, "chat_template", None):
        end = tok.encode(turn_end(tok), add_special_tokens=False)
        # Only a special token: a plain-text turn end (a newline) may also occur inside an answer.
        if end and end[0] in set(tok.all_special_ids) | set(tok.get_added_vocab().values()):
            ids.add(end[0])
    return sorted(i for i in ids if i is not None)


def question_pixels(model: UnifiedModel, image: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
    """A PIL image center-cropped and resized to the VQRAE's resolution, as in training, or a tensor (3, H, W) in
    [-1, 1] as given."""
    if isinstance(image, torch.Tensor):
        return image
    return center_view(image.convert("RGB"), model.vqrae.image_size)


def question_rows(model: UnifiedModel, images: Sequence[Optional[Union[Image.Image, torch.Tensor]]],
                  questions: Sequence[str]):
    """Left-padded ids, attention mask and image mask (B, L) of the questions' prompts, the images' pixels
    (M, 3, H, W) or None, and L."""
    prompts = [understanding_prompt(model.tokenizer, model.vocab, q, model.vqrae.num_tokens, has_image=img is not None)
               for img, q in zip(images, questions)]
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id(model.tokenizer), dtype=torch.long)
    attention = torch.zeros(len(prompts), length, dtype=torch.bool)
    image_mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[row, length - n:] = torch.tensor(p.input_ids)
        attention[row, length - n:] = True
        image_mask[row, length - n:] = torch.tensor(p.image_mask, dtype=torch.bool)
    pixels = [question_pixels(model, img) for img in images if img is not None]
    return ids, attention, image_mask, (torch.stack(pixels) if pixels else None), length


def answer_questions(
    model: UnifiedModel,
    images: Sequence[Optional[Union[Image.Image, torch.Tensor]]],
    questions: Sequence[str],
    *,
    max_new_tokens: int = 128,
    sampling: Optional[SamplingConfig] = None,
    until: Sequence[str] = (),
    generator: Optional[torch.Generator] = None,
) -> list[str]:
    """Answers to B questions, each about its image (None: a text-only question), decoded together, special
    tokens removed.

    Every row is the prompt ``understanding_prompt`` builds, left-padded to the longest; greedy answers are those
    each question gets alone. An answer stops at the model's stop tokens, after ``max_new_tokens`` (lowered to
    the positions the LLM has left) or before the first of ``until``. ``sampling``: default greedy
    (``answer_sampling``); ``cfg_scale`` is not used.
    """
    if len(images) != len(questions) or not questions:
        raise ValueError(f"need one image (or None) per question, got {len(images)} images for {len(questions)} questions")
    for i, q in enumerate(questions):
        if not q.strip():
            raise ValueError("the question is empty" if len(questions) == 1 else f"question {i + 1} is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling if sampling is not None else answer_sampling()
    ids, attention, image_mask, pixels, length = question_rows(model, images, questions)
    what = "the question with its image" if len(questions) == 1 else "the longest question with its image"
    max_new_tokens = answer_budget(model, length, max_new_tokens, what)
    device = next(model.llm.parameters()).device
    with torch.inference_mode():
        embeds = model.embed(ids.to(device), None if pixels is None else pixels.to(device),
                             image_mask.to(device) if pixels is not None else None)  # (B, L, H)
    tokens = generate_text(model.llm, inputs_embeds=embeds, max_new_tokens=max_new_tokens, sampling=sampling,
                           attention_mask=None if attention.all() else attention.to(device),  # None: no padding
                           eos_id=stop_ids(model), generator=generator)
    answers = [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    for stop in until:
        answers = [a.split(stop)[0] if stop else a for a in answers]
    return [a.strip() for a in answers]


def answer_question(
    model: UnifiedModel,
    image: Union[Image.Image, torch.Tensor],
    question: str,
    *,
    max_new_tokens: int = 128,
    sampling: Optional[SamplingConfig] = None,
    generator: Optional[torch.Generator] = None,
) -> str:
    """The model's answer to ``question`` about ``image``, with special tokens removed (``answer_questions`` for one).

    Args:
        model: from ``load_model``.
        image: a PIL image (center-cropped and resized to the VQRAE's resolution, as in training) or a
            tensor (3, H, W) in [-1, 1].
        question: the user turn; an ``<image>`` placeholder in it sets where the image goes, else it leads.
        max_new_tokens: upper bound on the answer's tokens; lowered to the positions the LLM has left.
        sampling: default greedy (temperature 0); ``cfg_scale`` is not used.
        generator: RNG for sampled answers; default from ``sampling.seed``.
    """
    return answer_questions(model, [image], [question], max_new_tokens=max_new_tokens, sampling=sampling,
                            generator=generator)[0]
