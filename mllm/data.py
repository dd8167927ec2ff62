"""Training examples for the unified model: prompts, label masks, batching and datasets.

Both tasks are next-token prediction over one token sequence:

- generation: ``generation_prompt_ids(caption)`` + ``<boi>`` + N image-code tokens + ``<eoi>``, with loss on
  the code tokens and ``<eoi>``. With probability ``cfg_dropout`` the caption is replaced by "", so the model
  also learns the unconditional distribution that classifier-free guidance needs (Ho & Salimans, 2022). The
  sampler's prompts come from the same function, so training and inference see identical ids.
- understanding: a conversation whose ``<image>`` placeholder is expanded to N positions, marked in
  ``image_mask`` for the projected features; loss on the answers and the end-of-turn text that closes each.

Prompts follow the tokenizer's chat template when it has one, else a plain ``text\\n`` format. Image codes
are usually computed on the accelerator: a generation example then carries its image in ``code_image`` and
placeholder ids at ``code_mask``, and ``insert_codes`` writes the codes into the batch.
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
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vqrae.data import DataConfig, SampleKey, load_image, open_source, transform

from .model import IGNORE_INDEX
from .vocab import IMAGE, ImageVocab

PENDING = -1  # input id at code positions until insert_codes fills them
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PROBE = "ANSWER_PROBE_7f3a"


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


@dataclass
class Prompt:
    input_ids: list[int]
    image_mask: list[bool]  # positions for the projected image features (UnifiedModel.embed)


@dataclass
class GenerationPrompts:
    cond: list[list[int]]  # one prompt per caption, each ending right before <boi>
    uncond: list[int]  # the empty-caption prompt for classifier-free guidance


# ----------------------------------------------------------------------------- prompts


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its eos id (pads are masked out, so any id works), else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def generation_prompt_ids(tokenizer: PreTrainedTokenizerBase, caption: str) -> list[int]:
    """Ids of the prompt that precedes ``<boi>``; ``caption=""`` gives the unconditional prompt."""
    if _has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True
        )
        return _encode(tokenizer, text)
    return _bos(tokenizer) + _encode(tokenizer, caption + "\n")


def generation_prompts(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str]) -> GenerationPrompts:
    """Conditional and unconditional prompts for ``mllm.sample.generate_image_codes``."""
    return GenerationPrompts(
        cond=[generation_prompt_ids(tokenizer, c) for c in captions], uncond=generation_prompt_ids(tokenizer, "")
    )


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


def _messages(conversation: Sequence[dict]) -> list[dict]:
    """LLaVA turns ({"from", "value"}) or chat messages ({"role", "content"}) -> chat messages."""
    messages = []
    for turn in conversation:
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLES or not isinstance(content, str):
            raise ValueError(f"a turn needs from/value or role/content with role in {sorted(_ROLES)}, got {turn}")
        messages.append({"role": _ROLES[role], "content": content})
    return messages


def _turn_end(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the chat template writes after an answer (e.g. ``<|im_end|>\\n``): it teaches the model to stop."""
    probe = [{"role": "user", "content": "question"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    at = text.rfind(_PROBE)
    return text[at + len(_PROBE) :] if at >= 0 else ""


def _chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool
) -> list[tuple[list[int], bool]]:
    """(ids, is_answer) pieces of the rendered conversation.

    The template renders the whole conversation once; each turn's text is then found in order (templates
    may add system prompts, role headers or strip whitespace, but write the content verbatim). An answer
    piece is its content plus the template's end-of-turn text. Pieces are tokenised separately so that an
    answer starts on a token boundary, as it does when the model generates it after the prompt.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    end_text = _turn_end(tokenizer)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for message in messages:
        content = message["content"].strip()
        start = text.find(content, cursor)
        if start < 0:
            raise ValueError("the chat template does not reproduce a turn's text verbatim")
        end = start + len(content)
        if message["role"] == "assistant":
            rest = text[end : end + len(end_text)]
            end += len(os.path.commonprefix([rest, end_text]))
            pieces += [(text[cursor:start], False), (text[start:end], True)]
        else:
            pieces.append((text[cursor:end], False))
        cursor = end
    pieces.append((text[cursor:], False))
    return [(_encode(tokenizer, piece), answer) for piece, answer in pieces if piece]


def _plain_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[tuple[list[int], bool]]:
    """(ids, is_answer) pieces of ``question\\n`` + ``answer<eos>`` turns, for tokenizers without a template."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = [(_bos(tokenizer), False)]
    for message in messages:
        if message["role"] == "assistant":
            pieces.append((_encode(tokenizer, message["content"]) + eos, True))
        else:
            pieces.append((_encode(tokenizer, message["content"] + "\n"), False))
    return pieces


def _conversation(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ImageVocab,
    conversation: Sequence[dict],
    num_tokens: int,
    has_image: bool,
    add_generation_prompt: bool,
) -> tuple[list[int], list[int], list[bool]]:
    messages = _messages(conversation)
    expected_last = "user" if add_generation_prompt else "assistant"
    if not messages or messages[-1]["role"] != expected_last:
        raise ValueError(f"the conversation must end with a {expected_last} turn")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise ValueError("an answer is empty")
    placeholders = sum(m["content"].count(IMAGE) for m in messages)
    if has_image and placeholders == 0:
        # LLaVA convention: the image comes first in the first user turn.
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first] = {"role": "user", "content": f"{IMAGE}\n{messages[first]['content']}"}
        placeholders = 1
    if placeholders != int(has_image):
        raise ValueError(f"the conversation holds {placeholders} {IMAGE} placeholders for {int(has_image)} image")
    if _has_chat_template(tokenizer):
        pieces = _chat_segments(tokenizer, messages, add_generation_prompt)
    else:
        pieces = _plain_segments(tokenizer, messages)
    ids, labels, mask = [], [], []
    for piece, answer in pieces:
        for token in piece:
            if token == vocab.image_id:
                ids += [token] * num_tokens
                labels += [IGNORE_INDEX] * num_tokens
                mask += [True] * num_tokens
            else:
                ids.append(token)
                labels.append(token if answer else IGNORE_INDEX)
                mask.append(False)
    if sum(mask) != num_tokens * int(has_image):
        raise ValueError(f"the tokenised conversation does not hold exactly one {IMAGE} token per image")
    return ids, labels, mask


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
    ids, labels, mask = _conversation(tokenizer, vocab, conversation, num_tokens, image is not None, False)
    return Example(input_ids=ids, labels=labels, image_mask=mask, code_mask=[False] * len(ids), image=image)


def understanding_prompt(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ImageVocab,
    conversation: Union[str, Sequence[dict]],
    num_tokens: int,
    has_image: bool = True,
) -> Prompt:
    """The inference prompt for a question (or a conversation ending with a user turn), laid out as in training."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    ids, _, mask = _conversation(tokenizer, vocab, conversation, num_tokens, has_image, True)
    return Prompt(input_ids=ids, image_mask=mask)


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


# ----------------------------------------------------------------------------- datasets


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
            pixels = transform(img, self.resolution, random_crop=False, hflip=False, rng=np.random.default_rng(0))
            if self._images is not None:
                self._images[key.index] = (pixels, status)
        if self.task == "generation":
            seed = int(np.random.default_rng([self.seed, key.epoch, key.index]).integers(2**62))
            ex = generation_example(
                self.tokenizer, self.vocab, text, self.num_tokens, code_image=pixels, cfg_dropout=self.cfg_dropout,
                generator=torch.Generator().manual_seed(seed), loss_on_text=self.loss_on_text,
            )
        else:
            try:
                ex = understanding_example(self.tokenizer, self.vocab, text, self.num_tokens, image=pixels)
            except ValueError:
                return Skipped("bad_conversation")
        ex.status = status
        return ex
