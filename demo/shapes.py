"""Procedurally drawn demo data: one coloured shape per image, with captions, questions and a scorer.

Each image shows one of 6 shapes in one of 8 colours, small or large, centred in one cell of a 3x3 grid,
on a black or gray background. Pictures are ``IMAGE_SIZE`` (48) pixels square, so a grid cell is 16 pixels:
2x2 patches of the demo tokenizer's 8-pixel patches. A shape is then cut into the same four patches wherever
it sits, and a model that has seen a red star in one cell has seen the very patches it needs in any other.
The test split holds attribute combinations that never appear in training, so it measures whether a model
composes attributes it has seen separately. Two schemes (``HELD_OUT``):

- ``"placements"`` (the default): every colour-shape pair loses one position of the grid, 48 (colour, shape,
  position) triples in all. Each test picture shows a pair seen elsewhere, at a place where it never was.
- ``"pairs"``: every colour loses one shape, 8 (colour, shape) pairs in all, never seen anywhere in
  training. Harder: a model must draw, say, a red circle having seen red only on other shapes.

``classify`` reads the attributes back from pixels, so generated or reconstructed images can be scored
without any learned model.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {  # every pair at least ~127 apart in RGB, and far from both backgrounds
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 200, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "purple": (160, 32, 240),
    "white": (255, 255, 255),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = {"small": 0.75, "large": 0.95}  # shape extent as a fraction of a grid cell; large stays inside its cell
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_WHERE = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}  # fmt: skip
# Held-out combinations, as tuples of (colour, shape[, position]). "pairs": each colour loses exactly one
# shape. "placements": each colour-shape pair loses one position, spread so that every colour loses 6
# distinct positions and every shape 8. Either way every colour, shape and position occurs in training.
HELD_OUT = {
    "placements": frozenset(
        (c, s, POSITIONS[(ci + 4 * si) % len(POSITIONS)]) for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES)
    ),
    "pairs": frozenset((c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOURS)),
}
IMAGE_SIZE = 48  # a multiple of 3 x the demo tokenizer's patch size (8): grid cells align with patches
_VERSION = 4  # bump when rendering or metadata change, so cached image folders are rewritten


@dataclass(frozen=True)
class ShapeAttrs:
    shape: str
    colour: str
    size: str  # "small" | "large"
    position: str  # one of POSITIONS
    background: str


def _scheme(held_out: str) -> frozenset:
    """``HELD_OUT[held_out]``, or a one-line error naming the schemes."""
    if held_out not in HELD_OUT:
        raise ValueError(f"held_out must be one of {sorted(HELD_OUT)}, not {held_out!r}")
    return HELD_OUT[held_out]


def held_out_key(attrs: ShapeAttrs, held_out: str = "placements") -> tuple[str, ...]:
    """The part of ``attrs`` that scheme ``held_out`` holds out: (colour, shape[, position])."""
    _scheme(held_out)
    return (attrs.colour, attrs.shape, attrs.position) if held_out == "placements" else (attrs.colour, attrs.shape)


def sample_attrs(rng: random.Random, split: str = "train", held_out: str = "placements") -> ShapeAttrs:
    """Random attributes: ``"train"`` avoids the combinations ``HELD_OUT[held_out]`` names, ``"test"`` uses only
    them (uniformly), ``"any"`` ignores them."""
    held = _scheme(held_out)
    if split not in ("train", "test", "any"):
        raise ValueError(f"split must be train, test or any, not {split!r}")
    if split == "test":
        colour, shape, *where = rng.choice(sorted(held))
        position = where[0] if where else rng.choice(POSITIONS)
        return ShapeAttrs(shape, colour, rng.choice(list(SIZES)), position, rng.choice(list(BACKGROUNDS)))
    while True:
        attrs = ShapeAttrs(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)),
                           rng.choice(POSITIONS), rng.choice(list(BACKGROUNDS)))
        if split == "any" or held_out_key(attrs, held_out) not in held:
            return attrs


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # apex up, filling its bounding square
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":  # five points, inner radius 0.45 of the outer
        return [
            (cx + rad * math.cos(a), cy + rad * math.sin(a))
            for k in range(10)
            for rad, a in [(r if k % 2 == 0 else 0.45 * r, -math.pi / 2 + k * math.pi / 5)]
        ]
    if shape == "cross":  # arms 0.6 r wide
        t = 0.3 * r
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def render(attrs: ShapeAttrs, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``attrs`` on a ``size`` x ``size`` RGB image (no anti-aliasing)."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[attrs.background])
    cell = size / 3
    row, col = divmod(POSITIONS.index(attrs.position), 3)
    cx, cy, r = (col + 0.5) * cell, (row + 0.5) * cell, SIZES[attrs.size] * cell / 2
    draw, fill = ImageDraw.Draw(img), COLOURS[attrs.colour]
    if attrs.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_outline(attrs.shape, cx, cy, r), fill=fill)
    return img


_TEMPLATES = (
    "a {size} {colour} {shape} {where} on a {background} background",
    "a {background} background with a {size} {colour} {shape} {where}",
    "{size} {colour} {shape}, {position}, {background} background",
    "there is a {size} {colour} {shape} {where} of the picture, on a {background} background",
)


def caption(attrs: ShapeAttrs, rng: random.Random | None = None) -> str:
    """Describe every attribute; ``rng`` picks one of a few phrasings (the first without it)."""
    template = rng.choice(_TEMPLATES) if rng is not None else _TEMPLATES[0]
    return template.format(where=_WHERE[attrs.position], **asdict(attrs))


def questions(attrs: ShapeAttrs) -> list[tuple[str, str]]:
    return [
        ("What colour is the shape?", attrs.colour),
        ("What shape is it?", attrs.shape),
        ("Where is the shape?", attrs.position),
        ("How big is the shape?", attrs.size),
        ("What colour is the background?", attrs.background),
    ]


def write_imagefolder(
    out_dir: str, num_train: int, num_test: int, seed: int = 0, size: int = IMAGE_SIZE, held_out: str = "placements"
) -> dict:
    """Write ``train/`` and ``test/`` PNGs with ``metadata.jsonl`` for ``load_dataset("imagefolder")``; the test
    split holds the combinations of scheme ``held_out`` (see ``HELD_OUT``) and the training split none of them.

    Returns the manifest (the arguments), also saved as ``shapes.json``; a folder whose manifest matches
    is left as it is.
    """
    _scheme(held_out)
    manifest = {"version": _VERSION, "num_train": num_train, "num_test": num_test, "seed": seed, "size": size,
                "held_out": held_out}
    path = os.path.join(out_dir, "shapes.json")
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) == manifest:
                return manifest
        os.remove(path)
        for split in ("train", "test"):
            shutil.rmtree(os.path.join(out_dir, split), ignore_errors=True)
    for split, n in (("train", num_train), ("test", num_test)):
        folder = os.path.join(out_dir, split)
        if os.path.isdir(folder) and os.listdir(folder):
            raise FileExistsError(f"{folder} exists and was not written by write_imagefolder")
        os.makedirs(folder, exist_ok=True)
        rng = random.Random(f"shapes-{split}-{seed}")
        with open(os.path.join(folder, "metadata.jsonl"), "w") as meta:
            for i in range(n):
                attrs = sample_attrs(rng, split, held_out)
                name = f"{i:06d}.png"
                render(attrs, size).save(os.path.join(folder, name))
                # a random order per image: in a fixed order a model learns "first answer = colour" and never
                # reads the question, then answers every single question asked at inference with a colour
                qa = [{"question": q, "answer": a} for q, a in rng.sample(questions(attrs), k=len(questions(attrs)))]
                row = {"file_name": name, "caption": caption(attrs, rng), **asdict(attrs), "questions": qa}
                meta.write(json.dumps(row) + "\n")
    with open(path, "w") as f:  # written last: an interrupted run is redone
        json.dump(manifest, f)
    return manifest


# ----------------------------------------------------------------------------- scoring


_WORK_SIZE = 64  # images are scored at this size: features are scale-free and prototypes are made once
_PROTO_SIZES = (32, 48, 64, 96, 256)  # prototype drawing sizes: resampling changes edges a little


def _working_image(img: Any) -> Image.Image:
    """RGB at the working size from PIL, a uint8 (H, W, 3) array, or a (3, H, W) tensor in [-1, 1]."""
    if hasattr(img, "detach"):
        img = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    img = img.convert("RGB")
    if img.size != (_WORK_SIZE, _WORK_SIZE):
        img = img.resize((_WORK_SIZE, _WORK_SIZE), Image.Resampling.BILINEAR)  # antialiased when shrinking
    return img


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda k: float(np.sum((rgb - np.array(palette[k])) ** 2)))


def _foreground(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background colour, distance map, mask): the border median is the background."""
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    dist = ndimage.median_filter(np.linalg.norm(a - bg, axis=2), size=3, mode="nearest")  # removes speckle
    peak = dist.max()
    if peak < 40:
        return bg, dist, np.zeros(dist.shape, bool)
    parts, n = ndimage.label(dist > 0.5 * peak)
    largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(dist), parts, range(1, n + 1))))
    return bg, dist, parts == largest


