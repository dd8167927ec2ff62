import functools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mllm import add_image_tokens, generation_prompt_ids, generation_prompts, pad_token_id, understanding_prompt
from mllm.data import (
    PENDING, ExampleRows, Skipped, collate, generation_example, insert_codes, load_conversations, open_image_text,
    understanding_example,
)
from mllm.vocab import IGNORE_INDEX
from tests.test_mllm_model import K, N, build, dirs, make_tokenizer  # noqa: F401  (dirs is a fixture)
from vqrae.data import SampleKey


@pytest.fixture(params=["chat", "plain"])
def tok_vocab(request):
    tok = make_tokenizer(chat_template=request.param == "chat")
    return tok, add_image_tokens(tok, K)


def labelled_tokens(tok, ex):
    return tok.convert_ids_to_tokens([l for l in ex.labels if l != IGNORE_INDEX])


# ----------------------------------------------------------------------------- generation


def test_generation_example_layout_and_labels(tok_vocab):
    tok, vocab = tok_vocab
    codes = torch.randint(0, K, (N,))
    ex = generation_example(tok, vocab, "a red cat", N, codes=codes, cfg_dropout=0.0)
    prompt = generation_prompt_ids(tok, "a red cat")
    if tok.chat_template:
        assert tok.convert_ids_to_tokens(prompt) == [
            "<|im_start|>", "user", "a", "red", "cat", "<|im_end|>", "<|im_start|>", "assistant"]
    else:
        assert prompt == [tok.bos_token_id] + tok.encode("a red cat", add_special_tokens=False)
    code_ids = (codes + vocab.code_offset).tolist()
    assert ex.input_ids == prompt + [vocab.boi_id] + code_ids + [vocab.eoi_id]
    assert ex.labels == [IGNORE_INDEX] * (len(prompt) + 1) + code_ids + [vocab.eoi_id]
    assert not any(ex.image_mask) and not any(ex.code_mask) and ex.code_image is None
    full = generation_example(tok, vocab, "a red cat", N, codes=codes, cfg_dropout=0.0, loss_on_text=True)
    assert full.labels == full.input_ids


def test_generation_example_with_pending_codes_and_insert(tok_vocab):
    tok, vocab = tok_vocab
    image = torch.zeros(3, 32, 32)
    ex = generation_example(tok, vocab, "a dog", N, code_image=image, cfg_dropout=0.0)
    start = ex.input_ids.index(vocab.boi_id) + 1
    assert ex.code_mask == [False] * start + [True] * N + [False]
    assert ex.input_ids[start : start + N] == [PENDING] * N
    assert ex.labels[start : start + N] == [IGNORE_INDEX] * N and ex.labels[-1] == vocab.eoi_id
    short = generation_example(tok, vocab, "a", N, codes=torch.zeros(N, dtype=torch.long), cfg_dropout=0.0)
    batch = collate([short, ex], pad_id=pad_token_id(tok))
    assert batch.code_images.shape == (1, 3, 32, 32)
    code_ids = vocab.to_tokens(torch.randint(0, K, (1, N)))
    filled = insert_codes(batch, code_ids)
    assert torch.equal(filled.input_ids[1, start : start + N], code_ids[0])
    assert torch.equal(filled.labels[1, start : start + N], code_ids[0])
    assert torch.equal(filled.input_ids[0], batch.input_ids[0]) and filled.code_images is None
    assert (filled.input_ids >= 0).all()
    with pytest.raises(ValueError, match="16 positions but 32"):
        insert_codes(batch, vocab.to_tokens(torch.zeros(2, N, dtype=torch.long)))
    with pytest.raises(ValueError, match="exactly one"):
        generation_example(tok, vocab, "a", N)


