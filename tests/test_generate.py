import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen3Config

from mllm.vocab import ImageVocab

from mllm.sample import (
    SamplingConfig,
    generate_image_codes,
    generate_text,
    new_cache,
    sample_logits,
)

VOCAB, K = 300, 32
N = 9  # code tokens per image
SPEC = ImageVocab(code_offset=VOCAB - K, codebook_size=K, boi_id=VOCAB - K - 2, eoi_id=VOCAB - K - 1, image_id=VOCAB - K - 3)
LO, HI = SPEC.code_offset, SPEC.code_offset + K
PAD = 0
GREEDY = SamplingConfig(temperature=0, cfg_scale=1)
PROMPTS = [[5, 17, 42, 99, 3, 8, 61], [11, 23]]  # unequal lengths -> left padding
UNCOND = [[1]]


def tiny_lm(arch: str, attn: str = "sdpa"):
    # A wide init spreads the logits so greedy choices are far from ties.
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.2,
    )
    if arch == "llama":
        config = LlamaConfig(**shape)
    elif arch == "qwen3":
        config = Qwen3Config(head_dim=16, **shape)
    else:  # soft-caps its logits, so they are not the output layer applied to the last hidden state
        config = Gemma2Config(head_dim=16, final_logit_softcapping=2.0, sliding_window=64, **shape)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def lm(request):
    return tiny_lm(request.param)


@torch.no_grad()
def reference_codes(lm, prompt, uncond, scale):
    """Greedy image codes by re-running the full sequence every step (no cache, no padding, no batching)."""
    cond_seq, uncond_seq, codes = prompt + [SPEC.boi_id], (uncond or []) + [SPEC.boi_id], []
    for _ in range(N):
        c = lm(torch.tensor([cond_seq])).logits[0, -1, LO:HI]
        if uncond is not None:
            u = lm(torch.tensor([uncond_seq])).logits[0, -1, LO:HI]
            c = u + scale * (c - u)
        code = int(c.argmax())
        codes.append(code)
        cond_seq.append(LO + code)
        uncond_seq.append(LO + code)
    return codes