def _extent(mask: np.ndarray) -> float:
    """Longer side of the bounding box in grid cells."""
    ys, xs = np.nonzero(mask)
    return 3 * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / _WORK_SIZE


def _descriptor(mask: np.ndarray) -> np.ndarray:
    """Scale-free shape features: coverage of a 5x5 grid over the bounding box, and its aspect ratio."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    grid = Image.fromarray(box.astype(np.float32)).resize((5, 5), Image.Resampling.BOX)
    aspect = box.shape[1] / box.shape[0]
    return np.append(np.asarray(grid).ravel(), aspect)


@lru_cache(maxsize=1)
def _prototypes() -> tuple[np.ndarray, tuple[str, ...], dict[str, float]]:
    """Descriptors of every shape, size and position, sharp and blurred, and per shape the extent that
    separates small from large (blur erodes thin star points, so one threshold would not do)."""
    feats, labels, extents = [], [], {}
    for shape in SHAPES:
        for size in SIZES:
            for pos in POSITIONS:
                attrs = ShapeAttrs(shape, "white", size, pos, "black")
                for n in _PROTO_SIZES:  # resampled to the working size, as scored images are
                    img = _working_image(render(attrs, n))
                    for radius in (0.0, 1.0, 1.8):
                        blurred = img.filter(ImageFilter.GaussianBlur(radius))
                        mask = _foreground(np.asarray(blurred, dtype=np.float32))[2]
                        feats.append(_descriptor(mask))
                        labels.append(shape)
                        extents.setdefault((shape, size), []).append(_extent(mask))
    split = {s: (np.mean(extents[s, "small"]) + np.mean(extents[s, "large"])) / 2 for s in SHAPES}
    return np.stack(feats), tuple(labels), split


def classify(img: Any) -> ShapeAttrs:
    """Read the attributes back from pixels (PIL image, uint8 (H, W, 3) array, or (3, H, W) tensor in [-1, 1]).

    Background from the border, foreground where the colour is far from it, colour from the median of the
    foreground core, position and size from its bounding box, shape from the nearest prototype descriptor.
    Fields are ``"none"`` when no foreground is found.
    """
    a = np.asarray(_working_image(img), dtype=np.float32)
    bg, dist, mask = _foreground(a)
    background = _nearest(bg, BACKGROUNDS)
    if mask.sum() < 4:
        return ShapeAttrs("none", "none", "none", "none", background)
    core = dist > 0.75 * dist.max()  # away from the edges that blur mixes with the background
    colour = _nearest(np.median(a[core], axis=0), COLOURS)
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2  # bounding-box centre
    row, col = (min(2, int(3 * c / _WORK_SIZE)) for c in (cy, cx))
    feats, labels, split = _prototypes()
    shape = labels[int(np.argmin(((feats - _descriptor(mask)) ** 2).sum(axis=1)))]
    size = "large" if _extent(mask) > split[shape] else "small"
    return ShapeAttrs(shape, colour, size, POSITIONS[3 * row + col], background)


def score(images: Sequence[Any], attrs_list: Sequence[ShapeAttrs]) -> dict[str, float]:
    """Accuracy of ``classify`` per attribute, and ``"all"`` for shape, colour, size and position together."""
    if len(images) != len(attrs_list):
        raise ValueError(f"{len(images)} images but {len(attrs_list)} attribute sets")
    fields = ("shape", "colour", "size", "position", "background")
    hits = {f: 0 for f in (*fields, "all")}
    for img, want in zip(images, attrs_list):
        got = classify(img)
        for f in fields:
            hits[f] += getattr(got, f) == getattr(want, f)
        hits["all"] += all(getattr(got, f) == getattr(want, f) for f in fields[:4])
    return {f: n / max(1, len(images)) for f, n in hits.items()}
