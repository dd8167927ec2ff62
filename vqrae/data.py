"""Image data: robust decoding, square crops in [-1, 1], and a deterministic, resumable order.

``DataConfig.source`` is an ``imagefolder`` directory (a ``metadata.jsonl`` adds text columns), webdataset
shards (a path, glob or brace pattern ending in ``.tar``), or else a Hugging Face hub dataset id.

Images stay undecoded in ``datasets`` (``Image(decode=False)``) and are decoded by ``load_image``, so a
broken file becomes a counted skip instead of an exception. ``collate_images`` drops bad rows and returns every
row's status in ``ImageBatch.data_stats``: counters inside worker processes would never reach the trainer.

The order per epoch comes from ``seed + epoch`` and crops/flips from ``(seed, epoch, row)``, so a resumed
run sees exactly the batches of an uninterrupted one. Each batch carries ``sampler_state``, the position
just after it: save the one of the last batch trained on, as the loader's workers run ahead.
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import braceexpand
import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.distributed import split_dataset_by_node
from omegaconf import MISSING
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from .images import load_image, transform

_RESERVED = ("pixels", "index", "status", "sampler_state")


@dataclass
class DataConfig:
    source: str = MISSING  # required: image directory, hub dataset id, or shards ending in .tar
    split: str = "train"
    streaming: bool = False  # iterate without downloading/caching the whole dataset first
    resolution: int = 256  # side of the square crops
    random_crop: bool = True  # else center crop
    hflip: bool = True  # random horizontal flip
    image_column: str = "image"  # if absent, the single image-typed column is used (webdataset "jpg")
    text_columns: list[str] = field(default_factory=list)  # carried through, e.g. ["caption"]
    seed: int = 0
    num_workers: int = 0  # DataLoader worker processes
    min_side: int = 8  # images with a smaller side are skipped as "too_small"
    shuffle_buffer: int = 1000  # streaming only: rows shuffled within a buffer of this size



class SampleKey(NamedTuple):
    index: int  # row number in the source (streaming: in this rank's stream of the epoch)
    epoch: int
    position: int  # where the sampler resumes once this row's batch is consumed, in the sampler's unit
    unit: str = "position"  # the name of that unit in the sampler's state: "rows" (map-style) or "position"

    def state(self) -> dict:
        """The sampler state to save once this row's batch is consumed."""
        return {"epoch": self.epoch, self.unit: self.position}


def _image_column(features: datasets.Features | None, cfg: DataConfig) -> str:
    if features is None or cfg.image_column in features:
        return cfg.image_column
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    if len(images) != 1:
        raise ValueError(f"image column '{cfg.image_column}' not in the data; columns: {', '.join(features)}")
    return images[0]


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def _item(row: dict, key: SampleKey, track: bool, cfg: DataConfig, image_column: str) -> dict:
    item: dict[str, Any] = {"index": key.index}
    item["sampler_state"] = key.state() if track else None
    for col in cfg.text_columns:
        value = row.get(col)
        if _is_empty(value):
            return {**item, "status": f"missing_{col}"}
        item[col] = value
    img, status = load_image(row.get(image_column), cfg.min_side, draft_side=cfg.resolution)
    item["status"] = status
    if img is not None:
        rng = np.random.default_rng([cfg.seed, key.epoch, key.index])
        item["pixels"] = transform(img, cfg.resolution, cfg.random_crop, cfg.hflip, rng)
    return item


class ImageRows(Dataset):
    """Map-style rows of a ``datasets.Dataset`` as dicts with ``pixels``, ``index``, ``status`` and text.

    Args:
        rows: the source, its image column stored undecoded (see ``open_source``).
        cfg: crop, flip, seed and column settings.

    A key is a row number (epoch 0, no ``sampler_state``) or a ``SampleKey`` from ``ResumableSampler``.
    A bad row has no ``pixels``; its ``status`` says why.
    """

    def __init__(self, rows: datasets.Dataset, cfg: DataConfig):
        self.rows, self.cfg = rows, cfg
        self.image_column = _image_column(rows.features, cfg)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | SampleKey) -> dict:
        track = isinstance(key, SampleKey)
        key = key if track else SampleKey(int(key), 0, 0)
        return _item(self.rows[key.index], key, track, self.cfg, self.image_column)


