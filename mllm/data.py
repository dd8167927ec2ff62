"""Training data of the unified model: rows -> tokens -> ``Batch``, one resumable stream per task.

1. rows: image-caption rows (``open_image_text``) or conversations (``load_conversations``), per
   ``MLLMDataConfig``; ``task_rows`` picks the source of a task.
2. tokens: each row becomes an ``Example`` (ids, labels, masks), or a ``Skipped`` with the reason.
   - generation (``generation_example``): ``generation_prompt_ids(caption)`` + ``<boi>`` + N image-code tokens
     + ``<eoi>``, with loss on the code tokens and ``<eoi>``. With probability ``cfg_dropout`` the caption is
     replaced by "", so the model also learns the unconditional distribution that classifier-free guidance
     needs (Ho & Salimans, 2022).
   - understanding (``understanding_example``): a conversation whose ``<image>`` placeholder is expanded to N
     positions, marked in ``image_mask`` for the projected features; loss on the answers and the end-of-turn
     text that closes each.
   Prompts come from ``mllm.prompts``, the same functions the sampler's prompts come from.
3. batches: ``collate`` right-pads the kept examples into a ``Batch``; ``TaskLoader`` streams one task's
   micro-batches for this rank and saves its position. Image codes are usually computed on the accelerator: a
   generation example then carries its image in ``code_image`` and placeholder ids at ``code_mask``, and
   ``prepare_batch`` writes the codes into the batch on the device (``insert_codes``). With pre-computed codes
   (``codes_from``, ``mllm.codes``) the rows already hold them (``CodeRows``).
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from vqrae.data import DataConfig, ResumableSampler, SampleKey, open_source
from vqrae.images import center_view, load_image
from vqrae.runtime.config import TrainingError
from vqrae.runtime.elastic import ignore_stop_signals
from vqrae.runtime.precision import autocast

from .codes import open_codes
from .model import UnifiedModel
from .prompts import conversation_tokens, generation_prompt_ids, pad_token_id
from .tasks import GENERATION, UNDERSTANDING
from .vocab import IGNORE_INDEX, ImageVocab

PENDING = -1  # input id at code positions until insert_codes fills them


# ----------------------------------------------------------------------------- config


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


# ----------------------------------------------------------------------------- tokens


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss
    image_mask: list[bool]  # positions that receive the projected features of `image`
    code_mask: list[bool]  # positions that insert_codes fills with the codes of `code_image`
    image: Optional[torch.Tensor] = None  # (3, H, W) in [-1, 1]: the image to understand
    code_image: Optional[torch.Tensor] = None  # (3, H, W) in [-1, 1]: the image to generate
    status: str = "ok"  # how the row's image decoded (vqrae.data.load_image), counted per batch


@dataclass
class Skipped:
    status: str  # why a row was dropped: "missing", "corrupt", "missing_caption", "bad_conversation", ...



def generation_example(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ImageVocab,
    caption: str,
    num_tokens: int,
    *,
    codes: Optional[Sequence[int] | torch.Tensor] = None,
    code_image: Optional[torch.Tensor] = None,
    cfg_dropout: float = 0.1,
    generator: Optional[torch.Generator] = None,
    loss_on_text: bool = False,
) -> Example:
    """prompt(caption) + ``<boi>`` + codes + ``<eoi>``, with loss on the codes and ``<eoi>``.

    Args:
        tokenizer: the extended tokenizer.
        vocab: its image layout.
        caption: the condition.
        num_tokens: N, codes per image.
        codes: the image's N code indices; or
        code_image: the image itself, whose codes ``insert_codes`` writes at ``code_mask`` later.
        cfg_dropout: probability of replacing the caption by "" (unconditional example).
        generator: RNG of the dropout draw; None uses torch's global RNG.
        loss_on_text: also put loss on the prompt tokens and ``<boi>``.
    """
    if (codes is None) == (code_image is None):
        raise ValueError("pass exactly one of codes and code_image")
    if cfg_dropout > 0 and float(torch.rand((), generator=generator)) < cfg_dropout:
        caption = ""
    prompt = generation_prompt_ids(tokenizer, caption) + [vocab.boi_id]
    if codes is not None:
        code_ids = vocab.to_tokens(codes).flatten().tolist()
        if len(code_ids) != num_tokens:
            raise ValueError(f"an image has {num_tokens} codes, got {len(code_ids)}")
        code_labels = code_ids
    else:
        code_ids, code_labels = [PENDING] * num_tokens, [IGNORE_INDEX] * num_tokens
    prompt_labels = list(prompt) if loss_on_text else [IGNORE_INDEX] * len(prompt)
    return Example(
        input_ids=prompt + code_ids + [vocab.eoi_id],
        labels=prompt_labels + code_labels + [vocab.eoi_id],
        image_mask=[False] * (len(prompt) + num_tokens + 1),
        code_mask=[False] * len(prompt) + [code_image is not None] * num_tokens + [False],
        code_image=code_image,
    )


def dropout_generator(seed: int, key: SampleKey) -> torch.Generator:
    """The RNG of one row's caption-dropout draw: a function of (seed, epoch, row), so every DataLoader worker, rank
    count and resumed run draws the same for the same row."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, key.epoch, key.index]).integers(2**62)))


