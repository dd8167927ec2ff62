"""Reconstruction evaluation of a tokenizer over a fixed image set.

Protocol (also printed by ``scripts/eval_tokenizer.py --help``):

- every image of the split, in order: shortest side resized to R (bicubic, antialiased), center crop R x R,
  no flip, pixels in [-1, 1];
- the model reconstructs it and the reconstruction is clamped to [-1, 1];
- the input is brought to the decoder's output resolution (unchanged when R equals it) and PSNR, SSIM
  (data range 1 on [0, 1] images) and LPIPS are computed per image and averaged over the set;
- rFID is the Frechet Inception distance between the whole set of inputs and the whole set of
  reconstructions, both at the decoder resolution and quantised to uint8 as saved images would be;
- code use is the percentage of the K codes that occur at least once over the whole set, and perplexity is
  exp(entropy) of that set's code histogram;
- images/s counts only the model's forward pass (encode, quantize, decode), synchronised on a GPU.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Iterable

import datasets
import torch
from torch.utils.data import DataLoader

from .data import DataConfig, ImageBatch, ImageRows, collate_images, open_source
from .losses import PerceptualLoss
from .metrics import FIDMetric, ReconstructionMetrics
from .losses import match_size


def eval_data_config(source: str, split: str, resolution: int, num_workers: int = 0) -> DataConfig:
    """The evaluation transform: center crop, no flip (see the module docstring)."""
    return DataConfig(source=source, split=split, resolution=resolution, random_crop=False, hflip=False,
                      num_workers=num_workers)


def build_eval_loader(cfg: DataConfig, batch_size: int, limit: int | None = None) -> DataLoader:
    """Every row of the split once, in order, the last batch possibly short (unlike the training loader,
    which shuffles and drops it). ``limit`` keeps the first N rows."""
    rows = open_source(cfg)
    if isinstance(rows, datasets.IterableDataset):
        raise ValueError("evaluation reads a whole split in order; use a non-streaming source")
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return DataLoader(ImageRows(rows, cfg), batch_size=batch_size, shuffle=False, num_workers=cfg.num_workers,
                      collate_fn=collate_images)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[ImageBatch | torch.Tensor],
    perceptual: PerceptualLoss | None = None,
    fid: FIDMetric | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Reconstruct every image the loader yields and measure the set.

    Args:
        model: a ``VQRAE`` (anything with ``image_size``, ``codebook_size`` and a forward returning
            ``reconstruction`` and ``indices``), already on its device.
        loader: ``ImageBatch`` objects (``build_eval_loader``) or plain (B, 3, H, W) tensors in [-1, 1].
        perceptual: LPIPS module on the model's device; None leaves ``lpips`` out (None in the result).
        fid: Inception FID accumulator on the model's device; None leaves ``rfid`` out (None in the result).
        dtype: autocast dtype of the forward pass; float32 runs without autocast.
        progress: called with the number of images after each batch.

    Returns a dict: count, psnr, ssim, lpips, rfid, codebook_usage_pct, perplexity, images_per_s, skipped
    (rows that could not be decoded) and data_stats (every row's load status).
    """
    device = next(model.parameters()).device
    metrics = ReconstructionMetrics(codebook_size=model.codebook_size, perceptual=perceptual)
    stats: Counter = Counter()
    forward_s, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if isinstance(batch, ImageBatch):
                stats.update(batch.data_stats)
                images = batch.pixels
            else:
                images = batch
            if images.shape[0] == 0:  # every row of this batch was unreadable
                continue
            images = images.to(device, non_blocking=True)
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(images)
            recon = out.reconstruction.float().clamp(-1.0, 1.0)
            _sync(device)
            forward_s += time.perf_counter() - start
            target = match_size(images.float(), model.image_size)
            metrics.update(recon, target, out.indices)
            if fid is not None:
                fid.update(target, real=True)
                fid.update(recon, real=False)
            count += images.shape[0]
            if progress is not None:
                progress(images.shape[0])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"no readable images to evaluate (row status: {dict(stats) or 'no rows'})")
    res = metrics.compute()
    return {
        "count": res["count"],
        "psnr": res["psnr"],
        "ssim": res["ssim"],
        "lpips": res.get("lpips"),
        "rfid": fid.compute() if fid is not None else None,
        "codebook_usage_pct": 100.0 * res["codebook_usage"],
        "perplexity": res["perplexity"],
        "images_per_s": count / max(forward_s, 1e-9),
        "skipped": sum(n for k, n in stats.items() if k != "ok" and not k.startswith("converted")),
        "data_stats": dict(stats),
    }
