"""Prompts as the unified model reads them, the same in training and at inference.

- generation: ``generation_prompt_ids(caption)`` is what precedes ``<boi>`` and the image's codes; ``caption=""``
  gives the unconditional prompt of classifier-free guidance.
- understanding: a conversation whose ``<image>`` placeholder is expanded to N positions, marked in
  ``image_mask`` for the projected features (``conversation_tokens``), with the answers and the end-of-turn
  text that closes each marked for the loss.

Prompts follow the tokenizer's chat template when it has one, else a plain ``text\\n`` format. Only the
tokenizer is needed: training examples (``mllm.data``) and the sampler's prompts (``mllm.inference``) are
built from these functions, so both see identical ids.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Union

from transformers import PreTrainedTokenizerBase

from .vocab import IGNORE_INDEX, IMAGE, ImageVocab

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PROBE = "ANSWER_PROBE_7f3a"


@dataclass
class Prompt:
    input_ids: list[int]
    image_mask: list[bool]  # positions for the projected image features (UnifiedModel.embed)


@dataclass
class GenerationPrompts:
    cond: list[list[int]]  # one prompt per caption, each ending right before <boi>
    uncond: list[int]  # the empty-caption prompt for classifier-free guidance


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


def turn_end(tokenizer: PreTrainedTokenizerBase) -> str:
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
    end_text = turn_end(tokenizer)
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


def conversation_tokens(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ImageVocab,
    conversation: Sequence[dict],
    num_tokens: int,
    has_image: bool,
    add_generation_prompt: bool,
) -> tuple[list[int], list[int], list[bool]]:
    """(input ids, labels, image mask) of a conversation: ``<image>`` expanded to ``num_tokens`` masked
    positions, labels on the answers (IGNORE_INDEX elsewhere). It ends with an answer, or with a user turn and
    the template's generation prompt when ``add_generation_prompt`` (an inference prompt)."""
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
    ids, _, mask = conversation_tokens(tokenizer, vocab, conversation, num_tokens, has_image, True)
    return Prompt(input_ids=ids, image_mask=mask)

