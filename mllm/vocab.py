"""Image tokens in a language model's vocabulary.

Generation writes an image as ``<boi>`` + N code tokens + ``<eoi>``, where code index i of the VQRAE
codebook is the token ``<img_{i:05d}>``. The K code tokens occupy one contiguous id range, so code <-> id is
an offset. Understanding marks where an image goes with one ``<image>`` placeholder, which the data pipeline
expands to N positions and records in a boolean mask; the model never looks for the placeholder id.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

BOI, EOI, IMAGE = "<boi>", "<eoi>", "<image>"
IGNORE_INDEX = -100  # label of positions that carry no loss (the Hugging Face convention)
_CODE = re.compile(r"<img_(\d{5,})>")


def code_token(index: int) -> str:
    """The vocabulary string of image code ``index``."""
    return f"<img_{index:05d}>"


@dataclass(frozen=True)
class ImageVocab:
    """Where the image tokens sit in an extended tokenizer.

    Args:
        code_offset: token id of code 0; code i is ``code_offset + i``.
        codebook_size: K, the number of code tokens.
        boi_id: token id that opens a generated image.
        eoi_id: token id that closes a generated image.
        image_id: token id of the ``<image>`` placeholder in understanding prompts.
    """

    code_offset: int
    codebook_size: int
    boi_id: int
    eoi_id: int
    image_id: int

    def __post_init__(self) -> None:
        if self.codebook_size <= 0 or self.code_offset < 0:
            raise ValueError(f"ImageVocab needs codebook_size > 0 and code_offset >= 0, got {self}")

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "ImageVocab":
        """Read the layout of a tokenizer that already holds the image tokens (see ``add_image_tokens``)."""
        codes = _code_tokens(tokenizer)
        missing = [t for t in (BOI, EOI, IMAGE) if t not in tokenizer.get_vocab()]
        if not codes or missing:
            lacking = missing or "no <img_*> codes"
            raise ValueError(f"tokenizer lacks image tokens ({lacking}); call add_image_tokens first")
        k = len(codes)
        if sorted(codes) != list(range(k)):
            raise ValueError(f"tokenizer's image code tokens are not <img_00000>..<img_{k - 1:05d}> without gaps")
        ids = [codes[i] for i in range(k)]
        if ids != list(range(ids[0], ids[0] + k)):
            raise ValueError(f"tokenizer's {k} image code tokens do not occupy one contiguous id range")
        vocab = tokenizer.get_vocab()
        return cls(code_offset=ids[0], codebook_size=k, boi_id=vocab[BOI], eoi_id=vocab[EOI], image_id=vocab[IMAGE])

    @property
    def code_ids(self) -> range:
        return range(self.code_offset, self.code_offset + self.codebook_size)

    @property
    def token_ids(self) -> list[int]:
        """Every image-related id: the codes, ``<boi>``, ``<eoi>`` and ``<image>``."""
        return [*self.code_ids, self.boi_id, self.eoi_id, self.image_id]

    def to_tokens(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Code indices in [0, K) -> token ids, same shape."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            lo, hi = int(codes.min()), int(codes.max())
            raise ValueError(f"image codes must lie in [0, {self.codebook_size}), got [{lo}, {hi}]")
        return codes + self.code_offset

    def to_codes(self, token_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Token ids of image codes -> code indices in [0, K), same shape."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        if token_ids.numel() and not bool(self.is_code(token_ids).all()):
            raise ValueError(f"token ids outside the image code range [{self.code_ids.start}, {self.code_ids.stop})")
        return token_ids - self.code_offset

    def is_code(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the ids that are image codes."""
        return (token_ids >= self.code_offset) & (token_ids < self.code_offset + self.codebook_size)


def _code_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[int, int]:
    """code index -> token id for every ``<img_NNNNN>`` token in the tokenizer."""
    found = {}
    for token, token_id in tokenizer.get_added_vocab().items():
        match = _CODE.fullmatch(token)
        if match:
            found[int(match.group(1))] = token_id
    return found


def add_image_tokens(tokenizer: PreTrainedTokenizerBase, codebook_size: int) -> ImageVocab:
    """Add K code tokens, ``<boi>``, ``<eoi>`` and ``<image>`` to ``tokenizer`` (in place) and return the layout.

    A tokenizer that already holds image tokens is left unchanged, and its K must equal ``codebook_size``.
    New tokens are special: never split, never merged with neighbouring text, dropped by
    ``decode(..., skip_special_tokens=True)``.
    """
    existing = _code_tokens(tokenizer)
    if existing:
        if len(existing) != codebook_size:
            raise ValueError(
                f"tokenizer holds {len(existing)} image code tokens but the VQRAE codebook has {codebook_size} codes"
            )
        return ImageVocab.from_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    # Codes first and in one call: the tokenizer hands out consecutive ids, which from_tokenizer checks.
    tokenizer.add_tokens([code_token(i) for i in range(codebook_size)], special_tokens=True)
    tokenizer.add_tokens([t for t in (BOI, EOI, IMAGE) if t not in vocab], special_tokens=True)
    return ImageVocab.from_tokenizer(tokenizer)


