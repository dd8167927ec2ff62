"""Multi-turn chat about one image: the turns, the prompt for the next answer, and answers streamed as text.

A ``Conversation`` holds one image (already at the model's input resolution) and the finished turns. The
prompt for the next answer is the whole conversation through the tokenizer's chat template, laid out as in
training (``mllm.prompts.understanding_prompt``): the image's N features sit where the ``<image>`` placeholder is,
at the start of the first question unless a question places it. One question and no earlier turns give
exactly the prompt of ``mllm.inference.answer_question``::

    conversation = start_conversation(model, read_chat_image("photo.png"))
    for piece in stream_answer(model, conversation, "What colour is the shape?"):
        print(piece, end="", flush=True)
    conversation.add(question, answer)      # the caller records the turn once the answer is complete

``stream_answer`` runs the same prefill and one-token steps as ``mllm.sample.generate_text``
(``mllm.sample.stream_text``: same sampler, same KV cache) and yields the answer's new text after each token, so
its pieces join to the answer ``chat_answer`` returns for the same inputs and seed. Input problems are
``ValueError``s with one-line messages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
from PIL import Image

from vqrae.images import center_view, load_image

from .inference import answer_budget, stop_ids
from .model import UnifiedModel
from .prompts import understanding_prompt
from .sample import generate_text, stream_text
from .sampling import SamplingConfig, answer_sampling

MAX_IMAGE_PIXELS = 20_000_000  # uploads above this are refused: decoding them costs memory for nothing at 256 px


@dataclass
class Turn:
    question: str
    answer: str


@dataclass
class Conversation:
    """One image and the turns about it so far."""

    image: torch.Tensor  # (3, R, R) in [-1, 1], R the VQRAE's resolution
    turns: list[Turn] = field(default_factory=list)

    def add(self, question: str, answer: str) -> None:
        """Record a finished turn; the next prompt holds it."""
        self.turns.append(Turn(question=question, answer=answer))

    def reset(self) -> None:
        """Forget the turns; keep the image."""
        self.turns.clear()

    def messages(self, question: str) -> list[dict]:
        """Chat messages of every turn so far plus ``question`` as the last user turn."""
        messages = []
        for turn in self.turns:
            messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
        return messages + [{"role": "user", "content": question}]


@dataclass
class ChatPrompt:
    input_ids: list[int]  # the rendered conversation; image positions hold the <image> id
    image_mask: list[bool]  # True at the N positions the image's projected features fill
    max_new_tokens: int  # the answer budget asked for, lowered to the positions the LLM has left


def read_chat_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file as RGB; a one-line ``ValueError`` for a missing, corrupt, tiny or too large file."""
    image, status = load_image(path, max_pixels=max_pixels)
    if image is not None:
        return image
    if status == "too_large":
        raise ValueError(f"the image has more than {max_pixels / 1e6:g} megapixels: use a smaller one")
    if status == "missing":
        raise ValueError(f"no image file at '{path}'")
    raise ValueError(f"cannot use this image: {status.replace('_', ' ')}")


def start_conversation(model: UnifiedModel, image: Union[Image.Image, torch.Tensor]) -> Conversation:
    """A conversation about ``image``: a PIL image is center-cropped and resized as in training; a tensor must
    already be (3, R, R) in [-1, 1]."""
    if isinstance(image, Image.Image):
        image = center_view(image, model.vqrae.image_size)
    side = model.vqrae.image_size
    if image.shape != (3, side, side):
        raise ValueError(f"the image must be (3, {side}, {side}), got {tuple(image.shape)}")
    return Conversation(image=image)


def chat_prompt(
    model: UnifiedModel, conversation: Conversation, question: str, max_new_tokens: int = 128
) -> ChatPrompt:
    """The prompt for the answer to ``question`` after the conversation's turns."""
    if not question.strip():
        raise ValueError("the question is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = understanding_prompt(model.tokenizer, model.vocab, conversation.messages(question), model.vqrae.num_tokens)
    max_new_tokens = answer_budget(model, len(prompt.input_ids), max_new_tokens, "the conversation with its image",
                                   ": start a new conversation")
    return ChatPrompt(input_ids=prompt.input_ids, image_mask=prompt.image_mask, max_new_tokens=max_new_tokens)


def _embed(model: UnifiedModel, conversation: Conversation, prompt: ChatPrompt) -> torch.Tensor:
    device = next(model.llm.parameters()).device
    ids = torch.tensor([prompt.input_ids], device=device)
    mask = torch.tensor([prompt.image_mask], device=device)
    with torch.inference_mode():
        return model.embed(ids, conversation.image[None].to(device), mask)  # (1, L, H)


def chat_answer(model: UnifiedModel, conversation: Conversation, question: str, *, max_new_tokens: int = 128,
                sampling: Optional[SamplingConfig] = None, generator: Optional[torch.Generator] = None) -> str:
    """The whole answer to ``question`` at once (``generate_text``), special tokens removed; greedy by default."""
    prompt = chat_prompt(model, conversation, question, max_new_tokens)
    answer = generate_text(
        model.llm, inputs_embeds=_embed(model, conversation, prompt), max_new_tokens=prompt.max_new_tokens,
        sampling=sampling or answer_sampling(), eos_id=stop_ids(model), generator=generator,
    )[0]
    return model.tokenizer.decode(answer, skip_special_tokens=True).strip()


def stream_answer(model: UnifiedModel, conversation: Conversation, question: str, *, max_new_tokens: int = 128,
                  sampling: Optional[SamplingConfig] = None, generator: Optional[torch.Generator] = None,
                  ) -> Iterator[str]:
    """The answer to ``question`` as text pieces, one per decoded token that adds visible text.

    The prompt is built and checked before this returns, so a bad question raises here. Text is held
    back while it ends in an incomplete UTF-8 character; leading and trailing whitespace is dropped as in
    ``chat_answer``. The conversation is not changed: record the turn with ``conversation.add``.
    """
    prompt = chat_prompt(model, conversation, question, max_new_tokens)
    embeds = _embed(model, conversation, prompt)
    tokens = stream_text(model.llm, embeds, max_new_tokens=prompt.max_new_tokens,
                         sampling=sampling or answer_sampling(), eos_id=stop_ids(model), generator=generator)
    return _text_pieces(model.tokenizer, tokens)


def _text_pieces(tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """New visible text after each token. Each token's text is the growth of the decoded (stripped) prefix,
    so pieces join to the decoded whole even where a tokenizer joins tokens with spaces or merges bytes."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if len(text) > len(shown) and text.startswith(shown) and not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    final = tokenizer.decode(ids, skip_special_tokens=True).strip()
    if len(final) > len(shown) and final.startswith(shown):
        yield final[len(shown):]