def test_cfg_dropout_rate_and_unconditional_prompt_match_the_sampler(tok_vocab):
    tok, vocab = tok_vocab
    codes = torch.zeros(N, dtype=torch.long)
    prompts = generation_prompts(tok, ["a red cat", "a dog"])
    assert prompts.cond == [generation_prompt_ids(tok, "a red cat"), generation_prompt_ids(tok, "a dog")]
    kept = prompts.cond[0] + [vocab.boi_id]
    dropped = prompts.uncond + [vocab.boi_id]
    assert kept != dropped

    g = torch.Generator().manual_seed(0)
    p, draws, n_dropped = 0.1, 3000, 0
    for _ in range(draws):
        ids = generation_example(tok, vocab, "a red cat", N, codes=codes, cfg_dropout=p, generator=g).input_ids
        prefix = ids[: -N - 1]
        assert prefix in (kept, dropped)
        n_dropped += prefix == dropped
    assert abs(n_dropped / draws - p) < 4 * math.sqrt(p * (1 - p) / draws)
    for rate, expected in ((0.0, kept), (1.0, dropped)):
        ex = generation_example(tok, vocab, "a red cat", N, codes=codes, cfg_dropout=rate, generator=g)
        assert ex.input_ids[: -N - 1] == expected


# ----------------------------------------------------------------------------- understanding

CONVERSATION = [
    {"from": "human", "value": "<image>\nwhat is in the image ?"},
    {"from": "gpt", "value": "a red cat"},
    {"from": "human", "value": "describe the picture ."},
    {"from": "gpt", "value": "it shows a blue car"},
]


def test_understanding_labels_only_answers_and_marks_the_image(tok_vocab):
    tok, vocab = tok_vocab
    ex = understanding_example(tok, vocab, CONVERSATION, N, image=torch.zeros(3, 32, 32))
    end = "<|im_end|>" if tok.chat_template else tok.eos_token
    assert labelled_tokens(tok, ex) == ["a", "red", "cat", end, "it", "shows", "a", "blue", "car", end]
    # Every label sits on its own input token (the loss shifts inside the model).
    assert all(l == i for l, i in zip(ex.labels, ex.input_ids) if l != IGNORE_INDEX)
    start = ex.image_mask.index(True)
    assert ex.image_mask == [False] * start + [True] * N + [False] * (len(ex.input_ids) - start - N)
    assert ex.input_ids[start : start + N] == [vocab.image_id] * N
    before = tok.convert_ids_to_tokens(ex.input_ids[start - 1])
    assert before == ("user" if tok.chat_template else tok.bos_token)
    assert tok.convert_ids_to_tokens(ex.input_ids[start + N]) == "what"


def test_understanding_puts_a_missing_placeholder_first_and_rejects_bad_conversations(tok_vocab):
    tok, vocab = tok_vocab
    image = torch.zeros(3, 32, 32)
    plain = [{"role": "user", "content": "what is in the image ?"}, {"role": "assistant", "content": "a cat"}]
    implicit = understanding_example(tok, vocab, plain, N, image=image)
    explicit = understanding_example(
        tok, vocab, [{"role": "user", "content": "<image>\nwhat is in the image ?"}, plain[1]], N, image=image
    )
    assert implicit.input_ids == explicit.input_ids and implicit.image_mask == explicit.image_mask
    text_only = understanding_example(tok, vocab, plain, N)
    assert not any(text_only.image_mask) and labelled_tokens(tok, text_only)[:2] == ["a", "cat"]
    def turns(question, answer="a", role="human"):
        return [{"from": role, "value": question}] + ([{"from": "gpt", "value": answer}] if answer is not None else [])

    bad = {
        "two placeholders": (turns("<image> <image> what"), image),
        "placeholder without image": (turns("<image> what"), None),
        "empty answer": (turns("what", " "), image),
        "no answer": (turns("what", None), image),
        "unknown role": (turns("what", role="robot"), image),
    }
    for conversation, img in bad.values():
        with pytest.raises(ValueError):
            understanding_example(tok, vocab, conversation, N, image=img)


def test_understanding_prompt_is_the_training_prefix(tok_vocab):
    tok, vocab = tok_vocab
    ex = understanding_example(tok, vocab, CONVERSATION[:2], N, image=torch.zeros(3, 32, 32))
    first_label = next(i for i, l in enumerate(ex.labels) if l != IGNORE_INDEX)
    prompt = understanding_prompt(tok, vocab, "what is in the image ?", N)
    assert prompt.input_ids == ex.input_ids[:first_label]
    assert prompt.image_mask == ex.image_mask[:first_label]


# ----------------------------------------------------------------------------- batching