@torch.no_grad()
def resize_embeddings(
    llm: PreTrainedModel,
    num_tokens: int,
    new_ids: Sequence[int],
    reference_rows: int,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    offsets: torch.Tensor | None = None,
) -> None:
    """Grow the input embeddings and LM head to ``num_tokens`` rows and initialise the rows of ``new_ids``.

    Each new row is the mean of rows ``[0, reference_rows)`` (the tokens the LLM was trained on) plus
    Gaussian noise of std ``noise_std``: starting at the mean keeps the new tokens' logits near the average
    and leaves the model's text distribution almost unchanged (Hewitt, 2021, "Initializing new word
    embeddings for pretrained language models"). Every other row keeps its exact bits. A matrix that already
    has enough rows (vocabularies padded for speed) is not shrunk. Tied LM heads share the input matrix and
    are written once.

    Args:
        llm: the causal LM, changed in place.
        num_tokens: rows needed (the extended tokenizer's length).
        new_ids: token ids whose rows are initialised.
        reference_rows: rows averaged for the initial value.
        noise_std: std of the noise added to each new row; 0 gives exactly the mean.
        generator: RNG for the noise.
        offsets: (len(new_ids), H) values added to the mean instead of noise (``codebook_offsets``).
    """
    weight = llm.get_input_embeddings().weight
    old_rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 may hold a partition here
    if num_tokens > old_rows:
        # mean_resizing=False: transformers would draw from a Gaussian fitted to the old rows; the rows are
        # written below anyway. Whatever the resizing draws is overwritten: it moves no RNG the caller uses, so
        # a model built whole and one built partitioned (which draws differently) start from the same numbers.
        with torch.random.fork_rng(devices=[]):
            llm.resize_token_embeddings(num_tokens, mean_resizing=False)
    index = torch.as_tensor(list(new_ids), dtype=torch.long)
    reference_rows = min(reference_rows, old_rows)
    if not len(index):
        return
    if int(index.min()) < reference_rows:
        raise ValueError(f"new token ids start at {int(index.min())}, inside the {reference_rows} reference rows")
    embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if offsets is not None and tuple(offsets.shape) != (len(index), embed.weight.shape[1]):
        raise ValueError(f"offsets have shape {tuple(offsets.shape)}, expected {(len(index), embed.weight.shape[1])}")
    weights = [embed.weight]
    if head is not None and head.weight is not embed.weight:
        weights.append(head.weight)
    bias = getattr(head, "bias", None)
    with _whole([*weights, *([bias] if bias is not None else [])]):
        for weight in weights:
            mean = weight[:reference_rows].float().mean(dim=0)
            rows = mean.expand(len(index), -1).clone()
            if offsets is not None:
                rows += offsets.float().to(rows.device)
            elif noise_std > 0:
                rows += noise_std * torch.randn(rows.shape, generator=generator).to(rows.device)
            weight[index.to(weight.device)] = rows.to(device=weight.device, dtype=weight.dtype)
        if bias is not None:
            bias[index.to(bias.device)] = bias[:reference_rows].float().mean().to(bias.dtype)


def _whole(params: list):
    """Inside the block, ``params`` whole: those ZeRO-3 partitioned at construction (``ds_id``) are gathered, and
    what rank 0 writes into them is partitioned again on every rank when it ends (every rank computes the same
    rows). Parameters held whole need nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed  # only a model built under ZeRO-3 gets here

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@torch.no_grad()
def codebook_offsets(codebook: torch.Tensor, width: int, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(K, ``width``) row offsets for the K code tokens that keep the geometry of ``codebook`` (K, e).

    The centred codes go through a random projection, orthonormal when e <= ``width`` (inner products between
    codes carry over exactly, up to the common scale) and a random orthonormal subspace otherwise; the result
    is scaled to overall std ``std``. Codes the tokenizer finds alike then start alike in the LLM, so what it
    learns about one code reaches its neighbours from the first step.
    """
    if std <= 0:
        raise ValueError(f"codebook offsets need a positive std, got {std}")
    codes = codebook.detach().float().cpu()
    codes = codes - codes.mean(dim=0)
    e = codes.shape[1]
    basis, _ = torch.linalg.qr(torch.randn(max(e, width), min(e, width), generator=generator))
    out = codes @ (basis.t() if e <= width else basis)  # (K, width)
    return out * (std / out.std().clamp_min(1e-12))
