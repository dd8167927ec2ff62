"""The training forward computes logits at labelled positions only, with the full-vocabulary cross-entropy:
its losses and gradients equal those of the full forward (every position's logits, ``F.cross_entropy``)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM

from mllm import LoraSettings, MLLMConfig, UnifiedModel, pad_token_id
from mllm.data import collate, generation_example, insert_codes, understanding_example
from mllm.vocab import IGNORE_INDEX
from mllm.model import labelled_cross_entropy, split_output_layer
from tests.helpers import CODEBOOK_SIZE as K
from tests.helpers import NUM_TOKENS as N
from tests.helpers import make_tokenizer, write_llm, write_vqrae

CAPTIONS = ["a red circle", "a small blue square on the left", "", "a green triangle"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("code_row_loss")
    out = {"vqrae": write_vqrae(root / "vqrae")}
    for family in ("llama", "qwen3"):
        out[family] = write_llm(root / family, family)
    # Gemma 2 soft-caps its logits after the output layer: the split must be refused
    tok = make_tokenizer()
    tok.save_pretrained(root / "gemma2")
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, final_logit_softcapping=3.0,
    )).save_pretrained(root / "gemma2")
    out["gemma2"] = str(root / "gemma2")
    return out


def build(dirs, family: str, **overrides) -> UnifiedModel:
    torch.manual_seed(1)
    return UnifiedModel.build(MLLMConfig(llm=dirs[family], vqrae=dirs["vqrae"], dtype="float32", **overrides))


def generation_batch(model: UnifiedModel, seed: int = 0):
    """Captions of different lengths (right padding), loss on the codes and <eoi> only."""
    g = torch.Generator().manual_seed(seed)
    examples = [generation_example(model.tokenizer, model.vocab, c, N, codes=torch.randint(0, K, (N,), generator=g),
                                   cfg_dropout=0.0) for c in CAPTIONS]
    return collate(examples, pad_id=pad_token_id(model.tokenizer))


def mixed_batch(model: UnifiedModel, seed: int = 0):
    """An understanding row (loss on the answer text) beside a generation row."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    tok, vocab = model.tokenizer, model.vocab
    examples = [
        understanding_example(tok, vocab, [{"from": "human", "value": "what shape is it ?"},
                                           {"from": "gpt", "value": "a red circle"}], N, image=images[0]),
        generation_example(tok, vocab, "a blue square", N, code_image=images[1], cfg_dropout=0.0),
    ]
    batch = collate(examples, pad_id=pad_token_id(tok))
    return insert_codes(batch, model.tokenize_images(batch.code_images))


def full_forward_losses(model: UnifiedModel, inputs: dict) -> dict:
    """The reference: logits at every position over the full vocabulary, then ``F.cross_entropy`` in fp32."""
    embeds = model.embed(inputs["input_ids"], inputs["images"], inputs["image_mask"])
    logits = model.llm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=False).logits
    targets = inputs["labels"][:, 1:]
    valid = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1][valid].float(), targets[valid], reduction="none")
    image = model.vocab.is_code(targets[valid]) | (targets[valid] == model.vocab.eoi_id)
    return {"loss": ce.mean(), "image_loss": ce[image].sum() / image.sum().clamp_min(1),
            "text_loss": ce[~image].sum() / (~image).sum().clamp_min(1)}


def losses_and_grads(model: UnifiedModel, forward) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = forward()
    (out["loss"] + 0.5 * out["image_loss"] + 2.0 * out["text_loss"]).backward()  # every term reaches backward
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("batch_kind", ["generation", "mixed"])
@pytest.mark.parametrize("lora", [False, True])
def test_training_loss_and_gradients_equal_the_full_vocabulary_cross_entropy(dirs, family, batch_kind, lora):
    # LoRA wraps the output layer (trainable image-token rows); no dropout, so both forwards see the same LLM
    model = build(dirs, family, lora=LoraSettings(enabled=True, dropout=0.0)) if lora else build(dirs, family)
    if lora:
        with torch.no_grad():  # LoRA's B starts at zero: give the adapters a value so they change the logits
            for name, p in model.llm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    model.train()
    batch = generation_batch(model) if batch_kind == "generation" else mixed_batch(model)
    inputs = batch.model_inputs()
    targets = inputs["labels"][:, 1:]
    image = model.vocab.is_code(targets) | (targets == model.vocab.eoi_id)
    if batch_kind == "generation":
        assert bool(((targets == IGNORE_INDEX) | image).all())  # only visual targets carry loss
    else:
        assert bool(((targets != IGNORE_INDEX) & ~image).any())
    captured = {}

    def fast():
        out = model(**inputs)
        captured["logits"] = out.logits
        return {"loss": out.loss, "image_loss": out.image_loss, "text_loss": out.text_loss}

    out, grads = losses_and_grads(model, fast)
    ref, ref_grads = losses_and_grads(model, lambda: full_forward_losses(model, inputs))
    assert captured["logits"] is None  # the labelled-positions path ran, not the full forward
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert out["image_loss"] > 0 and (out["text_loss"] > 0) == (batch_kind == "mixed")
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_forward_keeps_the_logits(dirs):
    model = build(dirs, "qwen3")
    inputs = generation_batch(model).model_inputs()
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits is not None and out.logits.shape[:2] == inputs["input_ids"].shape
    torch.testing.assert_close(out.image_loss, full_forward_losses(model, inputs)["image_loss"], rtol=1e-5, atol=1e-6)


def test_soft_capped_logits_keep_the_full_forward(dirs):
    model = build(dirs, "gemma2")
    like = torch.zeros(1, 1, 64)
    assert split_output_layer(model.llm, like) is None
    assert split_output_layer(build(dirs, "llama").llm, like) is not None
    inputs = generation_batch(model).model_inputs()
    out = model(**inputs)
    assert out.logits is not None  # the full forward, with its soft cap
    torch.testing.assert_close(out.loss, full_forward_losses(model, inputs)["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elems", [7, 64, 2**26])  # several row chunks, one row per chunk, one chunk
def test_labelled_cross_entropy_equals_f_cross_entropy(dtype, chunk_elems):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(37, 50, generator=g)).to(dtype)
    targets = torch.randint(0, 50, (37,), generator=g)
    weights = torch.rand(37, generator=g)  # a different gradient for every row
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    out = labelled_cross_entropy(a, targets, chunk_elems)
    ref = F.cross_entropy(b.float(), targets, reduction="none")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert a.grad.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-6)  # one bf16 rounding
    torch.testing.assert_close(a.grad, b.grad, **tol)
    empty = labelled_cross_entropy(logits[:0].requires_grad_(True), targets[:0])
    assert empty.shape == (0,)
