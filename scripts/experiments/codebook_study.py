"""Codebook study: SimVQ against a plain learned codebook, trained alone on frozen features.

For every codebook dimension e and size K, both quantizers (``vqrae.quantizer.SimVQ`` and ``VectorQuantizer``,
the modules the tokenizer builds) start from the same seed, hence the same projections and the same effective
codebook (SimVQ's W starts at the identity), and see the same batches with the same optimizer. There is no
decoder: the target is the input feature itself,

    loss = MSE(proj_out(q), x) + codebook_weight * ||sg(z) - q||^2 + commit_weight * ||z - sg(q)||^2

with the tokenizer's default weights (1.0, 0.25). Like the tokenizer's training, each quantizer is first
calibrated with the per-channel mean and std of the training features. After training, a held-out set of features is quantized and
the table reports the % of the K codes it uses, the perplexity of its code histogram and its reconstruction
MSE (features are LayerNorm outputs with unit variance per token, so predicting zero scores 1.0).

Features (``--features``), generated offline from the seed, D=256, standardised per token like a LayerNorm:
  mixture  (default) a mixture of 65536 Gaussians whose centres span a 32-dim subspace of R^256, plus
           isotropic noise; train and held-out tokens are separate draws.
  images   patch tokens (64 per image) of a fixed, randomly initialised ViT (timm, 4 blocks, p8, 64 px) over
           procedural images: a colour gradient with sinusoidal gratings and one to three shapes of
           ``vqrae.shapes`` pasted at random offsets; held-out tokens come from other images. A random ViT
           keeps little of the images' variety: these tokens have only about 5 effective dimensions (the
           participation ratio of their covariance spectrum), far fewer than a pretrained encoder's.

    python scripts/experiments/codebook_study.py                      # CPU default: ~15 min on 2 shared cores
    python scripts/experiments/codebook_study.py --steps 2000 --tokens 8192 --heldout 131072 --device cuda
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vqrae.encoder import EncoderConfig, VFMEncoder  # noqa: E402
from vqrae.losses import LossConfig  # noqa: E402
from vqrae.metrics import CodebookUsage  # noqa: E402
from vqrae.quantizer import SimVQ, VectorQuantizer  # noqa: E402
from vqrae.shapes import BACKGROUNDS, render, sample_attrs  # noqa: E402

FEATURE_DIM = 256
IMAGE_SIZE, RENDER_SIZE = 64, 80
QUANTIZERS = {"SimVQ": SimVQ, "VQ": VectorQuantizer}


def procedural_images(n: int, seed: int) -> torch.Tensor:
    """n images (n, 3, 64, 64) in [-1, 1]: a colour gradient with one or two sinusoidal gratings, and one to
    three shapes from ``vqrae.shapes`` pasted on top (each from an 80 px render, shifted by up to 16 px)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(n):
        c0, c1, angle = rng.random(3), rng.random(3), rng.random() * 2 * np.pi
        t = np.cos(angle) * xx + np.sin(angle) * yy
        img = c0 + (c1 - c0) * ((t - t.min()) / np.ptp(t))[..., None]
        for _ in range(rng.integers(1, 3)):
            freq, angle, phase = rng.uniform(1, 10), rng.random() * 2 * np.pi, rng.random() * 2 * np.pi
            wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
            img = img + rng.uniform(0.05, 0.3) * wave[..., None] * (2 * rng.random(3) - 1)
        img = np.clip(img, 0.0, 1.0) * 255
        for _ in range(rng.integers(1, 4)):
            attrs = sample_attrs(pick, "any")
            x, y = rng.integers(0, RENDER_SIZE - IMAGE_SIZE + 1, 2)
            shape = np.asarray(render(attrs, RENDER_SIZE))[y : y + IMAGE_SIZE, x : x + IMAGE_SIZE]
            mask = np.any(shape != np.array(BACKGROUNDS[attrs.background]), axis=-1)
            img[mask] = shape[mask]
        out[i] = img.astype(np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def image_features(train_images: int, heldout_tokens: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(train tokens, held-out tokens), each (N, 256): patch tokens of a fixed random ViT over procedural images."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning: a fixed random network is the point here
        vit = VFMEncoder(EncoderConfig(
            backend="timm", name="vit_so400m_patch16_siglip_256", pretrained=False, image_size=IMAGE_SIZE,
            model_kwargs=dict(patch_size=8, embed_dim=FEATURE_DIM, depth=4, num_heads=4, mlp_ratio=4.0),
        )).to(device).eval()
    per_image = vit.grid_size**2

    def encode(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([vit(b.to(device)).reshape(-1, FEATURE_DIM) for b in images.split(256)])

    train = encode(procedural_images(train_images, seed))
    heldout = encode(procedural_images(-(-heldout_tokens // per_image), seed + 1))[:heldout_tokens]
    return train, heldout


@torch.no_grad()
def mixture_features(train_tokens: int, heldout_tokens: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) draws from a mixture of 65536 Gaussians whose centres span a 32-dim subspace of
    R^256, within-cluster noise 0.3 per dim, then standardised per token as a LayerNorm would."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(FEATURE_DIM, 32, generator=g) / 32**0.5
    centres = torch.randn(65536, 32, generator=g) @ basis.T

    def draw(n: int) -> torch.Tensor:
        x = centres[torch.randint(0, centres.shape[0], (n,), generator=g)] + 0.3 * torch.randn(n, FEATURE_DIM, generator=g)
        return ((x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)).to(device)

    return draw(train_tokens), draw(heldout_tokens)


def train_cell(kind: str, codebook_size: int, dim: int, train: torch.Tensor, args) -> torch.nn.Module:
    torch.manual_seed(args.seed)  # same projections and the same starting codebook for both kinds
    quantizer = QUANTIZERS[kind](FEATURE_DIM, codebook_size, dim, search_chunk=4096, token_chunk=65536)
    quantizer = quantizer.to(train.device)
    quantizer.calibrate(train.mean(0), train.std(0))  # as the tokenizer's training does before step 0
    loss_cfg = LossConfig()
    opt = torch.optim.AdamW([p for p in quantizer.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(args.seed)  # same batches for every cell
    for _ in range(args.steps):
        x = train[torch.randint(0, train.shape[0], (args.tokens,), generator=order).to(train.device)]
        out = quantizer(x.unsqueeze(0))
        loss = (F.mse_loss(out.quantized.squeeze(0), x) + loss_cfg.codebook_weight * out.codebook_loss
                + loss_cfg.commit_weight * out.commit_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return quantizer


@torch.no_grad()
def measure(quantizer: torch.nn.Module, features: torch.Tensor, codebook_size: int) -> dict:
    usage = CodebookUsage(codebook_size, window=1)
    indices, sq_err = [], 0.0
    for x in features.split(8192):
        out = quantizer(x.unsqueeze(0))
        indices.append(out.indices.flatten())
        sq_err += F.mse_loss(out.quantized.squeeze(0), x, reduction="sum").item()
    usage.update(torch.cat(indices))  # one window holding the whole held-out set
    return {"usage_pct": 100 * usage.usage(), "perplexity": usage.perplexity(), "mse": sq_err / features.numel()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="64,384,1536", help="codebook dimensions e")
    p.add_argument("--sizes", default="4096,16384", help="codebook sizes K")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per cell")
    p.add_argument("--tokens", type=int, default=512, help="feature tokens per step")
    p.add_argument("--features", default="mixture", choices=["mixture", "images"], help="see the docstring")
    p.add_argument("--train-images", type=int, default=1024, help="images behind the training tokens (64 each)")
    p.add_argument("--heldout", type=int, default=16384, help="held-out tokens measured after training")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, the same for every cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dims, sizes = [int(v) for v in args.dims.split(",")], [int(v) for v in args.sizes.split(",")]

    start = time.time()
    if args.features == "images":
        train, heldout = image_features(args.train_images, args.heldout, args.seed, device)
    else:
        train, heldout = mixture_features(64 * args.train_images, args.heldout, args.seed, device)
    print(f"{args.features} features: {train.shape[0]} train / {heldout.shape[0]} held-out tokens, D={FEATURE_DIM} "
          f"({time.time() - start:.0f}s); {args.steps} steps x {args.tokens} tokens, AdamW lr {args.lr}", flush=True)
    rows = []
    for k in sizes:
        for e in dims:
            torch.manual_seed(args.seed)  # the starting point both kinds share (see train_cell)
            start_point = SimVQ(FEATURE_DIM, k, e).to(device)
            start_point.calibrate(train.mean(0), train.std(0))
            cell = {"init": measure(start_point, heldout, k)}
            for kind in QUANTIZERS:
                t0 = time.time()
                cell[kind] = measure(train_cell(kind, k, e, train, args), heldout, k)
                print(f"  K={k} e={e} {kind}: {cell[kind]} ({time.time() - t0:.0f}s)", flush=True)
            rows.append((k, e, cell))

    ceiling = lambda k: 100 * (1 - (1 - 1 / k) ** heldout.shape[0])  # noqa: E731
    print(f"\n{heldout.shape[0]} held-out tokens; total {time.time() - start:.0f}s\n")
    print("| K | e | use % at step 0 (both) | SimVQ use % | VQ use % | SimVQ perplexity | VQ perplexity | SimVQ MSE | VQ MSE "
          "| uniform-use ceiling % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, e, c in rows:
        s, v = c["SimVQ"], c["VQ"]
        print(f"| {k} | {e} | {c['init']['usage_pct']:.1f} | {s['usage_pct']:.1f} | {v['usage_pct']:.1f} | {s['perplexity']:.0f} "
              f"| {v['perplexity']:.0f} | {s['mse']:.4f} | {v['mse']:.4f} | {ceiling(k):.1f} |")


if __name__ == "__main__":
    main()
