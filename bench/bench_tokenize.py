"""Tokenizing images: ``VQRAE.tokenize`` (encoder forward + projection + nearest-code search) against the encoder
forward alone, on the same model, images and precision in one process (interleaved repeats, medians).

What ``scripts/tokenize_dataset.py`` pays on top of the encoder is the overhead column; the goal is <= 10 %.

    python bench/bench_tokenize.py --threads 1                                  # tiny model on a CPU
    python bench/bench_tokenize.py --preset so400m --device cuda --dtype bfloat16 --batch 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from vqrae import VQRAE, DecoderConfig, EncoderConfig, QuantizerConfig, VQRAEConfig  # noqa: E402
from vqrae.runtime.precision import COMPUTE_DTYPES, autocast  # noqa: E402

PRESETS = {  # (timm name, image size, model kwargs, K, e, batch)
    "tiny": ("vit_so400m_patch16_siglip_256", 64, dict(patch_size=8, embed_dim=128, depth=4, num_heads=4), 4096, 256, 16),
    "so400m": ("vit_so400m_patch16_siglip_256", 256, {}, 16384, 1536, 64),  # the paper's tokenizer, random weights
}


def build(preset: str, device: torch.device) -> tuple[VQRAE, int, int]:
    name, size, kwargs, k, e, batch = PRESETS[preset]
    cfg = VQRAEConfig(
        encoder=EncoderConfig(backend="timm", name=name, pretrained=False, image_size=size, model_kwargs=kwargs),
        quantizer=QuantizerConfig(codebook_size=k, codebook_dim=e),
        decoder=DecoderConfig(depth=1, image_size=size, patch_size=kwargs.get("patch_size", 16)),  # never run here
    )
    return VQRAE(cfg).to(device).eval(), size, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="encoder autocast dtype")
    p.add_argument("--batch", type=int, default=None, help="images per call; default: the preset's")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads; default: torch's choice")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, size, batch = build(args.preset, device)
    batch = args.batch or batch
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    precision = {v: k for k, v in COMPUTE_DTYPES.items()}[getattr(torch, args.dtype)]

    def encoder_only():
        return model.encoder(images)

    def tokenize():
        return model.tokenize(images)

    fns = {"encoder": encoder_only, "tokenize": tokenize}
    times = {k: [] for k in fns}
    with torch.inference_mode(), autocast(precision, device):
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    enc, tok = (statistics.median(times[k]) for k in ("encoder", "tokenize"))
    print(f"preset={args.preset} device={device} dtype={args.dtype} batch={batch} threads={torch.get_num_threads()} "
          f"K={model.codebook_size} tokens/image={model.num_tokens}")
    print("| encoder only (img/s) | tokenize (img/s) | tokenize / encoder | search overhead |")
    print("|---|---|---|---|")
    print(f"| {batch / enc:.1f} | {batch / tok:.1f} | {enc / tok:.3f} | {100 * (tok - enc) / enc:.1f} % |")


if __name__ == "__main__":
    main()
