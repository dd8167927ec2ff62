"""The stand-in LLM: a small randomly initialised causal LM and a word-level tokenizer over a handful of texts,
saved like any Hugging Face model directory. The demo trains on it (``scripts/make_demo_llm.py``), the tests and
the benchmarks build theirs here too; nothing is downloaded. A real run names a hub LLM instead.

It sits in the installed ``demo`` package, beside the demo's data set, because it is a stand-in like that data set:
``vqrae`` and ``mllm`` wrap whatever LLM they are given and never make one up, while the scripts, tests and
benchmarks that need one are not installed, so none of them could serve the others. It needs only torch,
tokenizers and transformers, none of the ``demo`` extra.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM,
)

# ChatML, the template of Qwen and many others: each turn between <|im_start|>role\n and <|im_end|>\n
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")  # ids 0-5 of a chat tokenizer
PLAIN_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0-3 of a plain one; "\n", a word, is id 4

# The tests' shape: under 100k parameters with a word-level vocabulary, milliseconds per step on a CPU
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def word_tokenizer(texts: Iterable[str], chat: bool = True, by_frequency: bool = True,
                   size: Optional[int] = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is the special tokens, then every word of ``texts``.

    Args:
        texts: the sentences whose words (as the tokenizer itself splits them) make up the vocabulary.
        chat: ChatML (``CHAT_TEMPLATE``, ``CHAT_TOKENS``), words split at whitespace and punctuation runs. Else a
            plain tokenizer (``PLAIN_TOKENS``) for prompts that end with a newline: newlines are tokens, each
            punctuation mark stands alone and decoding joins words with spaces.
        by_frequency: the most frequent words first, ties in sorted order, as tokenizers' ``WordLevelTrainer``
            numbers them; else sorted.
        size: pad the vocabulary to ``size`` tokens with words ``filler<id>`` (a vocabulary as long as a real
            LLM's), or None.
    """
    if chat:
        specials, fixed, split = CHAT_TOKENS, [], pre_tokenizers.Whitespace()
    else:
        specials, fixed = PLAIN_TOKENS, ["\n"]
        split = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex(" +"), behavior="removed"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ])
    counts = Counter(word for text in texts for word, _ in split.pre_tokenize_str(text))
    key = (lambda w: (-counts[w], w)) if by_frequency else None
    words = [w for w in sorted(counts, key=key) if w not in specials and w not in fixed]
    vocab = {token: i for i, token in enumerate([*specials, *fixed, *words])}
    if size is not None:
        vocab.update({f"filler{i}": i for i in range(len(vocab), size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(list(specials))  # matched whole before the split: "<|im_start|>" is one token
    if chat:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>")
        fast.chat_template = CHAT_TEMPLATE
        return fast
    tok.decoder = decoders.WordPiece(prefix="##")  # no word carries the prefix: it joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def standin_llm(family: str, vocab_size: int, seed: int = 0, device: torch.device | str = "cpu",
                **config) -> PreTrainedModel:
    """A randomly initialised causal LM of the ``TINY`` shape, or whatever ``config`` changes of it.

    Args:
        family: "llama" (untied LM head) or "qwen3" (LM head tied to the embedding, head_dim = hidden / heads).
        vocab_size: rows of the embedding.
        seed: torch's seed, set just before the weights are drawn: the same arguments give the same weights.
        device: where the weights are drawn (a GPU draws a 0.6B model in a fraction of the CPU's time).
        config: fields of the family's Hugging Face config over ``TINY`` (``hidden_size``, ``num_hidden_layers``,
            ``initializer_range``, ``tie_word_embeddings``, ``bos_token_id``, ...).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be 'llama' or 'qwen3', got '{family}'")
    config_cls, model_cls = FAMILIES[family]
    fields = {**TINY, "tie_word_embeddings": family == "qwen3", **config}
    if family == "qwen3":  # Qwen3Config's own default is 128, Qwen3-0.6B's value
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    torch.manual_seed(seed)
    with torch.device(device):
        return model_cls(config_cls(vocab_size=vocab_size, **fields))