@dataclass
class ImageBatch:
    pixels: torch.Tensor  # (B, 3, R, R) in [-1, 1]; B is 0 when every row drawn was bad
    index: torch.Tensor  # (B,) row numbers
    text: dict[str, list]  # text columns, aligned with pixels
    data_stats: Counter  # status of every row drawn, kept or dropped
    sampler_state: dict | None  # {"epoch", "position"} just after this batch: save it to resume

    def __len__(self) -> int:
        return self.index.numel()

    def pin_memory(self) -> "ImageBatch":
        return ImageBatch(self.pixels.pin_memory(), self.index.pin_memory(), self.text, self.data_stats, self.sampler_state)


def collate_images(items: list[dict]) -> ImageBatch:
    """Stack the good rows, drop the bad ones, count every row's status."""
    kept = [it for it in items if "pixels" in it]
    text_columns = [k for k in kept[0] if k not in _RESERVED] if kept else []
    return ImageBatch(
        pixels=torch.stack([it["pixels"] for it in kept]) if kept else torch.empty(0, 3, 0, 0),
        index=torch.tensor([it["index"] for it in kept], dtype=torch.long),
        text={c: [it[c] for it in kept] for c in text_columns},
        data_stats=Counter(it["status"] for it in items),
        sampler_state=items[-1]["sampler_state"] if items else None,
    )


