"""Score the demo model on the shapes data set's held-out split (attribute combinations never seen in training).

    python scripts/score_demo.py [--model outputs/demo/mllm/model] [--data data/shapes] [--out outputs/demo/score.json]

- tokenizer: PSNR of reconstructions and codebook use over every held-out image, and whether each reconstruction
  still shows its picture's colour, shape, position and size (judged from pixels like generated images: the
  ceiling for generation);
- generation: images for held-out captions, judged from their pixels (demo.shapes.classify): does the colour,
  shape, position and size match the caption?
- understanding: every question about held-out images, exact-match answer accuracy.
Prints one table, writes the numbers as JSON, and saves picture grids (generated images per prompt, and
inputs above their reconstructions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


ATTRIBUTES = ("colour", "shape", "size", "position", "background")  # what each question asks, told by its answer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="outputs/demo/mllm/model", help="unified model directory")
    p.add_argument("--data", default="data/shapes", help="shapes image folder (scripts/make_demo_data.py)")
    p.add_argument("--prompts", type=int, default=64, help="held-out captions to generate images for")
    p.add_argument("--question-images", type=int, default=80, help="held-out images whose questions are asked")
    p.add_argument("--cfg", type=float, default=None, help="default: the model's own (MLLMConfig.sampling)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: the model's own")
    p.add_argument("--top-k", type=int, default=None, help="default: the model's own")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's own")
    p.add_argument("--decoding", choices=["autoregressive", "jacobi"], default=None,
                   help="how image codes are decoded (mllm.sample.SamplingConfig.decoding); default: the model's own")
    p.add_argument("--window", type=int, default=None, help="codes per forward with --decoding jacobi")
    p.add_argument("--lenience", type=float, default=None, help="--decoding jacobi: > 1 keeps more drafts (lossy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/demo/score.json")
    p.add_argument("--grid-dir", default="outputs/demo", help="where the picture grids go")
    return p.parse_args(argv)


def _attrs(row: dict):
    from demo import shapes

    return shapes.ShapeAttrs(*(row[f] for f in ("shape", "colour", "size", "position", "background")))


def _for_display(images):
    """uint8 (B, 3, H, W) enlarged by a whole factor (nearest) to at least 96 px, so small pictures stay legible."""
    import torch.nn.functional as F

    factor = max(1, -(-96 // images.shape[-1]))
    return images if factor == 1 else F.interpolate(images, scale_factor=factor, mode="nearest")


def main(argv=None) -> None:
    args = parse_args(argv)
    meta = os.path.join(args.data, "test", "metadata.jsonl")
    if not os.path.isfile(meta):
        raise SystemExit(f"error: no held-out split at {meta}; run scripts/make_demo_data.py first")
    if not os.path.isdir(args.model):
        raise SystemExit(f"error: no model at {args.model}; run bash scripts/run_demo.sh first")
    import torch
    from PIL import Image

    from mllm.inference import answer_question, generate_images, image_grid, load_model, save_png, to_uint8
    from demo import shapes
    from vqrae.evaluate import build_eval_loader, eval_data_config, evaluate

    rows = [json.loads(line) for line in open(meta)]
    model = load_model(args.model)
    vq = model.vqrae
    t0 = time.time()

    # tokenizer over every held-out image, and what its codes keep: each picture decoded from its own codes and
    # read back from pixels, the ceiling for generated images judged the same way
    batches = list(build_eval_loader(eval_data_config(args.data, "test", vq.image_size), batch_size=50))
    tok = evaluate(vq, batches)
    with torch.no_grad():
        recon = torch.cat([vq(b.pixels).reconstruction.clamp(-1, 1) for b in batches])
    test_imgs = torch.cat([b.pixels for b in batches])
    kept = [rows[i] for b in batches for i in b.index.tolist()]
    recon_score = shapes.score(list(to_uint8(recon).permute(0, 2, 3, 1).numpy()), [_attrs(r) for r in kept])
    os.makedirs(args.grid_dir, exist_ok=True)
    grid = torch.cat([test_imgs[:8], recon[:8]])
    save_png(image_grid(_for_display(to_uint8(grid)), columns=8), os.path.join(args.grid_dir, "reconstructions.png"))

    # generation for held-out captions
    gen_rows = rows[: args.prompts]
    flags = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg,
                 decoding=args.decoding, window=args.window, lenience=args.lenience)
    sampling = model.sampling_config(**{k: v for k, v in flags.items() if v is not None})
    start = time.perf_counter()
    gen = generate_images(model, [r["caption"] for r in gen_rows], sampling, num_images=1, batch_size=32,
                          generator=torch.Generator().manual_seed(args.seed))
    gen_seconds = time.perf_counter() - start
    want = [_attrs(r) for r in gen_rows]
    gen_score = shapes.score(list(to_uint8(gen.images).permute(0, 2, 3, 1).numpy()), want)
    save_png(image_grid(_for_display(to_uint8(gen.images[:32])), columns=8), os.path.join(args.grid_dir, "generated.png"))
    with open(os.path.join(args.grid_dir, "generated_prompts.txt"), "w") as f:
        f.write("\n".join(r["caption"] for r in gen_rows[:32]) + "\n")

    # understanding: every question about held-out images
    per_kind: dict[str, list[int]] = {}
    for r in rows[: args.question_images]:
        img = Image.open(os.path.join(args.data, "test", r["file_name"])).convert("RGB")
        for qa in r["questions"]:
            got = answer_question(model, img, qa["question"], max_new_tokens=4).strip().lower()
            kind = next((k for k in ATTRIBUTES if str(r[k]).lower() == qa["answer"].lower()), "other")
            per_kind.setdefault(kind, []).append(int(got == qa["answer"].lower()))
    answers = [x for v in per_kind.values() for x in v]

    result = {
        "tokenizer": {"psnr": tok["psnr"], "codebook_usage_pct": tok["codebook_usage_pct"],
                      "perplexity": tok["perplexity"], "codebook_size": vq.codebook_size, "images": tok["count"],
                      "reconstruction_match": recon_score},
        "generation": {**gen_score, "prompts": len(gen_rows), "cfg": sampling.cfg_scale,
                       "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                       "decoding": sampling.decoding, "window": sampling.window, "lenience": sampling.lenience,
                       "seconds": gen_seconds},
        "understanding": {"accuracy": sum(answers) / max(1, len(answers)), "questions": len(answers),
                          **{k: sum(v) / len(v) for k, v in per_kind.items()}},
        "seconds": time.time() - t0,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    t, g, u = result["tokenizer"], result["generation"], result["understanding"]
    lines = [
        "| held-out split | metric | value |", "|---|---|---|",
        f"| tokenizer | PSNR (dB) | {t['psnr']:.2f} |",
        f"| tokenizer | codebook use (K={t['codebook_size']}) | {t['codebook_usage_pct']:.1f} % |",
        *[f"| tokenizer | reconstructions: {k} match | {100 * t['reconstruction_match'][k]:.1f} % |" for k in ("colour", "shape", "position", "size")],
        *[f"| generation ({g['prompts']} prompts) | {k} match | {100 * g[k]:.1f} % |" for k in ("colour", "shape", "position", "size", "all")],
        f"| understanding ({u['questions']} questions) | answer accuracy | {100 * u['accuracy']:.1f} % |",
        *[f"| understanding | {k} questions | {100 * v:.1f} % |" for k, v in u.items() if k not in ("accuracy", "questions")],
    ]
    print("\n".join(lines))
    print(f"scores written to {args.out}; grids in {args.grid_dir}")


if __name__ == "__main__":
    main()