def test_collate_right_pads_and_counts_dropped_rows(tok_vocab):
    tok, vocab = tok_vocab
    images = torch.rand(2, 3, 32, 32)
    long_ex = understanding_example(tok, vocab, CONVERSATION, N, image=images[0])
    short_ex = understanding_example(tok, vocab, CONVERSATION[:2], N, image=images[1])
    gen = generation_example(tok, vocab, "a", N, codes=torch.zeros(N, dtype=torch.long), cfg_dropout=0.0)
    batch = collate([gen, Skipped("corrupt"), long_ex, short_ex], pad_id=pad_token_id(tok))
    assert len(batch) == 3 and batch.data_stats == {"ok": 3, "corrupt": 1}
    assert torch.equal(batch.images, images)  # understanding rows' images, in row order
    for row, ex in enumerate([gen, long_ex, short_ex]):
        n = len(ex.input_ids)
        assert batch.input_ids[row, :n].tolist() == ex.input_ids
        assert batch.labels[row, :n].tolist() == ex.labels
        assert batch.image_mask[row, :n].tolist() == ex.image_mask
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert (batch.input_ids[row, n:] == pad_token_id(tok)).all() and (batch.labels[row, n:] == IGNORE_INDEX).all()
    assert batch.image_mask.sum() == 2 * N
    capped = collate([gen, long_ex], pad_id=0, max_length=len(gen.input_ids))
    assert len(capped) == 1 and capped.data_stats == {"ok": 1, "too_long": 1} and capped.images is None
    empty = collate([Skipped("missing")], pad_id=0)
    assert len(empty) == 0 and empty.data_stats == {"missing": 1}


# ----------------------------------------------------------------------------- datasets