class ResumableSampler(Sampler):
    """Batches of ``SampleKey``: a permutation per epoch from ``seed + epoch``, dealt to the ranks.

    Args:
        num_items: rows in the source.
        rank: this process's rank.
        world_size: number of processes.
        seed: shared by all ranks.
        batch_size: rows per batch on this rank.

    Each batch of all ranks together takes the next ``batch_size * world_size`` rows of the epoch's permutation,
    rank r every world_size-th of them from the r-th; an epoch ends when fewer are left (they are dropped, so all
    ranks take the same number of steps). The state is the epoch and the rows of its permutation consumed by all
    ranks together (``rows``), the same on every rank and independent of the number of ranks: a run resumed on
    another number of ranks continues with the next unconsumed row, none seen twice and none skipped.
    Iterating yields the rest of the current epoch; the next iteration starts the next epoch.
    """

    def __init__(self, num_items: int, rank: int, world_size: int, seed: int, batch_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.seed, self.batch_size = seed, batch_size
        self.step_rows = batch_size * world_size  # rows one batch of every rank takes
        self.num_batches = num_items // self.step_rows  # batches per rank in a whole epoch
        if self.num_batches == 0:
            raise ValueError(f"{num_items} rows over {world_size} ranks do not fill one batch of {batch_size}")
        self.epoch, self.rows = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rows": self.rows}

    def load_state_dict(self, state: dict, world_size: int | None = None) -> None:
        """Continue where ``state`` says; a state from before ``rows`` (``position``: batches per rank) needs the
        ``world_size`` that wrote it (default: this one)."""
        rows = state.get("rows")
        if rows is None:
            rows = int(state["position"]) * self.batch_size * (world_size or self.world_size)
        if not 0 <= int(rows) <= self.num_items:
            raise ValueError(f"sampler state {state} lies outside an epoch of {self.num_items} rows")
        self.epoch, self.rows = int(state["epoch"]), int(rows)

    def resume(self, states: list[dict]) -> None:
        """Continue the run whose ranks saved ``states`` (in rank order; any number of ranks)."""
        positions = {(int(s["epoch"]), s.get("rows", s.get("position"))) for s in states}
        if len(positions) != 1:
            raise ValueError(f"the saved ranks stopped at different data positions: {sorted(positions)}")
        self.load_state_dict(states[0], len(states))

    def epoch_order(self, epoch: int) -> list[int]:
        """The whole permutation of ``epoch``, shared by all ranks."""
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[list[SampleKey]]:
        if self.num_items - self.rows < self.step_rows:
            self.epoch, self.rows = self.epoch + 1, 0
        epoch, order = self.epoch, self.epoch_order(self.epoch)
        while self.num_items - self.rows >= self.step_rows:
            start = self.rows
            self.rows += self.step_rows
            yield [SampleKey(i, epoch, self.rows, "rows")
                   for i in order[start + self.rank : start + self.step_rows : self.world_size]]


class StreamingRows(IterableDataset):
    """Endless rows of a streamed source, split by rank, in chunks of one batch, resumable.

    Args:
        rows: the streamed source, its image column stored undecoded (see ``open_source``).
        cfg: crop, flip, seed and column settings.
        rank: this process's rank.
        world_size: number of processes.
        batch_size: rows per chunk; must equal the DataLoader's batch size.

    Each DataLoader worker reads the whole stream of this rank and keeps every ``num_workers``-th chunk,
    matching the loader's round-robin over workers, so the batch order does not depend on the number of
    workers and a resume skips exactly the chunks already consumed. An incomplete last chunk of an epoch
    is dropped; each epoch reshuffles with ``seed + epoch``. The state is the epoch and the chunks of this rank's
    stream handed out (``position``). A stream split among another number of ranks is another split, so a run
    resumed on another number of ranks starts the next epoch (``resume``): the rest of the interrupted epoch is
    skipped, no row is seen twice within an epoch.
    """

    def __init__(self, rows: datasets.IterableDataset, cfg: DataConfig, rank: int, world_size: int, batch_size: int):
        self.image_column = _image_column(rows.features, cfg)
        self.source, self.rank, self.world_size = rows, rank, world_size
        self.cfg, self.batch_size = cfg, batch_size
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def resume(self, states: list[dict]) -> None:
        """Continue the run whose ranks saved ``states`` (in rank order): this rank's own state on the same number
        of ranks, else the start of the epoch after the last one any rank had begun."""
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
        else:
            self.epoch, self.position = max(int(s["epoch"]) for s in states) + 1, 0

    def epoch_rows(self, epoch: int) -> datasets.IterableDataset:
        """This rank's rows of ``epoch``, shuffled with ``seed + epoch``. A new dataset per epoch and per worker,
        not ``set_epoch``: Hugging Face keeps that epoch in memory shared by all DataLoader workers, so a worker
        a chunk ahead would move the others into its epoch."""
        rows = self.source.shuffle(seed=self.cfg.seed + epoch, buffer_size=self.cfg.shuffle_buffer)
        return split_dataset_by_node(rows, rank=self.rank, world_size=self.world_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start, dealt = self.epoch, self.position, 0
        while True:
            # .iter() reads the stream directly; plain iteration would shard it across workers itself.
            chunks = self.epoch_rows(epoch).iter(batch_size=self.batch_size, drop_last_batch=True)
            p = -1
            for p, chunk in enumerate(chunks):
                if p < start:
                    continue
                self.epoch, self.position = epoch, p + 1  # what was handed out, as ResumableSampler.state_dict
                if dealt % num_workers == worker:
                    for j in range(self.batch_size):
                        key = SampleKey(p * self.batch_size + j, epoch, p + 1)
                        yield _item({k: v[j] for k, v in chunk.items()}, key, True, self.cfg, self.image_column)
                dealt += 1
            if p < 0:
                raise ValueError(f"streamed source has fewer than {self.batch_size} rows for this rank")
            epoch, start = epoch + 1, 0


def _shard_files(pattern: str) -> list[str]:
    files: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        files.extend(sorted(glob.glob(part)) if glob.has_magic(part) else [part])
    return files


_METADATA = {"metadata.jsonl": "JSON lines", "metadata.csv": "CSV"}  # the text files imagefolder reads


def _metadata_problem(folder: str, whole_tree: bool, parse_json: bool) -> str | None:
    """The first metadata file of ``folder`` (or of its whole tree) that is not UTF-8, or with ``parse_json`` a
    ``metadata.jsonl`` line that is not a JSON object, as a one-line message; None when all are readable."""
    if whole_tree:
        paths = [os.path.join(d, n) for d, _, names in sorted(os.walk(folder)) for n in sorted(names) if n in _METADATA]
    else:
        paths = [p for p in (os.path.join(folder, n) for n in _METADATA) if os.path.isfile(p)]
    for path in paths:
        kind = _METADATA[os.path.basename(path)]
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    return f"metadata file '{path}' is not UTF-8 (line {number}): it must be UTF-8 {kind}"
                if not (parse_json and kind == "JSON lines" and text.strip()):
                    continue
                try:
                    is_object = isinstance(json.loads(text), dict)
                except ValueError:
                    is_object = False
                if not is_object:
                    return f"metadata file '{path}' line {number} is not a JSON object: it must be UTF-8 JSON lines"
    return None


def _load_folder(folder: str, cfg: DataConfig, **kwargs) -> datasets.Dataset | datasets.IterableDataset:
    """``imagefolder`` rows of ``folder``; an unreadable metadata file is a one-line ``ValueError`` naming it."""
    if cfg.streaming:  # a streamed folder reads its metadata only while iterating, in the loader's workers
        problem = _metadata_problem(folder, whole_tree=False, parse_json=False)
        if problem:
            raise ValueError(problem)
    try:
        return datasets.load_dataset("imagefolder", **kwargs)
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowInvalid, UnicodeDecodeError) as err:
        # datasets reports a bad metadata file without naming it; find it (only now: it reads every line)
        problem = _metadata_problem(folder, whole_tree=True, parse_json=True)
        cause = err.__cause__ or err
        detail = " ".join(str(cause).split()) or type(cause).__name__
        raise ValueError(problem or f"cannot load the image folder '{folder}': {detail}") from None


def _looks_local(source: str) -> bool:
    """A path the user meant as local: a hub id is ``name`` or ``owner/name`` with no such parent folder here."""
    parent = os.path.dirname(source)
    return source.startswith(("/", "./", "../", "~")) or (bool(parent) and os.path.isdir(parent))


def open_source(cfg: DataConfig, cache_dir: str | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """Load ``cfg.source``'s split with only the needed columns and the image column undecoded.

    Every problem with the source (a path that does not exist, an unreadable metadata file, a hub dataset
    that cannot be reached) is a ``ValueError`` with a one-line message.
    """
    if cfg.source in ("", MISSING):
        raise ValueError("data source is not set")
    source = os.path.expanduser(cfg.source)
    kwargs = dict(split=cfg.split, streaming=cfg.streaming, cache_dir=cache_dir)
    if source.endswith(".tar"):
        files = _shard_files(source)
        if not files:
            raise ValueError(f"no shards match {cfg.source}")
        missing = [f for f in files if "://" not in f and not os.path.isfile(f)]
        if missing:
            raise ValueError(f"shard '{missing[0]}' does not exist ({len(missing)} of {len(files)} shards missing)")
        rows = datasets.load_dataset("webdataset", data_files={cfg.split: files}, **kwargs)
    elif os.path.isdir(os.path.join(source, cfg.split)):
        # a local folder with one sub-folder per split: naming the split's files skips the split-name inference
        # over every file of the folder, seconds per load on a few thousand images
        split_dir = os.path.join(source, cfg.split)
        rows = _load_folder(split_dir, cfg, data_files={cfg.split: os.path.join(split_dir, "**")}, **kwargs)
    elif os.path.isdir(source):
        rows = _load_folder(source, cfg, data_dir=source, **kwargs)
    elif not os.path.exists(source) and _looks_local(source):
        # datasets would take it for a hub id and fail on the network, naming neither the path nor the typo
        raise ValueError(f"'{cfg.source}' is not an existing folder or file")
    else:
        try:
            rows = datasets.load_dataset(source, **kwargs)
        except (ConnectionError, FileNotFoundError) as err:  # offline, or no such (or a gated) dataset
            detail = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"hub dataset '{cfg.source}' cannot be loaded: the hub could not be reached or the id "
                             f"was not found ({detail})") from None
    image_column, features = _image_column(rows.features, cfg), rows.features
    bad = [c for c in cfg.text_columns if c in _RESERVED or (features is not None and c not in features)]
    if bad:
        raise ValueError(f"text columns {bad} unusable; columns: {', '.join(features or [])}")
    rows = rows.select_columns([image_column, *cfg.text_columns])
    return rows.cast_column(image_column, datasets.Image(decode=False))


def build_dataloader(
    cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1, cache_dir: str | None = None,
    pin_memory: bool = False,
) -> tuple[DataLoader, ResumableSampler | StreamingRows]:
    """DataLoader of ``ImageBatch`` plus the object whose ``load_state_dict`` resumes it.

    A map-style loader runs one epoch per iteration; a streaming one never ends.
    """
    rows = open_source(cfg, cache_dir)
    from .runtime.elastic import ignore_stop_signals  # the rank answers a pre-emption signal, not its loader's workers

    common = dict(num_workers=cfg.num_workers, collate_fn=collate_images, pin_memory=pin_memory,
                  worker_init_fn=ignore_stop_signals)
    if isinstance(rows, datasets.IterableDataset):
        stream = StreamingRows(rows, cfg, rank, world_size, batch_size)
        return DataLoader(stream, batch_size=batch_size, **common), stream
    sampler = ResumableSampler(len(rows), rank, world_size, cfg.seed, batch_size)
    # Workers hold no per-epoch state (the epoch travels in each key), so they can persist.
    loader = DataLoader(ImageRows(rows, cfg), batch_sampler=sampler, persistent_workers=cfg.num_workers > 0, **common)
    return loader, sampler
