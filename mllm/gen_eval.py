"""Text-to-image evaluation runs: prompt files, the output layouts the public evaluators read, resumable
seeded sampling, and distribution metrics of the generated images against a reference folder.

Layouts (``scripts/eval_generation.py --layout``):

- ``geneval``: GenEval's ``generation/diffusers_generate.py`` layout, read by its ``evaluation/evaluate_images.py``:
  one folder per prompt line of ``evaluation_metadata.jsonl``, ``<index:05d>/metadata.jsonl`` holding that line
  as given and ``<index:05d>/samples/<k:04d>.png`` its samples.
- ``dpg``: DPG-Bench (ELLA), read by ``dpg_bench/compute_dpg_bench.py``: one ``<item_id>.png`` per prompt file
  ``prompts/<item_id>.txt``, its 4 samples tiled 2 x 2 without padding (the evaluator cuts the grid into equal tiles).
- ``folder``: flat ``<index:05d>_<k:02d>.png`` images, e.g. for FID.

A prompt's images depend only on the model, the seed, the prompt's index and the batch size, so a resumed run
draws the ones a whole run would. A prompt counts as finished only once all of its files are in place: each is
written under a temporary name and renamed (a GenEval folder as a whole).
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

from vqrae.metrics import inception_weights_copy, inception_weights_path

LAYOUTS = ("geneval", "dpg", "folder")
DPG_SAMPLES = 4  # DPG-Bench's evaluator reads a 2 x 2 grid per prompt
RUN_FILE = "run.json"  # the model and settings an output folder was drawn with
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class PromptItem:
    index: int  # position in the prompt file
    name: str  # output name: "00042" (geneval, folder) or the DPG item id
    text: str  # the caption given to the model
    metadata: Optional[dict] = None  # GenEval: the prompt's line of evaluation_metadata.jsonl, written back as given


# ----------------------------------------------------------------------------- prompt files


def _text_of(row, where: str) -> str:
    text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} has no prompt text (a \"prompt\" field); fix or remove that row")
    return text.strip()


def read_prompts(path: str, layout: str) -> list[PromptItem]:
    """The prompts of ``path`` for ``layout``.

    - a ``.jsonl`` file: one JSON object per line with a ``prompt`` (or ``text``) field, e.g. GenEval's
      ``evaluation_metadata.jsonl``; for ``dpg`` an ``item_id`` (or ``id``) field names the output;
    - a folder of ``<item_id>.txt`` files (DPG-Bench's ``prompts/``), one prompt each;
    - any other file: one prompt per non-empty line.
    A row without text is a ``ValueError`` naming it.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no prompt file at '{path}'")
    items: list[PromptItem] = []
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.txt")))
        if not files:
            raise ValueError(f"prompt folder '{path}' holds no <item_id>.txt files")
        for i, f in enumerate(files):
            with open(f, encoding="utf-8") as fh:
                text = fh.read().strip()
            if not text:
                raise ValueError(f"prompt file {f} has no prompt text; fix or remove it")
            items.append(PromptItem(i, os.path.splitext(os.path.basename(f))[0], text))
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            lines = [(n + 1, line) for n, line in enumerate(fh) if line.strip()]
        for i, (n, line) in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not JSON ({e.msg})") from None
            text = _text_of(row, f"{path} line {n}")
            name = str(row.get("item_id", row.get("id", f"{i:05d}"))) if layout == "dpg" else f"{i:05d}"
            items.append(PromptItem(i, name, text, row))
    else:
        with open(path, encoding="utf-8") as fh:
            texts = [line.strip() for line in fh if line.strip()]
        items = [PromptItem(i, f"{i:05d}", t, {"prompt": t}) for i, t in enumerate(texts)]
    if not items:
        raise ValueError(f"prompt file '{path}' holds no prompts")
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        raise ValueError(f"prompt file '{path}' names an output twice ({sorted({n for n in names if names.count(n) > 1})[0]})")
    for it in items:
        if os.sep in it.name or it.name.startswith("."):
            raise ValueError(f"prompt item id '{it.name}' cannot name a file")
    return items


# ----------------------------------------------------------------------------- layouts


def tile_2x2(images: np.ndarray) -> np.ndarray:
    """4 uint8 images (4, H, W, 3) -> one (2H, 2W, 3) grid, row by row, no padding (DPG-Bench's layout)."""
    if images.shape[0] != DPG_SAMPLES:
        raise ValueError(f"a DPG-Bench grid takes {DPG_SAMPLES} images, got {images.shape[0]}")
    top, bottom = np.concatenate(images[:2], axis=1), np.concatenate(images[2:], axis=1)
    return np.concatenate([top, bottom], axis=0)


def _save(array: np.ndarray, path: str) -> None:
    """A uint8 (H, W, 3) image written to a temporary name beside ``path``, then renamed to it."""
    tmp = f"{path}.tmp.png"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def item_files(out_dir: str, item: PromptItem, layout: str, samples: int) -> list[str]:
    """The image files ``write_prompt`` writes for ``item``."""
    if layout == "geneval":
        return [os.path.join(out_dir, item.name, "samples", f"{k:04d}.png") for k in range(samples)]
    if layout == "dpg":
        return [os.path.join(out_dir, f"{item.name}.png")]
    return [os.path.join(out_dir, f"{item.name}_{k:02d}.png") for k in range(samples)]


def prompt_done(out_dir: str, item: PromptItem, layout: str, samples: int) -> bool:
    """Whether every file of ``item`` is in place (files appear only complete, by rename)."""
    files = item_files(out_dir, item, layout, samples)
    if layout == "geneval":
        files.append(os.path.join(out_dir, item.name, "metadata.jsonl"))
    return all(os.path.isfile(f) for f in files)


def write_prompt(out_dir: str, item: PromptItem, layout: str, images: np.ndarray) -> list[str]:
    """Write one prompt's uint8 images (n, H, W, 3) in ``layout``; returns the files written."""
    paths = item_files(out_dir, item, layout, len(images))
    if layout == "geneval":
        final = os.path.join(out_dir, item.name)
        tmp = tempfile.mkdtemp(prefix=f".{item.name}.", dir=out_dir)
        os.makedirs(os.path.join(tmp, "samples"))
        with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.write(json.dumps(item.metadata if item.metadata is not None else {"prompt": item.text}) + "\n")
        for k, img in enumerate(images):
            Image.fromarray(img).save(os.path.join(tmp, "samples", f"{k:04d}.png"), format="PNG")
        if os.path.isdir(final):  # an unfinished folder of an interrupted run
            shutil.rmtree(final)
        os.rename(tmp, final)
    elif layout == "dpg":
        _save(tile_2x2(images), paths[0])
    else:
        for img, path in zip(images, paths):
            _save(img, path)
    return paths


# ----------------------------------------------------------------------------- run identity


FINGERPRINT_WHOLE = 4 << 20  # files up to this size are hashed whole


def model_fingerprint(path: str) -> str:
    """blake2b of a model folder's file names, sizes and contents: small (config, tokenizer) files whole, large
    (weights) files through their first and last MiB and 16 blocks spread between, so retrained weights of the same
    shape count as another model without reading gigabytes; a hub id is its own fingerprint."""
    if not os.path.isdir(path):
        return path
    h = hashlib.blake2b(digest_size=16)
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            size = os.path.getsize(full)
            h.update(f"{os.path.relpath(full, path)}:{size}\n".encode())
            with open(full, "rb") as f:
                if size <= FINGERPRINT_WHOLE:
                    h.update(f.read())
                    continue
                for offset in [0, size - (1 << 20)] + [size * k // 17 for k in range(1, 17)]:
                    f.seek(offset)
                    h.update(f.read(1 << 20 if offset in (0, size - (1 << 20)) else 1 << 16))
    return h.hexdigest()


def claim_output(out_dir: str, record: dict) -> None:
    """Record which model and settings ``out_dir`` holds a run of; a folder holding another run is an error."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RUN_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        differ = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if differ:
            what = "another model's run" if "model_fingerprint" in differ else f"a run with other {', '.join(differ)}"
            raise ValueError(f"output folder {out_dir} holds {what} ({RUN_FILE}); pass another --output or delete it")
        return
    if any(n for n in os.listdir(out_dir) if not n.startswith(".")):
        raise ValueError(f"output folder {out_dir} is not empty and holds no {RUN_FILE}; pass another --output")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def run_prompts(
    items: Sequence[PromptItem],
    out_dir: str,
    layout: str,
    samples: int,
    seed: int,
    draw: Callable[[str, int, torch.Generator], torch.Tensor],
    log: Callable[[str], None] = lambda s: None,
) -> tuple[int, int]:
    """Draw ``samples`` images per unfinished prompt with ``draw(text, n, generator)`` -> uint8 (n, 3, H, W) and
    write them in ``layout``; returns (prompts drawn, prompts skipped as finished). Prompt i's generator is
    seeded with ``seed * 1_000_003 + i``, so a rerun draws exactly the images a whole run would."""
    if layout == "dpg" and samples != DPG_SAMPLES:
        raise ValueError(f"the dpg layout is a 2 x 2 grid: --samples must be {DPG_SAMPLES}, got {samples}")
    drawn = skipped = 0
    for item in items:
        if prompt_done(out_dir, item, layout, samples):
            skipped += 1
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + item.index)
        pixels = draw(item.text, samples, generator)  # (n, 3, H, W) uint8
        write_prompt(out_dir, item, layout, pixels.permute(0, 2, 3, 1).contiguous().numpy())
        drawn += 1
        log(f"prompt {item.index + 1}/{len(items)} ({item.name}) done")
    return drawn, skipped


# ----------------------------------------------------------------------------- metrics


def _square(img: Image.Image, side: int) -> np.ndarray:
    """Center crop to a square, resize to ``side`` (bicubic) -> uint8 (3, side, side)."""
    w, h = img.size
    s = min(w, h)
    img = img.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != side:
        img = img.resize((side, side), Image.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1)


def load_generated(out_dir: str, items: Sequence[PromptItem], layout: str, samples: int) -> tuple[list[np.ndarray], list[str]]:
    """The finished prompts' images as uint8 (3, H, W) (a DPG grid gives its 4 tiles) and each image's prompt."""
    images, texts = [], []
    for item in items:
        if not prompt_done(out_dir, item, layout, samples):
            continue
        for path in item_files(out_dir, item, layout, samples):
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
            tiles = [arr]
            if layout == "dpg":
                h, w = arr.shape[1] // 2, arr.shape[2] // 2
                tiles = [arr[:, r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(2) for c in range(2)]
            images += tiles
            texts += [item.text] * len(tiles)
    return images, texts


def load_reference(folder: str, side: int) -> list[np.ndarray]:
    """Every image under ``folder`` (recursively), center-cropped and resized to ``side``, as uint8 (3, side, side)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no reference image folder at '{folder}'")
    paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"reference folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(_square(img, side))
    return out


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: Sequence[np.ndarray]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i]))