@torch.no_grad()
def reference_text(lm, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(lm(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("guided", [False, True])
def test_cached_image_decoding_matches_full_forward(lm, guided):
    scale = 3.0 if guided else 1.0
    sampling = SamplingConfig(temperature=0, cfg_scale=scale)
    codes = generate_image_codes(lm, PROMPTS, SPEC, N, sampling, uncond_ids=UNCOND if guided else None, pad_id=PAD)
    want = [reference_codes(lm, p, UNCOND[0] if guided else None, scale) for p in PROMPTS]
    assert codes.tolist() == want


@pytest.mark.parametrize("arch, head_calls", [("llama", 2), ("gemma2", 2 + N)])
def test_code_only_head_is_used_exactly_when_it_gives_the_models_logits(arch, head_calls):
    lm = tiny_lm(arch, "eager")
    calls = []
    hook = lm.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        sampling = SamplingConfig(temperature=0, cfg_scale=3.0)
        codes = generate_image_codes(lm, PROMPTS, SPEC, N, sampling, uncond_ids=UNCOND, pad_id=PAD)
    finally:
        hook.remove()
    # The one-token check runs the full output layer twice (model forward, layer on the hidden state). After
    # it llama never does again; gemma2 fails the check (its logits are soft-capped), so its prefill and
    # every step use the model's own logits.
    assert len(calls) == head_calls
    assert codes.tolist() == [reference_codes(lm, p, UNCOND[0], 3.0) for p in PROMPTS]


@pytest.mark.parametrize("token_rows", [False, True])
def test_peft_lora_model_decodes_like_its_full_forward(token_rows):
    peft = pytest.importorskip("peft")
    lm = tiny_lm("llama")
    rows = list(range(SPEC.boi_id, HI))
    # Random LoRA weights so the adapter changes the logits; with trainable token rows the output layer is
    # wrapped and decoding falls back to the full logits.
    extra = dict(trainable_token_indices={"embed_tokens": rows, "lm_head": rows}) if token_rows else {}
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM", **extra
    )
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(lm, config).eval()
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    sampling = SamplingConfig(temperature=0, cfg_scale=3.0)
    codes = generate_image_codes(wrapped, PROMPTS, SPEC, N, sampling, uncond_ids=UNCOND, pad_id=PAD)
    want = [reference_codes(wrapped, p, UNCOND[0], 3.0) for p in PROMPTS]
    with wrapped.disable_adapter():
        assert [reference_codes(wrapped, p, UNCOND[0], 3.0) for p in PROMPTS] != want
    assert codes.tolist() == want
    text = generate_text(wrapped, input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=6, sampling=GREEDY, eos_id=None)
    assert text[0] == reference_text(wrapped, PROMPTS[0], 6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_equals_each_prompt_alone(attn):
    lm = tiny_lm("llama", attn)
    sampling = SamplingConfig(temperature=0, cfg_scale=2.0)
    uncond = [[1], [2, 3, 4, 5, 6, 7, 8, 9, 10]]  # per-row unconditional prompts, padded too
    batch = generate_image_codes(lm, PROMPTS, SPEC, N, sampling, uncond_ids=uncond, pad_id=PAD)
    for i, prompt in enumerate(PROMPTS):
        alone = generate_image_codes(lm, [prompt], SPEC, N, sampling, uncond_ids=[uncond[i]], pad_id=PAD)
        assert batch[i].tolist() == alone[0].tolist()


def test_dynamic_cache_matches_static_and_caches_are_reusable(lm):
    sampling = SamplingConfig(temperature=0, cfg_scale=2.0)
    default = generate_image_codes(lm, PROMPTS, SPEC, N, sampling, uncond_ids=UNCOND, pad_id=PAD)  # the default cache
    rows, prompt_len = 2 * len(PROMPTS), max(map(len, PROMPTS)) + 1
    for cache in (new_cache(lm, rows, prompt_len + N + 5), new_cache(lm, rows, 0, static=False)):
        for _ in range(2):  # the second call must reset the cache it is given
            codes = generate_image_codes(lm, PROMPTS, SPEC, N, sampling, uncond_ids=UNCOND, pad_id=PAD, cache=cache)
            assert codes.tolist() == default.tolist()
    assert cache.get_seq_length() == prompt_len + N - 1  # the last code is never fed back
    for small, words in [(new_cache(lm, rows, 4), "holds"), (new_cache(lm, rows + 1, 64), "rows")]:
        with pytest.raises(ValueError, match=words):
            generate_image_codes(lm, PROMPTS, SPEC, N, sampling, uncond_ids=UNCOND, pad_id=PAD, cache=small)


def test_cfg_scale_one_equals_no_guidance(lm):
    plain = SamplingConfig(temperature=1.0, cfg_scale=1.0, seed=7)
    without = generate_image_codes(lm, PROMPTS, SPEC, N, plain, pad_id=PAD)
    with_uncond = generate_image_codes(lm, PROMPTS, SPEC, N, plain, uncond_ids=UNCOND, pad_id=PAD)
    assert torch.equal(without, with_uncond)
    guided_sampling = SamplingConfig(cfg_scale=3.0, seed=7)
    guided = generate_image_codes(lm, PROMPTS, SPEC, N, guided_sampling, uncond_ids=UNCOND, pad_id=PAD)
    assert not torch.equal(without, guided)


def test_only_code_indices_and_exact_length():
    lm = tiny_lm("llama")
    with torch.no_grad():  # make non-code tokens dominate the full vocabulary
        lm.lm_head.weight[:LO] *= 50
        top = lm(torch.tensor([PROMPTS[0] + [SPEC.boi_id]])).logits[0, -1].argmax()
    assert top < LO
    for sampling in (GREEDY, SamplingConfig(temperature=2.0, cfg_scale=3.0, seed=0)):
        codes = generate_image_codes(lm, PROMPTS, SPEC, N, sampling, uncond_ids=UNCOND, pad_id=PAD)
        assert codes.shape == (len(PROMPTS), N) and codes.dtype == torch.long
        assert codes.min() >= 0 and codes.max() < K


def test_seed_determinism(lm):
    def run(seed, generator=None):
        s = SamplingConfig(temperature=1.0, cfg_scale=2.0, seed=seed)
        return generate_image_codes(lm, PROMPTS, SPEC, N, s, uncond_ids=UNCOND, pad_id=PAD, generator=generator)

    first = run(3)
    assert torch.equal(run(3), first)
    assert not torch.equal(run(4), first)
    assert torch.equal(run(None, torch.Generator().manual_seed(3)), first)  # a passed generator wins


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(top_k=1, cfg_scale=2.0, seed=1), SamplingConfig(top_p=1e-6, cfg_scale=2.0, seed=1)]
)
def test_top_k_one_and_tiny_top_p_equal_greedy(lm, sampling):
    greedy_sampling = SamplingConfig(temperature=0, cfg_scale=2.0)
    greedy = generate_image_codes(lm, PROMPTS, SPEC, N, greedy_sampling, uncond_ids=UNCOND, pad_id=PAD)
    assert torch.equal(generate_image_codes(lm, PROMPTS, SPEC, N, sampling, uncond_ids=UNCOND, pad_id=PAD), greedy)


def test_sampler_follows_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    n = 40000
    rows = logits.expand(n, 4)
    for cfg, support in [
        (SamplingConfig(), [0, 1, 2, 3]),
        (SamplingConfig(temperature=0.5), [0, 1, 2, 3]),
        (SamplingConfig(top_k=2), [0, 1]),
        (SamplingConfig(top_p=0.8), [0, 1]),  # probabilities are .61 .22 .14 .03
        (SamplingConfig(top_p=0.95), [0, 1, 2]),
    ]:
        draws = sample_logits(rows, cfg, torch.Generator().manual_seed(0))
        kept = torch.full((4,), float("-inf"))
        kept[support] = logits[support] / cfg.temperature
        freq = torch.bincount(draws, minlength=4).float() / n
        torch.testing.assert_close(freq, kept.softmax(-1), atol=0.01, rtol=0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
    ],
)
def test_invalid_sampling_values_raise_one_line(kwargs, words):
    with pytest.raises(ValueError, match=words) as err:
        SamplingConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_guidance_without_uncond_and_bad_uncond_count_raise(lm):
    with pytest.raises(ValueError, match="uncond_ids") as err:
        generate_image_codes(lm, PROMPTS, SPEC, N, SamplingConfig(cfg_scale=4.0), pad_id=PAD)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="uncond_ids"):
        generate_image_codes(lm, PROMPTS * 2, SPEC, N, SamplingConfig(cfg_scale=4.0), uncond_ids=[[1], [2]], pad_id=PAD)
    too_big = ImageVocab(code_offset=VOCAB - 8, codebook_size=K, boi_id=1, eoi_id=2, image_id=3)
    with pytest.raises(ValueError, match="LM head"):
        generate_image_codes(lm, PROMPTS, too_big, 4, GREEDY, pad_id=PAD)