def _png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"{i}.png", i)
    (folder / "broken.png").write_bytes(b"not an image at all")
    qa = [
        {"question": "what is in the image ?", "answer": "a cat"},
        {"question": "describe the picture .", "answer": "a car"},
    ]
    rows = [
        {"file_name": "0.png", "caption": "a red cat", "questions": qa},
        {"file_name": "1.png", "caption": "a small dog", "questions": qa[:1]},
        {"file_name": "2.png", "caption": "  ", "questions": []},
        {"file_name": "broken.png", "caption": "a blue car", "questions": qa},
    ]
    with open(folder / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(folder)


def test_image_folder_rows_skip_broken_ones_for_both_tasks(image_folder):
    tok = make_tokenizer()
    vocab = add_image_tokens(tok, K)
    common = dict(tokenizer=tok, vocab=vocab, num_tokens=N, resolution=32)
    gen = ExampleRows(
        open_image_text(image_folder, "caption"), "generation", text_column="caption", cfg_dropout=0.0, **common
    )
    und = ExampleRows(open_image_text(image_folder, "questions"), "understanding", text_column="questions", **common)
    pad = functools.partial(collate, pad_id=pad_token_id(tok))
    gen_batch = next(iter(DataLoader(gen, batch_size=4, collate_fn=pad)))
    assert gen_batch.data_stats == {"ok": 2, "missing_caption": 1, "not_an_image": 1}
    assert gen_batch.code_images.shape == (2, 3, 32, 32) and gen_batch.code_mask.sum() == 2 * N
    und_batch = next(iter(DataLoader(und, batch_size=4, collate_fn=pad)))
    assert und_batch.data_stats == {"ok": 2, "missing_questions": 1, "not_an_image": 1}
    assert und_batch.images.shape == (2, 3, 32, 32) and und_batch.image_mask.sum() == 2 * N
    answers = tok.convert_ids_to_tokens(und_batch.labels[0][und_batch.labels[0] != IGNORE_INDEX].tolist())
    assert answers == ["a", "cat", "<|im_end|>", "a", "car", "<|im_end|>"]
    with pytest.raises(ValueError, match="column 'text'"):
        ExampleRows(open_image_text(image_folder, "caption"), "generation", text_column="text", **common)


def test_cfg_dropout_in_rows_is_fixed_by_seed_epoch_and_row(image_folder):
    tok = make_tokenizer()
    vocab = add_image_tokens(tok, K)
    source = open_image_text(image_folder, "caption")
    rows = ExampleRows(source, "generation", tok, vocab, N, 32, "caption", cfg_dropout=0.5)
    uncond = generation_prompt_ids(tok, "") + [vocab.boi_id]
    draws = [rows[SampleKey(0, epoch, 0)].input_ids[: -N - 1] == uncond for epoch in range(40)]
    assert draws == [rows[SampleKey(0, epoch, 0)].input_ids[: -N - 1] == uncond for epoch in range(40)]
    assert 5 < sum(draws) < 35  # epochs draw afresh


def test_cached_rows_equal_fresh_ones_and_decode_each_image_once(image_folder, monkeypatch):
    import mllm.data as data

    tok = make_tokenizer()
    vocab = add_image_tokens(tok, K)
    common = dict(tokenizer=tok, vocab=vocab, num_tokens=N, resolution=32, cfg_dropout=0.5)
    real_load = data.load_image
    for task, column in (("generation", "caption"), ("understanding", "questions")):
        source = open_image_text(image_folder, column)
        keys = [SampleKey(i, epoch, 0) for epoch in range(3) for i in range(len(source))]
        fresh = [ExampleRows(source, task, text_column=column, **common)[k] for k in keys]
        decoded = []
        monkeypatch.setattr(data, "load_image", lambda value, **kw: (decoded.append(value), real_load(value, **kw))[1])
        cached_rows = ExampleRows(source, task, text_column=column, cache_images=True, **common)
        cached = [cached_rows[k] for k in keys]
        monkeypatch.setattr(data, "load_image", real_load)
        for want, got in zip(fresh, cached):
            assert type(want) is type(got) and want.status == got.status
            if isinstance(want, Skipped):
                continue
            assert got.input_ids == want.input_ids and got.labels == want.labels
            for name in ("image", "code_image"):
                a, b = getattr(want, name), getattr(got, name)
                assert (a is None and b is None) or torch.equal(a, b)
        # a good image is decoded once, on its first fetch; a broken one on every fetch (nothing to keep);
        # a row without text never reaches its image
        good = {k.index for k, ex in zip(keys, fresh) if not isinstance(ex, Skipped)}
        broken = [k for k, ex in zip(keys, fresh) if isinstance(ex, Skipped) and ex.status == "not_an_image"]
        assert good and broken and len(decoded) == len(good) + len(broken)


def test_llava_json_rows(tmp_path):
    _png(tmp_path / "a.png", 0)
    good = [{"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a red cat"}]
    records = [
        {"id": "0", "image": "a.png", "conversations": good},
        {"id": "1", "image": "missing.png", "conversations": good},
        {"id": "2", "conversations": good},
        {"id": "3", "image": "a.png", "conversations": good[:1]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    tok = make_tokenizer()
    vocab = add_image_tokens(tok, K)
    source = load_conversations(str(path))
    rows = ExampleRows(source, "understanding", tok, vocab, N, 32, "conversations", image_root=str(tmp_path))
    items = [rows[i] for i in range(len(rows))]
    assert [it.status for it in items] == ["ok", "missing", "missing", "bad_conversation"]
    assert labelled_tokens(tok, items[0]) == ["a", "red", "cat", "<|im_end|>"]


def test_dataset_batch_trains_the_model(dirs, image_folder):  # noqa: F811
    model = build(dirs, "llama")
    common = dict(
        tokenizer=model.tokenizer, vocab=model.vocab, num_tokens=model.vqrae.num_tokens,
        resolution=model.vqrae.image_size,
    )
    gen = ExampleRows(open_image_text(image_folder, "caption"), "generation", text_column="caption", **common)
    und = ExampleRows(open_image_text(image_folder, "questions"), "understanding", text_column="questions", **common)
    batch = collate([gen[0], und[0], gen[1], und[3]], pad_id=pad_token_id(model.tokenizer))
    batch = insert_codes(batch, model.tokenize_images(batch.code_images))
    with pytest.raises(ValueError, match="negative ids"):
        model(**collate([gen[0]], pad_id=0).model_inputs())
    out = model(**batch.model_inputs())
    assert torch.isfinite(out.loss) and out.image_loss > 0 and out.text_loss > 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
