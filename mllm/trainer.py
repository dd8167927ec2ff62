"""Unified-model training pieces, callable from the training script and from tests.

Joint training interleaves two tasks, one per micro-batch: generation (caption -> the image's VQRAE codes)
and understanding (image features + conversation -> answers). ``TaskSchedule`` decides the task of every
micro-batch from its index alone, so all ranks run the same task at the same time (their collectives stay
in step) and a resumed run continues the schedule from a saved counter. Each task reads its own data
through a ``TaskLoader``, whose saved state is the position after the last micro-batch trained on.

The VQRAE is frozen and only encodes images. It is kept out of the module tree (``unregister_vqrae``), so
DeepSpeed never casts, partitions, broadcasts or checkpoints it; ``place_vqrae`` puts the parts that encode
on the accelerator in the compute dtype. Generation codes are computed on the fly, or once per data set
with ``tokenize_rows`` (``scripts/tokenize_dataset.py``) and read back through ``codes_from``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from vqrae import VQRAE
from vqrae.config import ConfigError
from vqrae.data import DataConfig, ResumableSampler, SampleKey, load_image, open_source, transform
from vqrae.model import CONFIG_NAME as VQRAE_CONFIG, WEIGHTS_NAME as VQRAE_WEIGHTS
from vqrae.training import COMPUTE_DTYPES, OptimConfig, RunConfig, TrainingError, all_reduce_sum, autocast

from .data import (
    Batch, Example, ExampleRows, Skipped, collate, generation_example, insert_codes, load_conversations,
    open_image_text, pad_token_id,
)
from .model import CONFIG_NAME, MLLMConfig, UnifiedModel, UnifiedOutput
from .vocab import ImageVocab

GENERATION, UNDERSTANDING = "generation", "understanding"
TASKS = (GENERATION, UNDERSTANDING)
CODES_MANIFEST = "codes.json"
_PRECISION_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


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


@dataclass
class MLLMTrainConfig:
    init_from: Optional[str] = None  # UnifiedModel export of an earlier stage (e.g. <projector pretraining>/model)
    # llm and vqrae may stay empty with init_from; model.dtype always follows run.precision
    model: MLLMConfig = field(default_factory=lambda: MLLMConfig(llm="", vqrae=""))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, schedule="cosine", min_lr_ratio=0.0, warmup_steps=100,
                                            weight_decay=0.0)
    )
    data: MLLMDataConfig = field(default_factory=MLLMDataConfig)
    run: RunConfig = field(
        default_factory=lambda: RunConfig(output_dir="outputs/mllm", batch_size=128, micro_batch_size=4, ema_decay=0.0,
                                          image_every=0)
    )


def check_config(cfg: MLLMTrainConfig) -> None:
    """Raise ``ConfigError`` (one line) for settings that cannot train, before anything is loaded."""
    data, model = cfg.data, cfg.model
    if not 0.0 <= data.task_ratio <= 1.0:
        raise ConfigError(f"data.task_ratio must lie in [0, 1], got {data.task_ratio}")
    if data.task_ratio > 0 and not data.generation.source:
        raise ConfigError(f"data.task_ratio={data.task_ratio} needs data.generation.source (image-caption rows)")
    if data.task_ratio < 1 and not data.understanding.source:
        raise ConfigError(f"data.task_ratio={data.task_ratio} needs data.understanding.source (conversations)")
    if model.freeze_llm and model.lora.enabled:
        raise ConfigError("model.freeze_llm and model.lora.enabled contradict each other: pick one")
    if model.freeze_llm and data.task_ratio > 0:
        raise ConfigError("model.freeze_llm trains only the projector, which generation never uses: set data.task_ratio=0")
    if cfg.run.ema_decay > 0:
        raise ConfigError("run.ema_decay: the unified-model trainer keeps no EMA; set it to 0")
    if cfg.init_from:
        if not os.path.isfile(os.path.join(cfg.init_from, CONFIG_NAME)):
            raise ConfigError(
                f"init_from '{cfg.init_from}' is not a unified model export (no {CONFIG_NAME}); run the earlier "
                "stage first (e.g. configs/mllm/llava15_pretrain.yaml)"
            )
    else:
        for name in ("llm", "vqrae"):
            if not getattr(model, name):
                raise ConfigError(f"model.{name} is not set (or give init_from, an earlier stage's export)")
    if data.generation.codes_from and not os.path.isfile(os.path.join(data.generation.codes_from, CODES_MANIFEST)):
        raise ConfigError(
            f"data.generation.codes_from '{data.generation.codes_from}' holds no {CODES_MANIFEST}; write it with "
            "scripts/tokenize_dataset.py"
        )


# ----------------------------------------------------------------------------- task schedule


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


# ----------------------------------------------------------------------------- model


def build_model(cfg: MLLMTrainConfig) -> tuple[UnifiedModel, str]:
    """The model to train and the directory of its VQRAE checkpoint.

    A new model comes from ``cfg.model``. With ``cfg.init_from``, the LLM, extended tokenizer, VQRAE and
    projector come from that export (a LoRA export is merged first) and ``cfg.model`` decides how they train
    (freezing, LoRA, gradient checkpointing). The LLM trains in fp32 master weights whatever ``run.precision``
    (bf16 is autocast, ``vqrae.training``); the saved config records the run's compute dtype, in which
    inference loads the LLM on an accelerator.
    """
    dtype = _PRECISION_DTYPES.get(cfg.run.precision)
    if dtype is None:
        raise ConfigError(f"run.precision must be one of {', '.join(_PRECISION_DTYPES)}, got '{cfg.run.precision}'")
    model_cfg = dataclasses.replace(cfg.model, dtype="float32")
    if not cfg.init_from:
        model = UnifiedModel.build(model_cfg)
        model.cfg = dataclasses.replace(model.cfg, dtype=dtype)
        return model, model_cfg.vqrae
    # Trust is this run's decision (model.trust_remote_code), not the export's.
    base = UnifiedModel.from_pretrained(cfg.init_from, trust_remote_code=cfg.model.trust_remote_code)
    if base.cfg.lora.enabled:
        base.merge_lora()
    # An earlier stage may have frozen the LLM; this stage's config decides again.
    llm = base.llm.requires_grad_(True).to(torch.float32)
    model_cfg = dataclasses.replace(
        model_cfg, dtype=dtype, llm=base.cfg.llm, vqrae=base.cfg.vqrae, gguf_file=None,  # the export holds safetensors
        projector=base.cfg.projector,
    )
    positions = base.image_position_table() if model_cfg.image_positions else None  # None: a fresh zero table
    model = UnifiedModel(model_cfg, llm, base.tokenizer, base.vqrae, base.projector, image_positions=positions)
    return model, os.path.join(cfg.init_from, "vqrae")


def unregister_vqrae(model: UnifiedModel) -> VQRAE:
    """Keep ``model.vqrae`` usable but outside the module tree: it leaves ``parameters()``, ``state_dict()``,
    ``.to()`` and therefore everything DeepSpeed does to the module (casts, ZeRO partitions, checkpoints)."""
    vqrae = model._modules.pop("vqrae", None)
    if vqrae is None:
        return model.vqrae
    object.__setattr__(model, "vqrae", vqrae)
    return vqrae


def place_vqrae(vqrae: VQRAE, device: torch.device) -> None:
    """Move the parts that encode (encoder, quantizer) to ``device``, in fp32; the decoder is never used in
    training and stays where it is. A bf16 run encodes under autocast (``vqrae.training.autocast``), as the
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