def distribution_metrics(generated: Sequence[np.ndarray], reference: Sequence[np.ndarray], weights: str,
                         device: Optional[str] = None) -> dict[str, float]:
    """FID, KID (mean, std), Inception Score (mean, std) and precision/recall of ``generated`` against
    ``reference`` (uint8 (3, H, W) each), all on torch-fidelity's InceptionV3 features (pool3, 2048-d; logits for
    IS). Precision/recall (Kynkaanniemi et al., 2019, k = 3) use the same Inception features rather than VGG-16,
    so one set of weights serves every metric. KID subsets and IS splits shrink to what small sets allow."""
    import torch_fidelity

    weights = inception_weights_path(weights)
    n_gen, n_ref = len(generated), len(reference)
    if n_gen < 2 or n_ref < 2:
        raise ValueError(f"distribution metrics need at least 2 generated and 2 reference images, got {n_gen} and {n_ref}")
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    try:
        with inception_weights_copy(weights) as copy:
            m = torch_fidelity.calculate_metrics(
                input1=_Images(generated), input2=_Images(reference), cuda=cuda, isc=True, fid=True, kid=True, prc=True,
                feature_extractor="inception-v3-compat", feature_layer_prc="2048",
                feature_extractor_weights_path=copy, kid_subset_size=min(1000, n_gen, n_ref),
                isc_splits=min(10, n_gen), cache=False, verbose=False, batch_size=32, save_cpu_ram=True,  # no workers: the images are in memory
            )
    except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot read Inception weights {weights} ({' '.join(str(e).split()) or type(e).__name__})") from None
    except RuntimeError as e:
        if "state_dict" in str(e) or "size mismatch" in str(e) or "Missing key" in str(e):
            raise ValueError(f"cannot load Inception weights from {weights}; they are not torch-fidelity's InceptionV3") from None
        raise
    return {
        "fid": float(m["frechet_inception_distance"]),
        "kid_mean": float(m["kernel_inception_distance_mean"]), "kid_std": float(m["kernel_inception_distance_std"]),
        "inception_score_mean": float(m["inception_score_mean"]), "inception_score_std": float(m["inception_score_std"]),
        "precision": float(m["precision"]), "recall": float(m["recall"]), "f_score": float(m["f_score"]),
        "generated_images": n_gen, "reference_images": n_ref,
    }


