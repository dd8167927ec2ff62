"""Evaluate a VQRAE tokenizer's reconstructions: PSNR, SSIM, LPIPS, rFID, code use, perplexity, images/s.

    python scripts/eval_tokenizer.py --model outputs/tokenizer/model --data imagenet-1k --split validation \\
        --resolution 256 --inception-weights weights-inception-2015-12-05-6726825d.safetensors --out metrics.json
    python scripts/eval_tokenizer.py --model M --data path/to/imagefolder --split test --no-fid --lpips-backbone random

Protocol: every image of the split once, shortest side resized to R (bicubic, antialiased), center crop, no
flip; reconstructions clamped to [-1, 1]; PSNR/SSIM/LPIPS per image at the decoder's output resolution (the
input is resized to it when R differs), averaged; rFID between the whole set of inputs and the whole set of
reconstructions at that resolution; code use % and perplexity over the whole set. LPIPS uses the AlexNet
trunk by default (the lpips package's recommended metric; --lpips-net vgg for the training loss's trunk).
Paper reference, VQRAE-SigLIP2 on ImageNet-1k 256 px val (50k images): rFID 1.31, PSNR 22.23, SSIM 0.762.

Nothing is downloaded: LPIPS "pretrained" reads torchvision weights from the torch hub cache, and rFID needs
torch-fidelity's Inception weights (--inception-weights or the hub cache) unless --no-fid is given. Missing
weights end the run with a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PAPER = {"rfid": 1.31, "psnr": 22.23, "ssim": 0.762}  # VQRAE-SigLIP2, ImageNet-1k 256 val 50k
ROWS = [  # key, label, format
    ("psnr", "PSNR (dB)", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("lpips", "LPIPS", "{:.4f}"),
    ("rfid", "rFID", "{:.2f}"),
    ("codebook_usage_pct", "codebook use (%)", "{:.2f}"),
    ("perplexity", "perplexity", "{:.1f}"),
    ("images_per_s", "images/s (forward)", "{:.1f}"),
    ("count", "images", "{}"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a save_pretrained directory (config.yaml + model.safetensors)")
    p.add_argument("--data", required=True, help="imagefolder directory, .tar shards or hub dataset id")
    p.add_argument("--split", default="test")
    p.add_argument("--resolution", type=int, default=None, help="crop side R (default: the decoder's output size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--lpips-backbone", default="pretrained", help="pretrained | random | PATH to a trunk state dict")
    p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg", "squeeze"])
    p.add_argument("--inception-weights", default=None, help="torch-fidelity pt_inception-2015-12-05 weights as .safetensors (pickles are refused)")
    p.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception weights needed)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="forward-pass autocast dtype")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _fmt(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vqrae.evaluate import build_eval_loader, eval_data_config, evaluate
    from vqrae.losses import PerceptualLoss
    from vqrae.metrics import FIDMetric
    from vqrae.model import VQRAE

    device = torch.device(args.device)
    # Everything that can fail for a missing file or weight is set up before the long loop starts.
    try:
        fid = None if args.no_fid else FIDMetric(args.inception_weights).to(device)
        try:
            perceptual = PerceptualLoss(args.lpips_net, args.lpips_backbone).to(device)
        except ValueError as e:  # the loss names its config key; here the user sets it with a flag
            raise ValueError(str(e).replace("lpips_backbone", "--lpips-backbone")) from None
        model = VQRAE.from_pretrained(args.model, map_location=device).to(device)
        resolution = args.resolution or model.image_size
        data_cfg = eval_data_config(args.data, args.split, resolution, args.num_workers)
        loader = build_eval_loader(data_cfg, args.batch_size, args.limit)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    with tqdm(total=len(loader.dataset), unit="img", disable=not sys.stderr.isatty()) as bar:
        res = evaluate(model, loader, perceptual=perceptual, fid=fid, dtype=getattr(torch, args.dtype),
                       progress=bar.update)
    res["protocol"] = {
        "model": args.model, "data": args.data, "split": args.split, "resolution": resolution,
        "decoder_resolution": model.image_size, "crop": "center", "flip": False, "clamp": [-1, 1],
        "lpips": f"{args.lpips_net}/{args.lpips_backbone}", "dtype": args.dtype, "limit": args.limit,
    }

    print(f"| metric | {os.path.basename(os.path.normpath(args.model))} | paper (ImageNet 256 val) |")
    print("|---|---|---|")
    for key, label, fmt in ROWS:
        print(f"| {label} | {_fmt(fmt, res[key])} | {_fmt(fmt, PAPER.get(key))} |")
    if res["skipped"]:
        print(f"{res['skipped']} unreadable images skipped: {res['data_stats']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            # non-finite values (PSNR of a perfect reconstruction) are written as strings: JSON has no inf
            json.dump({k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.items()},
                      f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
