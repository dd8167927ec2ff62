"""The two training tasks of the unified model and their data.

Joint training interleaves two tasks, one per micro-batch: generation (caption -> the image's VQRAE codes)
and understanding (image features + conversation -> answers). ``TaskSchedule`` decides the task of every
micro-batch from its index alone, so all ranks run the same task at the same time (their collectives stay
in step) and a resumed run continues the schedule from a saved counter. Each task reads its own data
through a ``TaskLoader``, whose saved state is the position after the last micro-batch trained on.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from vqrae import VQRAE
from vqrae.data import ResumableSampler, SampleKey
from vqrae.runtime.config import TrainingError
from vqrae.runtime.elastic import ignore_stop_signals

from .codes import open_codes
from .data import (
    Batch, Example, ExampleRows, Skipped, collate, generation_example, load_conversations, open_image_text,
    pad_token_id,
)
from .model import UnifiedModel
from .vocab import ImageVocab

GENERATION, UNDERSTANDING = "generation", "understanding"
TASKS = (GENERATION, UNDERSTANDING)


@dataclass
class GenerationData:
    source: str = ""  # image-caption rows: imagefolder dir (metadata.jsonl), hub dataset id or .tar shards
    split: str = "train"
    caption_column: str = "caption"
    image_column: str = "image"
    codes_from: Optional[str] = None  # scripts/tokenize_dataset.py output for this source: no VQRAE on the fly


@dataclass
class UnderstandingData:
    source: str = ""  # LLaVA conversation .json/.jsonl, or imagefolder dir / hub id / .tar shards
    split: str = "train"
    conversation_column: str = "conversations"  # LLaVA turns or [{question, answer}] pairs (imagefolders: "questions")
    image_column: str = "image"
    image_root: Optional[str] = None  # relative image paths resolve here; None: the JSON file's directory


@dataclass
class MLLMDataConfig:
    generation: GenerationData = field(default_factory=GenerationData)
    understanding: UnderstandingData = field(default_factory=UnderstandingData)
    task_ratio: float = 0.5  # fraction of micro-batches that train generation; 1.0 generation only, 0.0 understanding only
    cfg_dropout: float = 0.1  # captions replaced by "" for classifier-free guidance
    loss_on_text: bool = False  # generation: also put loss on the caption prompt (default: visual tokens only)
    max_length: int = 2048  # longer examples are dropped and counted as "too_long" (never cut inside an image)
    resolution: Optional[int] = None  # square side given to the VQRAE; None: its encoder's image_size
    seed: int = 0  # data order, caption dropout and task schedule
    num_workers: int = 4  # DataLoader workers per task
    cache_images: bool = False  # keep decoded images in memory after an epoch (small data sets: the demo's)


class TaskSchedule:
    """The task of every micro-batch: generation for a fraction ``ratio`` of them, understanding otherwise.

    Micro-batches are grouped in blocks of ``period``. Block b holds ``floor((b+1) P r) - floor(b P r)``
    generation micro-batches (so any prefix of the schedule holds ``r * n`` of them up to one block), in an
    order drawn from ``(seed, b)``. The task of micro-batch i is a function of ``(ratio, seed, i)`` alone:
    every rank computes the same schedule, and a resumed run continues it from the saved counter.

    Args:
        ratio: fraction of generation micro-batches, in [0, 1].
        seed: fixes the order inside each block.
        period: block length.
    """

    def __init__(self, ratio: float, seed: int, period: int = 16):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"task ratio must lie in [0, 1], got {ratio}")
        self.ratio, self.seed, self.period = ratio, seed, period
        self._block, self._tasks = -1, []

    def task(self, index: int) -> str:
        block, offset = divmod(index, self.period)
        if block != self._block:
            start = block * self.period
            flags = [math.floor((j + 1) * self.ratio) - math.floor(j * self.ratio) for j in range(start, start + self.period)]
            order = np.random.default_rng([self.seed, block]).permutation(self.period)
            self._block, self._tasks = block, [GENERATION if flags[k] else UNDERSTANDING for k in order]
        return self._tasks[offset]


class CodeRows(Dataset):
    """Generation examples from captions and pre-computed codes (``tokenize_rows``), without reading images.

    Args:
        captions: the caption column of the source rows.
        codes: ``open_codes`` output, row-aligned with ``captions``.
        tokenizer: the extended tokenizer.
        vocab: its image layout.
        num_tokens: N, codes per image.
        cfg_dropout: see ``mllm.data.generation_example``.
        loss_on_text: see ``mllm.data.generation_example``.
        seed: caption dropout draws, exactly as ``ExampleRows`` makes them.
    """

    def __init__(self, captions: Sequence, codes: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                 vocab: ImageVocab, num_tokens: int, cfg_dropout: float = 0.1, loss_on_text: bool = False,
                 seed: int = 0):
        if len(captions) != len(codes):
            raise TrainingError(f"{len(captions)} captions but {len(codes)} rows of codes")
        self.captions, self.codes, self.tokenizer, self.vocab = captions, codes, tokenizer, vocab
        self.num_tokens, self.cfg_dropout, self.loss_on_text, self.seed = num_tokens, cfg_dropout, loss_on_text, seed

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, key: Union[int, SampleKey]) -> Union[Example, Skipped]:
        key = key if isinstance(key, SampleKey) else SampleKey(int(key), 0, 0)
        text = self.captions[key.index]
        if not isinstance(text, str) or not text.strip():
            return Skipped("missing_caption")
        row = self.codes[key.index]
        if not row["codes"]:
            return Skipped(row["status"])
        seed = int(np.random.default_rng([self.seed, key.epoch, key.index]).integers(2**62))
        ex = generation_example(
            self.tokenizer, self.vocab, text, self.num_tokens, codes=row["codes"], cfg_dropout=self.cfg_dropout,
            generator=torch.Generator().manual_seed(seed), loss_on_text=self.loss_on_text,
        )
        ex.status = row["status"]
        return ex


def resolution_of(cfg: MLLMDataConfig, vqrae: VQRAE) -> int:
    return cfg.resolution or vqrae.cfg.encoder.image_size


def task_rows(cfg: MLLMDataConfig, task: str, model: UnifiedModel) -> Dataset:
    """The examples of ``task`` from ``cfg`` for ``model``: ``ExampleRows``, or ``CodeRows`` with ``codes_from``.

    With ``codes_from``, call this before ``place_vqrae``: the codes are checked against the fingerprint of
    the VQRAE's stored weights.
    """
    common = dict(tokenizer=model.tokenizer, vocab=model.vocab, num_tokens=model.vqrae.num_tokens)
    resolution = resolution_of(cfg, model.vqrae)
    try:
        if task == GENERATION:
            src = cfg.generation
            rows = open_image_text(src.source, src.caption_column, src.image_column, src.split)
            if src.codes_from:
                codes = open_codes(src.codes_from, model.vqrae, len(rows), resolution)
                return CodeRows(rows.select_columns([src.caption_column])[src.caption_column], codes, **common,
                                cfg_dropout=cfg.cfg_dropout, loss_on_text=cfg.loss_on_text, seed=cfg.seed)
            return ExampleRows(rows, GENERATION, **common, resolution=resolution, text_column=src.caption_column,
                               image_column=src.image_column, cfg_dropout=cfg.cfg_dropout,
                               loss_on_text=cfg.loss_on_text, seed=cfg.seed, cache_images=cfg.cache_images)
        src = cfg.understanding
        root = src.image_root
        if src.source.endswith((".json", ".jsonl")) and os.path.isfile(src.source):
            rows = load_conversations(src.source)
            root = root or os.path.dirname(os.path.abspath(src.source))
        else:
            rows = open_image_text(src.source, src.conversation_column, src.image_column, src.split)
        return ExampleRows(rows, UNDERSTANDING, **common, resolution=resolution, text_column=src.conversation_column,
                           image_column=src.image_column, image_root=root, seed=cfg.seed,
                           cache_images=cfg.cache_images)
    except ValueError as err:
        raise TrainingError(f"data.{task}: {str(err).splitlines()[0]}") from None


class _Keyed(Dataset):
    """Rows paired with their key, so the collate function knows where the batch ends in the epoch."""

    def __init__(self, rows: Dataset):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: SampleKey):
        return self.rows[key], key


@dataclass
class _Collate:
    pad_id: int
    max_length: Optional[int]

    def __call__(self, items) -> tuple[Batch, dict]:
        last = items[-1][1]
        batch = collate([ex for ex, _ in items], self.pad_id, self.max_length)
        return batch, last.state()


class TaskLoader:
    """An endless, resumable stream of one task's micro-batches for this rank.

    Args:
        rows: ``Example``/``Skipped`` rows keyed by ``vqrae.data.SampleKey`` (``task_rows``).
        pad_id: input id of padding.
        max_length: longer examples are dropped (counted as "too_long").
        batch_size: rows per micro-batch on this rank.
        rank: this process's rank.
        world_size: number of processes; ranks read disjoint rows.
        seed: the order of every epoch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches for faster copies to the accelerator.

    ``state_dict`` is the position after the last batch ``next`` returned: the loader's workers run ahead.
    """

    def __init__(self, rows: Dataset, pad_id: int, max_length: Optional[int], batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False):
        try:
            self.sampler = ResumableSampler(len(rows), rank, world_size, seed, batch_size)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        self.loader = DataLoader(
            _Keyed(rows), batch_sampler=self.sampler, collate_fn=_Collate(pad_id, max_length),
            num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
            worker_init_fn=ignore_stop_signals,
        )
        self._iter = None
        self._state = self.sampler.state_dict()

    def next(self) -> Batch:
        while True:
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                batch, self._state = next(self._iter)
                return batch
            except StopIteration:  # the sampler starts the next epoch on the next iteration
                self._iter = None

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._state, self._iter = self.sampler.state_dict(), None

    def resume(self, states: list[dict]) -> None:
        """Continue the run whose ranks saved ``states`` (in rank order; any number of ranks)."""
        self.sampler.resume(states)
        self._state, self._iter = self.sampler.state_dict(), None


def make_loaders(cfg: MLLMDataConfig, model: UnifiedModel, batch_size: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> dict[str, TaskLoader]:
    """One ``TaskLoader`` per task that ``cfg.task_ratio`` trains."""
    tasks = [t for t, used in ((GENERATION, cfg.task_ratio > 0), (UNDERSTANDING, cfg.task_ratio < 1)) if used]
    pad = pad_token_id(model.tokenizer)
    return {
        task: TaskLoader(task_rows(cfg, task, model), pad, cfg.max_length, batch_size, rank, world_size, cfg.seed,
                         cfg.num_workers, pin_memory)
        for task in tasks
    }