def understanding_example(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ImageVocab,
    conversation: Sequence[dict],
    num_tokens: int,
    image: Optional[torch.Tensor] = None,
) -> Example:
    """A conversation about ``image``, with loss on every answer (and the end-of-turn text after it).

    Args:
        tokenizer: the extended tokenizer.
        vocab: its image layout.
        conversation: turns ``{"from": "human"|"gpt"|"system", "value": ...}`` (LLaVA) or chat messages
            ``{"role", "content"}``, ending with an answer. One ``<image>`` marks where the image goes;
            without it the image is put at the start of the first user turn.
        num_tokens: N, features per image.
        image: (3, H, W) in [-1, 1], or None for a text-only conversation.
    """
    ids, labels, mask = conversation_tokens(tokenizer, vocab, conversation, num_tokens, image is not None, False)
    return Example(input_ids=ids, labels=labels, image_mask=mask, code_mask=[False] * len(ids), image=image)


# ----------------------------------------------------------------------------- rows


def open_image_text(
    source: str, text_column: str, image_column: str = "image", split: str = "train"
) -> datasets.Dataset:
    """Image + text rows from an image directory (``metadata.jsonl`` beside the images), webdataset shards
    or a hub dataset id, with the image column undecoded (``vqrae.data.open_source``)."""
    cfg = DataConfig(source=source, split=split, image_column=image_column, text_columns=[text_column])
    return open_source(cfg)


def load_conversations(path: str) -> datasets.Dataset:
    """LLaVA-style conversation JSON (a list of ``{"image": path, "conversations": [...]}``) or JSON lines."""
    return datasets.load_dataset("json", data_files=path, split="train")


