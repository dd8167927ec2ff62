"""Generate images from text, or answer a question about an image, with a trained unified model.

    python scripts/generate.py --prompt "a red circle on a blue background" --num-images 4 --seed 0
    python scripts/generate.py --prompts prompts.txt --cfg 3.0 --top-k 64 --out outputs/generated
    python scripts/generate.py --image photo.png --prompt "What shape is in the image?"

Generation writes one PNG per image and a grid.png (a row per prompt) into --out and prints their paths.
Each PNG is written as soon as its batch is decoded, so an interrupted run keeps the images it made and memory
holds one batch (plus the grid, which shows at most the first 256 images). A prompts file holds one prompt per
line (blank lines are skipped); --num-images images are made for each, --batch-size at a time, at most 4096
images a run: split a longer job into runs with different --out folders. The same seed, prompts, --num-images
and --batch-size give the same images; without --seed a fresh one is drawn and printed. --negative-prompt
replaces the empty caption of the unconditional guidance branch. With --image the answer is printed; it is
greedy unless --temperature is given.

Sampling defaults are the model's own (MLLMConfig.sampling, saved with it: mllm.sampling.SamplingConfig's
defaults unless its training config said otherwise); the demo model's are in configs/mllm/demo.yaml. --decoding jacobi draws the same distribution of images in fewer LLM forwards (other
images for the same seed); --temperature 0 is greedy.
Bad input ends the run with a one-line message on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqrae.cli import Parser, UsageError, one_line  # noqa: E402

DEFAULT_MODEL = "outputs/demo/mllm/model"  # where scripts/run_demo.sh leaves the unified model
DEFAULT_OUT = "outputs/generated"
MAX_IMAGES = 4096  # images per run: beyond this a job is better split into runs that can each be rerun alone
# flag -> SamplingConfig field; the fields check the values (mllm.sampling.check_sampling)
SAMPLING_FLAGS = {"cfg": "cfg_scale", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                  "decoding": "decoding", "window": "window", "draft_init": "draft_init", "lenience": "lenience"}
IMAGE_FLAGS = ("decoding", "window", "draft_init", "lenience")  # SamplingConfig fields for image codes only
GRID_MAX = 256  # grid.png shows at most this many images (whole prompt rows where it can), so it stays viewable


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    what = p.add_argument_group("what to do")
    what.add_argument("--prompt", help="a caption to draw, or with --image the question")
    what.add_argument("--prompts", metavar="FILE", help="a file of captions, one per line")
    what.add_argument("--image", metavar="PATH", help="answer --prompt about this image instead of generating")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a saved unified model directory (default {DEFAULT_MODEL})")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale s in u + s (c - u); 1 = off, 0 = unconditional")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default for answers)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument("--decoding", choices=["autoregressive", "jacobi"], default=None,
                   help="image codes one forward per code, or speculative Jacobi decoding: a window of codes per "
                        "forward, the same distribution (default: the model's own)")
    p.add_argument("--window", type=int, default=None, help="codes per forward with --decoding jacobi")
    p.add_argument("--draft-init", choices=["last", "uniform"], default=None,
                   help="--decoding jacobi: what codes no forward has reached are drafted from")
    p.add_argument("--lenience", type=float, default=None,
                   help="--decoding jacobi: keep drafts with min(1, lenience * p / q); 1 = exact, > 1 keeps more (lossy)")
    p.add_argument("--seed", type=int, default=None, help="default: a fresh seed, printed")
    p.add_argument("--negative-prompt", default=None, help="text the unconditional branch uses instead of '' (with --cfg != 1)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the PNGs (default {DEFAULT_OUT})")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampler call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer with --image (default 128)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="LLM weights; auto = the saved dtype on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="CUDA only: compile the decode step (slow start, fast steps)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the model (off: such a model is refused); only for sources you trust")
    return p.parse_args(argv)


def _read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"prompts file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file '{path}': {e}") from None
    if not prompts:
        raise UsageError(f"prompts file '{path}' holds no prompts")
    return prompts


def _check_writable(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to --out '{out}': {e.strerror or e}") from None


def sampling_flags(args: argparse.Namespace) -> dict:
    """The sampling settings given on the command line, as ``SamplingConfig`` fields, each checked by it (a
    ``ValueError`` naming the flag); the model's defaults fill in the rest once it is loaded."""
    from mllm.sampling import flag_settings

    return flag_settings(vars(args), SAMPLING_FLAGS)


