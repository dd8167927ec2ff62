"""Pre-computed VQRAE codes of a generation data set (``scripts/tokenize_dataset.py``, read back through
``data.generation.codes_from``), so training reads captions and codes instead of encoding images.

Codes mean something only to the VQRAE that computed them: the folder's ``codes.json`` records its weights'
fingerprint, the crop resolution and the row count, and ``open_codes`` checks all three.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import datasets
import numpy as np
import torch

from vqrae import VQRAE
from vqrae.data import DataConfig, open_source
from vqrae.images import center_view, load_image
from vqrae.runtime.config import TrainingError
from vqrae.runtime.precision import COMPUTE_DTYPES, autocast

CODES_MANIFEST = "codes.json"


def place_vqrae(vqrae: VQRAE, device: torch.device) -> None:
    """Move the parts that encode (encoder, quantizer) to ``device``, in fp32; the decoder is never used in
    training and stays where it is. A bf16 run encodes under autocast (``vqrae.runtime.precision.autocast``), as the
    tokenizer trained: its frozen buffers and the quantizer's nearest-code search stay fp32."""
    vqrae.encoder.to(device=device, dtype=torch.float32)
    vqrae.quantizer.to(device=device, dtype=torch.float32)


def vqrae_fingerprint(vqrae: VQRAE) -> str:
    """Hash of the VQRAE's weights: codes computed by one VQRAE mean nothing to another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vqrae.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def _pixels(value: Any, resolution: int) -> tuple[Optional[torch.Tensor], str]:
    """The crop ``ExampleRows`` gives the VQRAE, so pre-computed and on-the-fly codes agree."""
    img, status = load_image(value, draft_side=resolution)
    if img is None:
        return None, status
    return center_view(img, resolution), status


def tokenize_rows(rows: datasets.Dataset, vqrae: VQRAE, resolution: int, image_column: str = "image",
                  batch_size: int = 64, workers: int = 4, cache_file: Optional[str] = None,
                  fingerprint: Optional[str] = None) -> datasets.Dataset:
    """VQRAE codes of every row's image, as columns ``codes`` (N int32; empty for an unusable image) and
    ``status`` (``vqrae.data.load_image``), row-aligned with ``rows``.

    Args:
        rows: the source with its image column undecoded (``vqrae.data.open_source``).
        vqrae: the frozen tokenizer, already on its device (``place_vqrae``).
        resolution: square side of the crops (the trainer's ``data.resolution``).
        image_column: the image column.
        batch_size: images encoded together.
        workers: threads decoding images.
        cache_file: Arrow file of the result; an existing one is reused (``datasets.Dataset.map`` caching).
        fingerprint: identity of the result for the ``datasets`` cache; pass it when ``cache_file`` is set.
    """
    param = next(vqrae.encoder.parameters())
    pool = ThreadPoolExecutor(max(1, workers))

    def encode(batch: dict) -> dict:
        loaded = list(pool.map(lambda v: _pixels(v, resolution), batch[image_column]))
        codes = [np.zeros(0, dtype=np.int32) for _ in loaded]
        ok = [i for i, (pixels, _) in enumerate(loaded) if pixels is not None]
        if ok:
            pixels = torch.stack([loaded[i][0] for i in ok]).to(param.device)
            with torch.inference_mode():
                found = vqrae.tokenize(pixels).to("cpu", torch.int32).numpy()
            for j, i in enumerate(ok):
                codes[i] = found[j]
        return {"codes": codes, "status": [status for _, status in loaded]}

    features = datasets.Features({"codes": datasets.Sequence(datasets.Value("int32")), "status": datasets.Value("string")})
    try:
        return rows.map(encode, batched=True, batch_size=batch_size, remove_columns=rows.column_names,
                        features=features, cache_file_name=cache_file, new_fingerprint=fingerprint,
                        desc="tokenizing images")
    finally:
        pool.shutdown()


def write_codes(vqrae: VQRAE, source: str, out_dir: str, split: str = "train", image_column: str = "image",
                resolution: Optional[int] = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, batch_size: int = 64, workers: int = 4) -> dict:
    """Codes of every image of ``source`` into ``out_dir``, read back by ``open_codes`` (``codes_from``).

    The VQRAE is fingerprinted as loaded, then placed on ``device`` and run under autocast to ``dtype``: use
    the trainer's compute dtype (its ``run.precision``) to get exactly the codes it would compute on the fly. The Arrow file is
    named by the inputs' identity, so a rerun with the same inputs reuses it. Returns the manifest.
    """
    fingerprint = vqrae_fingerprint(vqrae)
    place_vqrae(vqrae, torch.device(device))
    resolution = resolution or vqrae.cfg.encoder.image_size
    try:
        rows = open_source(DataConfig(source=source, split=split, image_column=image_column, text_columns=[]))
    except ValueError as err:
        raise TrainingError(f"--data {source}: {str(err).splitlines()[0]}") from None
    identity = [fingerprint, rows._fingerprint, resolution, str(dtype), image_column]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    os.makedirs(out_dir, exist_ok=True)
    name = f"codes-{key}.arrow"
    precision = {d: name for name, d in COMPUTE_DTYPES.items()}.get(dtype)  # the run.precision computing in dtype
    if precision is None:
        raise TrainingError(f"codes can be computed in float32 or bfloat16, not {dtype}")
    with autocast(precision, torch.device(device)):
        codes = tokenize_rows(rows, vqrae, resolution, image_column, batch_size, workers, os.path.join(out_dir, name), key)
    manifest = {
        "file": name, "vqrae": fingerprint, "resolution": resolution, "num_rows": len(codes),
        "num_tokens": vqrae.num_tokens, "codebook_size": vqrae.codebook_size, "dtype": str(dtype).replace("torch.", ""),
        "source": source, "split": split, "image_column": image_column, "status": dict(Counter(codes["status"])),
    }
    tmp = os.path.join(out_dir, CODES_MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, CODES_MANIFEST))  # written last: a folder without it is incomplete
    return manifest


def open_codes(path: str, vqrae: VQRAE, num_rows: int, resolution: int, fingerprint: Optional[str] = None) -> datasets.Dataset:
    """The codes written by ``scripts/tokenize_dataset.py`` at ``path``, after checking they belong to this
    VQRAE (``fingerprint``, computed if not given), resolution and number of rows."""
    with open(os.path.join(path, CODES_MANIFEST)) as f:
        manifest = json.load(f)
    fingerprint = fingerprint or vqrae_fingerprint(vqrae)
    rerun = "; rerun scripts/tokenize_dataset.py"
    if manifest["vqrae"] != fingerprint:
        raise TrainingError(f"codes_from '{path}' was computed by another VQRAE than the model's{rerun}")
    if manifest["resolution"] != resolution:
        raise TrainingError(f"codes_from '{path}' holds codes of {manifest['resolution']} px crops, training uses "
                            f"{resolution} px{rerun}")
    if manifest["num_rows"] != num_rows:
        raise TrainingError(f"codes_from '{path}' holds {manifest['num_rows']} rows, the generation source has "
                            f"{num_rows}{rerun}")
    return datasets.Dataset.from_file(os.path.join(path, manifest["file"]))