def check_clip_dir(clip_dir: str) -> None:
    """A one-line error unless ``clip_dir`` holds a saved CLIP model (checked before any image is drawn)."""
    if not os.path.isdir(clip_dir) or not os.path.isfile(os.path.join(clip_dir, "config.json")):
        raise ValueError(f"no CLIP model at {clip_dir}; pass --clip a folder written by CLIPModel.save_pretrained "
                         f"and CLIPProcessor.save_pretrained (e.g. a download of openai/clip-vit-large-patch14)")


def clip_score(images: Sequence[np.ndarray], prompts: Sequence[str], clip_dir: str, batch_size: int = 32) -> float:
    """CLIPScore (Hessel et al., 2021: 100 * max(cos(image, text), 0), averaged over the pairs) of each image against
    its prompt, with the CLIP model and processor saved in ``clip_dir`` (``save_pretrained``); nothing is
    downloaded. Computed from ``CLIPModel``'s own normalised embeddings: torchmetrics' ``CLIPScore`` takes hub ids
    only and reads ``get_image_features`` as a tensor, which transformers 5 no longer returns."""
    check_clip_dir(clip_dir)
    if len(images) != len(prompts):
        raise ValueError(f"CLIPScore needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    total = 0.0
    for start in range(0, len(images), batch_size):
        pics = [Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))) for img in images[start:start + batch_size]]
        inputs = processor(text=list(prompts[start:start + batch_size]), images=pics, return_tensors="pt",
                           padding=True, truncation=True)
        with torch.no_grad():
            out = model(**inputs)
        total += float((100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)).sum())
    return total / max(len(images), 1)


def image_side(images: Sequence[np.ndarray]) -> int:
    """The side of the (square) generated images, checked to be one size."""
    sides = {img.shape[1:] for img in images}
    if len(sides) != 1:
        raise ValueError(f"generated images have several sizes: {sorted(sides)}")
    h, w = sides.pop()
    return max(h, w) if h == w else int(math.sqrt(h * w))
