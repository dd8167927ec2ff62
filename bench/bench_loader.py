"""Tokenizer data loader throughput: images/s of decode + augment per CPU worker, and the workers a GPU needs.

Writes procedural images (smooth colour fields, shapes and noise, so that files compress like photos rather
than flat fills) as JPEG (quality 90) and PNG into a temporary ``imagefolder``, then reads them through
``vqrae.data.build_dataloader`` exactly as the tokenizer trainer does (``load_image`` with draft decoding,
``transform``: resize of the shortest side, random crop, flip, [-1, 1] tensor; ``collate_images``):

  in-process   ``ImageRows[i]`` one row after another in this process, one thread: wall-clock img/s, and
               img/s of the process's CPU time (the rate of one core no other process competes for)
  N workers    the DataLoader with ``num_workers`` = N (1 and 2 by default), one warm-up epoch (worker
               start-up) then timed epochs; img/s per worker = img/s / N

The last lines divide ``--gpu-img-per-s`` (the rate the training step consumes images) by the measured
per-worker rate of each format, and by the per-core CPU-time rate: the ``data.num_workers`` to set per GPU,
given that many free cores. On a shared machine the worker rates fall with the load; the CPU-time rate does not
(but leaves out the transfer of batches from the workers).

    python bench/bench_loader.py
    python bench/bench_loader.py --size 512 --gpu-img-per-s 2000 --workers 1 2 4 8
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from vqrae.data import DataConfig, ImageRows, build_dataloader, open_source  # noqa: E402


def procedural_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random colour field with a few shapes and mild noise, ``size`` x ``size`` RGB."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size, 2)
        r = int(rng.integers(size // 16, size // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
        else:
            draw.rectangle((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def write_folder(root: str, fmt: str, count: int, size: int) -> str:
    folder = os.path.join(root, fmt, "train")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(count):
        img = procedural_image(rng, size)
        path = os.path.join(folder, f"{i:05d}.{'jpg' if fmt == 'jpeg' else 'png'}")
        img.save(path, quality=90) if fmt == "jpeg" else img.save(path)
    return os.path.join(root, fmt)


def in_process(cfg: DataConfig, cache_dir: str) -> tuple[float, float]:
    """(img/s of wall time, img/s of this process's CPU time): the second is what one core does when no other
    process competes for it."""
    # One intra-op thread, as in a DataLoader worker: the [-1, 1] conversion of one image is too small to share,
    # and on a busy machine a thread pool makes it ten times slower.
    torch.set_num_threads(1)
    rows = ImageRows(open_source(cfg, cache_dir), cfg)
    rows[0]  # first-row costs (file open of the Arrow table, imports) are not per image
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(len(rows)):
        assert "pixels" in rows[i]
    return len(rows) / (time.perf_counter() - start), len(rows) / (time.process_time() - cpu)


def with_workers(cfg: DataConfig, cache_dir: str, batch_size: int, epochs: int) -> float:
    loader, _ = build_dataloader(cfg, batch_size, cache_dir=cache_dir)
    for _ in loader:  # warm-up epoch: worker start-up
        pass
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images += len(batch)
    rate = images / (time.perf_counter() - start)
    del loader  # persistent workers end here
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384, help="files per format")
    p.add_argument("--size", type=int, default=256, help="side of the written images")
    p.add_argument("--resolution", type=int, default=256, help="crop side (data.resolution)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--formats", nargs="+", default=["jpeg", "png"], choices=["jpeg", "png"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per worker count")
    p.add_argument("--gpu-img-per-s", type=float, default=1000.0, help="images/s one GPU's training step consumes")
    args = p.parse_args()
    print(f"{args.images} images per format, {args.size} px written, {args.resolution} px crops, "
          f"{os.cpu_count()} CPUs visible", flush=True)
    per_worker, per_core = {}, {}
    print()
    print("| format | loader | img/s | img/s per worker |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for fmt in args.formats:
            source = write_folder(root, fmt, args.images, args.size)
            cache = os.path.join(root, f"cache_{fmt}")
            cfg = DataConfig(source=source, resolution=args.resolution)
            rate, per_core[fmt] = in_process(cfg, cache)
            print(f"| {fmt} | in-process (CPU time: {per_core[fmt]:.0f} img/s) | {rate:.0f} | {rate:.0f} |", flush=True)
            for n in args.workers:
                cfg = DataConfig(source=source, resolution=args.resolution, num_workers=n)
                rate = with_workers(cfg, cache, args.batch_size, args.epochs)
                per_worker[fmt, n] = rate / n
                print(f"| {fmt} | {n} worker{'s' if n > 1 else ''} | {rate:.0f} | {rate / n:.0f} |", flush=True)
    print()
    for fmt in args.formats:
        rate = per_worker[fmt, min(args.workers)]  # fewest workers: the least contended per-worker rate
        print(f"{fmt}: {args.gpu_img_per_s:.0f} img/s per GPU needs {math.ceil(args.gpu_img_per_s / rate)} workers "
              f"at the measured {rate:.0f} img/s per worker ({min(args.workers)}-worker loader), "
              f"{math.ceil(args.gpu_img_per_s / per_core[fmt])} at {per_core[fmt]:.0f} img/s per free core (CPU time)")


if __name__ == "__main__":
    main()