def _turns(value: Any) -> Optional[list[dict]]:
    """A conversation cell: LLaVA turns, chat messages, or ``{"question", "answer"}`` pairs -> turns."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    turns = []
    for item in value:
        if not isinstance(item, dict):
            return None
        if "question" in item:
            turns += [{"from": "human", "value": item["question"]}, {"from": "gpt", "value": item.get("answer")}]
        else:
            turns.append(item)
    return turns


class ExampleRows(Dataset):
    """Rows of a ``datasets.Dataset`` as ``Example``s; a row that cannot be used comes out as ``Skipped``.

    Args:
        rows: image + text rows (``open_image_text``, ``load_conversations``).
        task: "generation" (caption -> the image's codes) or "understanding" (image + conversation -> answers).
        tokenizer: the extended tokenizer.
        vocab: its image layout.
        num_tokens: N, tokens per image (``vqrae.num_tokens``).
        resolution: side of the square center crop given to the VQRAE (``vqrae.image_size``).
        text_column: the caption (generation) or conversation (understanding) column. A conversation is a
            list of LLaVA turns (``{"from", "value"}``) or of ``{"question", "answer"}`` pairs.
        image_column: the image column: undecoded images or file paths.
        image_root: directory that relative image paths are resolved against.
        cfg_dropout: generation only, see ``generation_example``.
        loss_on_text: generation only, see ``generation_example``.
        seed: with the epoch and row number, fixes each row's caption-dropout draw.
        cache_images: keep each row's decoded, cropped image in memory after its first use, so later epochs skip
            decoding (small data sets only: 4000 images of 48 px take ~110 MB; each DataLoader worker keeps its own).

    A key is a row number, or a ``vqrae.data.SampleKey`` from ``ResumableSampler`` (which adds the epoch).
    Images are center-cropped without flips: captions and questions may mention left and right.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        task: Literal["generation", "understanding"],
        tokenizer: PreTrainedTokenizerBase,
        vocab: ImageVocab,
        num_tokens: int,
        resolution: int,
        text_column: str,
        image_column: str = "image",
        image_root: Optional[str] = None,
        cfg_dropout: float = 0.1,
        loss_on_text: bool = False,
        seed: int = 0,
        cache_images: bool = False,
    ):
        if task not in ("generation", "understanding"):
            raise ValueError(f"task must be 'generation' or 'understanding', got '{task}'")
        for column in (text_column, image_column):
            if column not in rows.column_names:
                raise ValueError(f"column '{column}' not in the data; columns: {', '.join(rows.column_names)}")
        self.rows, self.task, self.tokenizer, self.vocab = rows, task, tokenizer, vocab
        self.num_tokens, self.resolution = num_tokens, resolution
        self.text_column, self.image_column, self.image_root = text_column, image_column, image_root
        self.cfg_dropout, self.loss_on_text, self.seed = cfg_dropout, loss_on_text, seed
        self._images: Optional[dict[int, tuple[torch.Tensor, str]]] = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Union[int, SampleKey]) -> Union[Example, Skipped]:
        key = key if isinstance(key, SampleKey) else SampleKey(int(key), 0, 0)
        row = self.rows[key.index]
        text = row.get(self.text_column)
        if self.task == "generation":
            if not isinstance(text, str) or not text.strip():
                return Skipped(f"missing_{self.text_column}")
        else:
            text = _turns(text)
            if text is None:
                return Skipped(f"missing_{self.text_column}")
        cached = self._images.get(key.index) if self._images is not None else None
        if cached is not None:
            pixels, status = cached
        else:
            value = row.get(self.image_column)
            if isinstance(value, str) and self.image_root and not os.path.isabs(value):
                value = os.path.join(self.image_root, value)
            img, status = load_image(value, draft_side=self.resolution)
            if img is None:
                return Skipped(status)
            pixels = center_view(img, self.resolution)
            if self._images is not None:
                self._images[key.index] = (pixels, status)
        if self.task == "generation":
            ex = generation_example(
                self.tokenizer, self.vocab, text, self.num_tokens, code_image=pixels, cfg_dropout=self.cfg_dropout,
                generator=dropout_generator(self.seed, key), loss_on_text=self.loss_on_text,
            )
        else:
            try:
                ex = understanding_example(self.tokenizer, self.vocab, text, self.num_tokens, image=pixels)
            except ValueError:
                return Skipped("bad_conversation")
        ex.status = status
        return ex

class CodeRows(Dataset):
    """Generation examples from captions and pre-computed codes (``tokenize_rows``), without reading images.

    Args:
        captions: the caption column of the source rows.
        codes: ``open_codes`` output, row-aligned with ``captions``.
        tokenizer: the extended tokenizer.
        vocab: its image layout.
        num_tokens: N, codes per image.
        cfg_dropout: see ``generation_example``.
        loss_on_text: see ``generation_example``.
        seed: caption dropout draws (``dropout_generator``), as ``ExampleRows`` makes them.
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
        ex = generation_example(
            self.tokenizer, self.vocab, text, self.num_tokens, codes=row["codes"], cfg_dropout=self.cfg_dropout,
            generator=dropout_generator(self.seed, key), loss_on_text=self.loss_on_text,
        )
        ex.status = row["status"]
        return ex


def task_rows(cfg: MLLMDataConfig, task: str, model: UnifiedModel) -> Dataset:
    """The examples of ``task`` from ``cfg`` for ``model``: ``ExampleRows``, or ``CodeRows`` with ``codes_from``.

    With ``codes_from``, call this before ``place_vqrae``: the codes are checked against the fingerprint of
    the VQRAE's stored weights.
    """
    common = dict(tokenizer=model.tokenizer, vocab=model.vocab, num_tokens=model.vqrae.num_tokens)
    resolution = cfg.resolution or model.vqrae.cfg.encoder.image_size
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



# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L), right-padded
    attention_mask: torch.Tensor  # (B, L), 1 = token, 0 = padding
    labels: torch.Tensor  # (B, L), IGNORE_INDEX on padding and positions without loss
    image_mask: torch.Tensor  # (B, L) bool: positions of the understanding images' features
    images: Optional[torch.Tensor]  # (M, 3, H, W) understanding images, in row order
    code_mask: torch.Tensor  # (B, L) bool: code positions filled from code_images by insert_codes
    code_images: Optional[torch.Tensor]  # (G, 3, H, W) images to generate, in row order
    data_stats: Counter = field(default_factory=Counter)  # status of every row drawn, kept or dropped

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn) -> "Batch":
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device: torch.device | str) -> "Batch":
        return self._map(lambda t: t.to(device))

    def pin_memory(self) -> "Batch":
        return self._map(torch.Tensor.pin_memory)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of ``UnifiedModel.forward``."""
        has_images = self.images is not None
        return dict(
            input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.labels,
            images=self.images, image_mask=self.image_mask if has_images else None,
        )