def export_model(model: UnifiedModel, path: str, vqrae_dir: str, zero3: bool = False, rank: int = 0) -> None:
    """``model.save_pretrained(path)`` with the VQRAE copied from ``vqrae_dir``, whose weights are the source
    of truth (the trained copy may have been cast to the compute dtype). Under ZeRO-3 every rank must call
    this: the partitioned parameters are gathered, then rank 0 writes."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if rank == 0:
                _export(model, path, vqrae_dir)
    elif rank == 0:
        _export(model, path, vqrae_dir)


def _export(model: UnifiedModel, path: str, vqrae_dir: str) -> None:
    model.save_pretrained(path)
    target = os.path.join(path, "vqrae")
    shutil.rmtree(target)
    os.makedirs(target)
    for name in (VQRAE_CONFIG, VQRAE_WEIGHTS):
        shutil.copy2(os.path.join(vqrae_dir, name), os.path.join(target, name))


# ----------------------------------------------------------------------------- data


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
        return batch, {"epoch": last.epoch, "position": last.position}


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
        self._state, self._iter = dict(state), None


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


def prepare_batch(model: UnifiedModel, batch: Batch, device: torch.device, precision: str = "fp32") -> Batch:
    """Move a micro-batch to ``device`` once and write the codes of its images to generate into it (encoded in
    ``precision``, as ``write_codes`` does for pre-computed codes)."""
    batch = batch.to(device)
    if batch.code_images is None:
        return batch
    with torch.inference_mode(), autocast(precision, device):
        code_ids = model.tokenize_images(batch.code_images)
    return insert_codes(batch, code_ids)


# ----------------------------------------------------------------------------- pre-computed codes


def _pixels(value: Any, resolution: int) -> tuple[Optional[torch.Tensor], str]:
    """The crop ``ExampleRows`` gives the VQRAE, so pre-computed and on-the-fly codes agree."""
    img, status = load_image(value, draft_side=resolution)
    if img is None:
        return None, status
    return transform(img, resolution, random_crop=False, hflip=False, rng=np.random.default_rng(0)), status


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


# ----------------------------------------------------------------------------- bookkeeping


class TaskMetrics:
    """Per-task loss and token sums over a logging window, kept on the device so a step costs no host sync.

    Args:
        device: where the loss sums live.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.losses = torch.zeros(len(TASKS), 2, device=self.device)  # (task, [loss, image_loss])
        self.steps = [0] * len(TASKS)
        self.tokens = [0] * len(TASKS)
        self.start = time.perf_counter()

    def add(self, task: str, out: UnifiedOutput, tokens: int) -> None:
        """One trained micro-batch of ``task`` with ``tokens`` non-padding input tokens on this rank."""
        t = TASKS.index(task)
        self.losses[t] += torch.stack([out.loss.detach(), out.image_loss.detach()]).float()
        self.steps[t] += 1
        self.tokens[t] += tokens

    def summary(self, data_stats: Counter) -> dict[str, float]:
        """Window means over all ranks (a collective: every rank calls it), then ``reset``.

        ``data_stats`` is this rank's running count of row statuses; the totals of dropped rows are summed
        over ranks.
        """
        skipped = sum(v for k, v in data_stats.items() if k != "ok" and not k.startswith("converted"))
        host = torch.tensor(self.steps + self.tokens + [skipped, data_stats.get("too_long", 0)], dtype=torch.float64)
        values = all_reduce_sum(torch.cat([self.losses.flatten().double(), host.to(self.device)])).tolist()
        n = len(TASKS)
        losses, steps, tokens = values[: 2 * n], values[2 * n : 3 * n], values[3 * n : 4 * n]
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out: dict[str, float] = {}
        for t, task in enumerate(TASKS):
            if steps[t]:
                out[f"{task}/loss"] = losses[2 * t] / steps[t]
                if task == GENERATION:
                    out[f"{task}/image_loss"] = losses[2 * t + 1] / steps[t]
                out[f"{task}/tokens_per_s"] = tokens[t] / elapsed
        out["tokens_per_s"] = sum(tokens) / elapsed
        out["data/skipped"], out["data/too_long"] = values[-2], values[-1]
        self.reset()
        return out