def test_cached_text_decoding_matches_full_forward_from_ids_and_embeds(lm):
    steps = 8
    want = [reference_text(lm, p, steps) for p in PROMPTS]
    length = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (length - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in PROMPTS])
    from_ids = generate_text(lm, input_ids=ids, attention_mask=mask, max_new_tokens=steps, sampling=GREEDY, eos_id=None)
    dynamic = generate_text(
        lm, input_ids=ids, attention_mask=mask, max_new_tokens=steps, sampling=GREEDY, eos_id=None,
        cache=new_cache(lm, len(PROMPTS), 0, static=False),
    )
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(ids)
    from_embeds = generate_text(
        lm, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=steps, sampling=GREEDY, eos_id=None
    )
    assert from_ids == want
    assert dynamic == want
    assert from_embeds == want


def test_generate_text_stops_at_eos(lm):
    steps = 8
    full = [reference_text(lm, p, steps) for p in PROMPTS]
    length = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (length - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in PROMPTS])
    calls = []
    hook = lm.register_forward_hook(lambda *_: calls.append(1))
    try:
        for eos in ([full[0][3]], [full[0][3], full[1][5]]):  # one row stops early / both rows stop
            calls.clear()
            out = generate_text(
                lm, input_ids=ids, attention_mask=mask, max_new_tokens=steps, sampling=GREEDY, eos_id=eos
            )
            ends = [next((i for i, tok in enumerate(row) if tok in eos), steps) for row in full]
            assert out == [row[:end] for row, end in zip(full, ends)]
            # one prefill, then one step per token fed back: none once every row has sampled an eos
            assert len(calls) == min(max(ends) + 1, steps)
    finally:
        hook.remove()
