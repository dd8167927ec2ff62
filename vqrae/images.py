"""Images from disk or a data set's cells: robust decoding to RGB and the square crops in [-1, 1] the models take.

Apart from ``vqrae.data`` (data sets, samplers, loaders) so that inference reads an image without loading
``datasets`` or pyarrow.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 100_000_000  # refuse larger images: decoding one would take gigabytes


def _failure(err: Exception) -> str:
    return "truncated" if isinstance(err, EOFError) or "truncat" in str(err).lower() else "corrupt"


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        # 16-bit modes span 0..65535; 32-bit "I"/"F" carry no range, so guess it from the data.
        peak = 65535.0 if mode.startswith("I;16") or a.max() > 255 else (1.0 if a.max() <= 1 else 255.0)
        return Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def load_image(
    value: Any, min_side: int = 8, max_pixels: int = MAX_PIXELS, draft_side: int | None = None
) -> tuple[Image.Image | None, str]:
    """Decode bytes, a path, a PIL image or a ``{"bytes", "path"}`` dict to RGB, never raising.

    Args:
        value: the image as stored in a dataset row.
        min_side: smaller images are rejected as ``"too_small"``.
        max_pixels: larger images are rejected as ``"too_large"`` before their pixels are decoded.
        draft_side: when given, big images are decoded/reduced to a shortest side of at least this.

    Returns ``(image, status)``: ``"ok"``, ``"converted_<mode>"`` for a non-RGB source, or with image ``None``
    ``"missing"``, ``"empty"``, ``"not_an_image"``, ``"truncated"``, ``"corrupt"``, ``"too_small"``, ``"too_large"``.
    """
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (str, os.PathLike)):
        if not os.path.isfile(value):
            return None, "missing"
        nbytes = os.path.getsize(value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        nbytes, value = len(value), io.BytesIO(value)
    elif isinstance(value, Image.Image):
        nbytes = 1
    else:
        return None, "missing" if value is None else "not_an_image"
    if nbytes == 0:
        return None, "empty"
    if isinstance(value, Image.Image):
        img = value
    else:
        try:
            with warnings.catch_warnings():
                # The size is checked against max_pixels below; PIL's own warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(value)
        except Image.DecompressionBombError:
            return None, "too_large"
        except UnidentifiedImageError:
            return None, "not_an_image"
        except Exception as err:  # plugins raise many types on malformed headers
            return None, _failure(err)
    w, h = img.size
    if w * h > max_pixels:
        return None, "too_large"
    if min(w, h) < min_side:
        return None, "too_small"
    mode = img.mode
    try:
        if draft_side and min(w, h) >= 2 * draft_side:
            scale = draft_side / min(w, h)
            img.draft(None, (int(w * scale) + 1, int(h * scale) + 1))  # JPEG decodes at 1/2..1/8 scale
        img.load()
        img = _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError:
        return None, "too_large"
    except Exception as err:
        return None, _failure(err)
    if draft_side and min(img.size) >= 2 * draft_side:
        img = img.reduce(min(img.size) // draft_side)  # box filter: cheap and alias-free
    return img, "ok" if mode == "RGB" else f"converted_{mode}"


def center_view(img: Image.Image, resolution: int) -> torch.Tensor:
    """The deterministic view of ``transform`` (center crop, no flip) that evaluation, inference and pre-computed
    codes use -> (3, R, R) in [-1, 1]."""
    return transform(img, resolution, random_crop=False, hflip=False, rng=None)


def transform(
    img: Image.Image, resolution: int, random_crop: bool, hflip: bool, rng: Optional[np.random.Generator]
) -> torch.Tensor:
    """Shortest side to ``resolution`` (bicubic, antialiased), square crop, optional flip -> (3, R, R) in [-1, 1]."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if random_crop:
        x, y = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
    else:
        x, y = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((x, y, x + resolution, y + resolution))
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, R, R)
    return pixels.float().div(127.5).sub(1.0)
