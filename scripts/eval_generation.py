"""Draw images for a prompt file in the layout a public text-to-image evaluator reads, and score them.

    python scripts/eval_generation.py --model DIR --prompts geneval/prompts/evaluation_metadata.jsonl \
        --layout geneval --samples 4 --output outputs/geneval          # then GenEval's evaluate_images.py
    python scripts/eval_generation.py --model DIR --prompts ELLA/dpg_bench/prompts --layout dpg --samples 4 \
        --output outputs/dpg                                           # then DPG-Bench's compute_dpg_bench.py
    python scripts/eval_generation.py --model DIR --prompts captions.txt --layout folder --samples 1 \
        --output outputs/gen --reference data/shapes/test --inception-weights inception.safetensors [--clip DIR]

Seeded and resumable: a rerun skips finished prompts and draws the rest as a whole run would; the output folder
records the model and settings (run.json) and refuses another run's. With --reference, FID, KID, Inception Score
and precision/recall against that image folder (torch-fidelity) go to <output>/metrics.json, with --clip the
CLIPScore too (a saved CLIP model, e.g. openai/clip-vit-large-patch14).
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqrae.cli import Parser, main as cli_main  # noqa: E402


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="unified model directory or hub id")
    p.add_argument("--prompts", required=True, help=".jsonl (a \"prompt\" per line), a folder of <id>.txt, or a text file")
    p.add_argument("--layout", choices=["geneval", "dpg", "folder"], default="folder")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (dpg: 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="images per sampler call")
    p.add_argument("--output", required=True, help="folder for the images, run.json and metrics.json")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="LLM weights: float32, bfloat16 or float16")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale; default: the model's own")
    p.add_argument("--temperature", type=float, default=None, help="default: the model's own")
    p.add_argument("--top-k", type=int, default=None, help="default: the model's own")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's own")
    p.add_argument("--reference", default=None, help="image folder to compute FID/KID/IS/precision/recall against")
    p.add_argument("--inception-weights", default=None,
                   help="safetensors Inception weights (default: the torch hub cache's weights-inception-2015-12-05-6726825d.safetensors)")
    p.add_argument("--clip", default=None, help="CLIP model folder (save_pretrained) for CLIPScore")
    return p.parse_args(argv)


def run(argv=None) -> dict:
    args = parse_args(argv)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    from mllm import gen_eval

    items = gen_eval.read_prompts(args.prompts, args.layout)[: args.limit]
    if args.layout == "dpg" and args.samples != gen_eval.DPG_SAMPLES:
        raise ValueError(f"the dpg layout is a 2 x 2 grid: --samples must be {gen_eval.DPG_SAMPLES}, got {args.samples}")
    if args.reference is not None:  # bad metric inputs fail before hours of sampling
        gen_eval.inception_weights_path(args.inception_weights)
        if not os.path.isdir(args.reference):
            raise ValueError(f"no reference image folder at '{args.reference}'")
    if args.clip is not None:
        gen_eval.check_clip_dir(args.clip)

    import torch

    from mllm.inference import generate_images, load_model, to_uint8

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device=device, dtype=args.dtype)
    flags = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg)
    sampling = model.sampling_config(**{k: v for k, v in flags.items() if v is not None})
    record = {"model": args.model if not os.path.isdir(args.model) else os.path.abspath(args.model),
              "model_fingerprint": gen_eval.model_fingerprint(args.model), "layout": args.layout,
              "samples": args.samples, "seed": args.seed, "batch_size": args.batch_size,
              "sampling": {k: getattr(sampling, k) for k in ("temperature", "top_k", "top_p", "cfg_scale", "decoding")},
              "prompts": os.path.abspath(args.prompts)}
    gen_eval.claim_output(args.output, record)

    def draw(text, n, generator):
        gen = torch.Generator(device=device).manual_seed(int(generator.initial_seed()))
        return to_uint8(generate_images(model, [text], sampling, num_images=n, batch_size=args.batch_size,
                                        generator=gen).images)

    start = time.perf_counter()
    drawn, skipped = gen_eval.run_prompts(items, args.output, args.layout, args.samples, args.seed, draw, log=print)
    result: dict = {"prompts": len(items), "drawn": drawn, "skipped_finished": skipped,
                    "seconds": time.perf_counter() - start}
    print(f"{drawn} prompts drawn, {skipped} already finished, in {args.output} ({args.layout} layout)")
    if args.reference is not None or args.clip is not None:
        images, texts = gen_eval.load_generated(args.output, items, args.layout, args.samples)
        if args.reference is not None:
            reference = gen_eval.load_reference(args.reference, gen_eval.image_side(images))
            result.update(gen_eval.distribution_metrics(images, reference, args.inception_weights, device))
            result["reference"] = os.path.abspath(args.reference)
        if args.clip is not None:
            result["clip_score"] = gen_eval.clip_score(images, texts, args.clip)
        with open(os.path.join(args.output, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(" ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
    return result


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