def collate(
    examples: Sequence[Union[Example, Skipped]], pad_id: int, max_length: Optional[int] = None
) -> Batch:
    """Right-pad the kept examples into a ``Batch``; skipped rows and rows over ``max_length`` are counted.

    Use with ``functools.partial(collate, pad_id=pad_token_id(tokenizer))``. A batch whose rows were all
    dropped has zero rows.
    """
    stats: Counter = Counter()
    kept: list[Example] = []
    for ex in examples:
        if isinstance(ex, Skipped):
            stats[ex.status] += 1
        elif max_length is not None and len(ex.input_ids) > max_length:
            stats["too_long"] += 1  # cutting would split an image's tokens from its features or codes
        else:
            stats[ex.status] += 1
            kept.append(ex)
    length = max((len(ex.input_ids) for ex in kept), default=0)
    input_ids = torch.full((len(kept), length), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(len(kept), length, dtype=torch.long)
    image_mask = torch.zeros(len(kept), length, dtype=torch.bool)
    code_mask = torch.zeros(len(kept), length, dtype=torch.bool)
    for row, ex in enumerate(kept):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
        image_mask[row, :n] = torch.tensor(ex.image_mask, dtype=torch.bool)
        code_mask[row, :n] = torch.tensor(ex.code_mask, dtype=torch.bool)
    images = [ex.image for ex in kept if ex.image is not None]
    code_images = [ex.code_image for ex in kept if ex.code_image is not None]
    return Batch(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, image_mask=image_mask,
        images=torch.stack(images) if images else None, code_mask=code_mask,
        code_images=torch.stack(code_images) if code_images else None, data_stats=stats,
    )


def insert_codes(batch: Batch, code_ids: torch.Tensor) -> Batch:
    """Write the code token ids (G, N) of ``batch.code_images`` into its inputs and labels at ``code_mask``.

    ``code_ids`` is ``UnifiedModel.tokenize_images(batch.code_images)``.
    """
    if batch.code_images is None and not bool(batch.code_mask.any()):
        return batch
    slots = int(batch.code_mask.sum())
    if slots != code_ids.numel():
        raise ValueError(f"code_mask marks {slots} positions but {code_ids.numel()} code ids were given")
    flat = code_ids.flatten().to(batch.input_ids.device)
    input_ids, labels = batch.input_ids.clone(), batch.labels.clone()
    input_ids[batch.code_mask] = flat
    labels[batch.code_mask] = flat
    return dataclasses.replace(batch, input_ids=input_ids, labels=labels, code_images=None)



def prepare_batch(model: UnifiedModel, batch: Batch, device: torch.device, precision: str = "fp32") -> Batch:
    """Move a micro-batch to ``device`` once and write the codes of its images to generate into it (encoded in
    ``precision``, as ``write_codes`` does for pre-computed codes)."""
    batch = batch.to(device)
    if batch.code_images is None:
        return batch
    with torch.inference_mode(), autocast(precision, device):
        code_ids = model.tokenize_images(batch.code_images)
    return insert_codes(batch, code_ids)


# ----------------------------------------------------------------------------- loader


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