def validate(args: argparse.Namespace) -> list[str]:
    """Everything checkable without loading the model; returns the prompts (captions, or the one question)."""
    sampling_flags(args)
    for flag in ("num_images", "batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    if args.prompt is not None and args.prompts is not None:
        raise UsageError("pass --prompt or --prompts, not both")
    if args.image is not None:
        given = [f"--{k.replace('_', '-')}" for k in IMAGE_FLAGS if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} set how image codes are decoded; answers to --image are text")
        if args.prompt is None:
            raise UsageError("--image needs the question as --prompt")
        if not os.path.isfile(args.image):
            raise UsageError(f"--image '{args.image}' does not exist")
        if not os.access(args.image, os.R_OK):
            raise UsageError(f"--image '{args.image}' is not readable")
    if args.prompt is None and args.prompts is None:
        raise UsageError("nothing to do: pass --prompt TEXT, --prompts FILE, or --image PATH --prompt QUESTION")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty")
    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts)

    from vqrae.hub import is_hub_id  # a hub id (owner/name) resolves when the model loads

    if not os.path.isdir(args.model) and not is_hub_id(args.model):
        if os.path.normpath(args.model) == os.path.normpath(DEFAULT_MODEL):
            raise UsageError(
                f"no model at {DEFAULT_MODEL}: train one first with `bash scripts/run_demo.sh` "
                "(or `deepspeed scripts/train_mllm.py` after the tokenizer training), or pass --model DIR"
            )
        raise UsageError(f"no model directory at '{args.model}'")
    if args.image is None:
        _check_writable(args.out)
    return prompts


def _check_image_count(num_prompts: int, num_images: int) -> None:
    total = num_prompts * num_images
    if total > MAX_IMAGES:
        raise UsageError(
            f"--num-images {num_images} for {num_prompts} prompt(s) makes {total} images, more than the {MAX_IMAGES} "
            f"of one run: split the prompts (or lower --num-images) over several runs with different --out folders"
        )


def _write_images(model, prompts: list[str], sampling, args: argparse.Namespace) -> str:
    """Sample, decode and write the images batch by batch, printing each path once its PNG is on disk; returns
    the grid's path. The images are those of one ``generate_images`` call over all prompts: the same rows in the
    same batches, drawing from one generator seeded like its own."""
    import torch

    from mllm.inference import (
        GRID_NAME, build_generation_prompts, generate_images, grid_layout, image_file_name, image_grid, save_png,
        to_uint8,
    )

    build_generation_prompts(model, prompts, args.negative_prompt)  # every prompt checked before the first image
    n, total = args.num_images, len(prompts) * args.num_images
    generator = torch.Generator(device=next(model.llm.parameters()).device).manual_seed(sampling.seed)
    shown, columns = grid_layout(len(prompts), n, GRID_MAX)
    grid, tiles = os.path.join(args.out, GRID_NAME), []
    for start in range(0, total, args.batch_size):
        rows = range(start, min(start + args.batch_size, total))  # image k is image k % n of prompt k // n
        batch = generate_images(
            model, [prompts[k // n] for k in rows], sampling, num_images=1, negative_prompt=args.negative_prompt,
            batch_size=len(rows), generator=generator, compile_step=args.compile,
        )
        pixels = to_uint8(batch.images)  # (b, 3, H, W)
        for k, image in zip(rows, pixels):
            i, j = divmod(k, n)
            path = os.path.join(args.out, image_file_name(i, j, prompts[i]))  # the names save_images gives
            save_png(image, path)
            print(path, flush=True)
        tiles.extend(pixels[: max(0, shown - start)])
        if start < shown <= rows.stop:  # this batch completed the grid: write it now, not only at the end
            save_png(image_grid(torch.stack(tiles), columns), grid)
            tiles.clear()
    return grid


def _load_model(path: str, device, dtype, trust_remote_code: bool = False):
    import yaml
    from safetensors import SafetensorError

    from mllm.inference import load_model

    try:
        return load_model(path, device, dtype, trust_remote_code=trust_remote_code)
    except (yaml.YAMLError, SafetensorError) as e:  # a damaged file in the model directory
        raise ValueError(f"--model '{path}' cannot be loaded: {type(e).__name__}: {e}") from None


def _run(args: argparse.Namespace, prompts: list[str]) -> None:
    # Heavy imports only now: bad arguments fail above in a fraction of a second.
    import torch
    from transformers.utils import logging as hf_logging

    from mllm.inference import answer_question, read_image
    from mllm.sampling import answer_sampling

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # stderr carries errors only
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device '{args.device}': {e}") from None
    dtype = None if args.dtype == "auto" else args.dtype
    given = sampling_flags(args)

    if args.image is not None:
        image = read_image(args.image)  # before the model load: a bad file fails fast
        model = _load_model(args.model, device, dtype, args.trust_remote_code)
        text = {k: v for k, v in given.items() if k != "cfg_scale"}  # guidance is for images
        sampling = answer_sampling(seed=args.seed, **text)
        print(answer_question(model, image, prompts[0], max_new_tokens=args.max_new_tokens, sampling=sampling))
        return

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    model = _load_model(args.model, device, dtype, args.trust_remote_code)
    sampling = model.sampling_config(seed=seed, **given)  # the model's own defaults, then the flags
    grid = _write_images(model, prompts, sampling, args)
    print(f"grid: {grid}")
    print(f"seed: {seed}")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        prompts = validate(args)
        if args.image is None:
            _check_image_count(len(prompts), args.num_images)
        _run(args, prompts)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
