"""Generation training step: ``UnifiedModel``'s training forward against a plain PyTorch loop on the same LLM.

Both run forward + backward + AdamW step on the same token sequences (caption prompt, ``<boi>``, N code tokens,
``<eoi>``; loss on the codes and ``<eoi>`` only, as the generation recipe trains): ours through
``UnifiedModel.forward`` (logits at the labelled positions only, ``mllm.model.labelled_cross_entropy``), the
plain loop through the Hugging Face causal LM's own forward (logits at every position) and
``F.cross_entropy(logits.float())`` over the full vocabulary. The two share the LLM, each with its own AdamW
over its weights; steps alternate repeat by repeat, so load from other processes falls on both alike. The table
gives the median step time, tokens/s (non-padding input tokens), the ratio, peak memory (CUDA) and MFU =
6 x params x tokens / time / peak, with params the LLM's matrix weights (the input embedding table counts only
when tied to the output layer). The loss of both at the same weights is printed as a check.

    python bench/bench_mllm_step.py                                          # CPU, tiny Qwen3-like LLM
    python bench/bench_mllm_step.py --device cuda --preset qwen3-0.6b --peak-tflops 989

``qwen3-0.6b`` is the shape of configs/mllm/qwen3_0p6b_generation.yaml: Qwen3-0.6B (random init, nothing is
downloaded), its 151,669-token vocabulary plus 16,384 codes and 3 image tokens, micro-batches of 8 rows of one
256-code image (256 px, patch 16) after a caption prompt, bf16 autocast over fp32 weights (run.precision: bf16).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from demo.llm import standin_llm, word_tokenizer  # noqa: E402
from mllm.model import IGNORE_INDEX, MLLMConfig, UnifiedModel  # noqa: E402
from mllm.projector import MLPProjector  # noqa: E402
from mllm.vocab import add_image_tokens  # noqa: E402
from vqrae import VQRAE, DecoderConfig, EncoderConfig, QuantizerConfig, VQRAEConfig  # noqa: E402


@dataclass
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # LLM rows after the image tokens are added (text + K codes + <boi>, <eoi>, <image>)
    codebook: int  # K
    image_tokens: int  # N codes per image
    batch: int  # rows per micro-batch
    caption: tuple[int, int]  # prompt length range (tokens) before <boi>
    tied: bool


PRESETS = {
    # Qwen3-0.6B's proportions on a CPU, about a second per step on one core: the output layer holds a quarter of
    # the matrix weights (0.6B: 28 %), and rows of one 256-code image after a caption label ~85 % of positions
    "tiny": Preset(hidden=256, layers=8, heads=4, kv_heads=2, head_dim=64, intermediate=768, vocab=8192,
                   codebook=1024, image_tokens=256, batch=2, caption=(16, 80), tied=True),
    # configs/mllm/qwen3_0p6b_generation.yaml: Qwen3-0.6B, micro_batch_size 8, one 16 x 16 code image per row
    "qwen3-0.6b": Preset(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
                         vocab=151669 + 16384 + 3, codebook=16384, image_tokens=256, batch=8, caption=(16, 80),
                         tied=True),
}


def build(preset: Preset, device: torch.device) -> UnifiedModel:
    """A UnifiedModel over a random Qwen3-shaped LLM in fp32 (the recipe's master weights) and a tiny VQRAE with
    the preset's K: the codes are given, so the VQRAE never runs."""
    tokenizer = word_tokenizer([])  # the stand-in's special tokens only (demo.llm)
    add_image_tokens(tokenizer, preset.codebook)  # ids 6 .. K + 8; every other LLM row plays a text token
    llm = standin_llm("qwen3", preset.vocab, hidden_size=preset.hidden, num_hidden_layers=preset.layers,
                      num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads, head_dim=preset.head_dim,
                      intermediate_size=preset.intermediate, max_position_embeddings=4096,
                      tie_word_embeddings=preset.tied).to(device)
    side = 8 * int(preset.image_tokens**0.5)  # patch 8: N tokens
    vqrae = VQRAE(VQRAEConfig(
        encoder=EncoderConfig(backend="timm", name="vit_so400m_patch16_siglip_256", pretrained=False, image_size=side,
                              model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)),
        quantizer=QuantizerConfig(codebook_size=preset.codebook, codebook_dim=16),
        decoder=DecoderConfig(patch_size=8, image_size=side),
    )).to(device)
    projector = MLPProjector(vqrae.encoder.dim, preset.hidden, 2).to(device)
    cfg = MLLMConfig(llm="random", vqrae="random", dtype="float32")
    model = UnifiedModel(cfg, llm, tokenizer, vqrae, projector)
    model.projector.requires_grad_(False)  # generation never uses it (mllm.train.trainable_groups)
    return model.train()


def generation_batch(model: UnifiedModel, preset: Preset, device: torch.device, seed: int = 0) -> dict:
    """Right-padded rows of prompt + <boi> + N codes + <eoi>, with loss on the codes and <eoi>."""
    g = torch.Generator().manual_seed(seed)
    vocab, text_lo = model.vocab, len(model.tokenizer)
    rows, labels = [], []
    for _ in range(preset.batch):
        n = int(torch.randint(preset.caption[0], preset.caption[1] + 1, (), generator=g))
        prompt = torch.randint(text_lo, preset.vocab, (n,), generator=g).tolist() + [vocab.boi_id]
        codes = vocab.to_tokens(torch.randint(0, preset.codebook, (preset.image_tokens,), generator=g)).tolist()
        rows.append(prompt + codes + [vocab.eoi_id])
        labels.append([IGNORE_INDEX] * len(prompt) + codes + [vocab.eoi_id])
    length = max(map(len, rows))
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    target = torch.tensor([r + [IGNORE_INDEX] * (length - len(r)) for r in labels])
    return dict(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=target.to(device))


def plain_loss(llm, batch: dict) -> torch.Tensor:
    """The plain loop's loss: every position's logits, full-vocabulary cross-entropy in fp32."""
    logits = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def matmul_params(llm) -> int:
    total = sum(p.numel() for p in llm.parameters())
    head, embed = llm.get_output_embeddings().weight, llm.get_input_embeddings().weight
    return total if head is embed else total - embed.numel()


def head_share(llm) -> float:
    return llm.get_output_embeddings().weight.numel() / matmul_params(llm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--batch", type=int, default=None, help="rows per micro-batch (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (H100/H200 dense bf16: 989)")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = PRESETS[args.preset]
    if args.batch:
        preset.batch = args.batch
    precision = args.precision or ("bf16" if gpu else "fp32")
    repeats = args.repeats or 10
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # what a training run uses for its fp32 matrix products

    model = build(preset, device)
    batch = generation_batch(model, preset, device)
    tokens = int(batch["attention_mask"].sum())
    ours_opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    plain_opt = torch.optim.AdamW(model.llm.parameters(), lr=1e-5)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    with autocast():  # same weights, same sequences: the two losses agree
        ours_loss = model(**batch).loss.item()
        plain = plain_loss(model.llm, batch).item()
    print(f"device={device} preset={args.preset} precision={precision} threads={torch.get_num_threads()} "
          f"rows={preset.batch} length={batch['input_ids'].shape[1]} tokens={tokens} V={preset.vocab} "
          f"params={matmul_params(model.llm) / 1e6:.1f}M (output layer {100 * head_share(model.llm):.0f} %) "
          f"labelled={int((batch['labels'][:, 1:] != IGNORE_INDEX).sum())} repeats={repeats} warmup={args.warmup}")
    print(f"loss at the same weights: ours {ours_loss:.6f}, plain {plain:.6f}", flush=True)

    def ours_step():
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def plain_step():
        with autocast():
            loss = plain_loss(model.llm, batch)
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    steps = {"UnifiedModel (labelled positions only)": ours_step,
             "plain loop (HF logits + F.cross_entropy)": plain_step}
    times = {name: [] for name in steps}
    peaks = {name: 0.0 for name in steps}
    for r in range(args.warmup + repeats):
        for name, step in steps.items():
            if gpu:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            if gpu:
                torch.cuda.synchronize(device)
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2**30)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)

    params = matmul_params(model.llm)
    plain_t = statistics.median(times["plain loop (HF logits + F.cross_entropy)"])
    print()
    print("| step | time (ms) | tokens/s | vs plain | peak memory (GiB) | MFU |")
    print("|---|---|---|---|---|---|")
    for name in steps:
        t = statistics.median(times[name])
        mfu = f"{100 * 6 * params * tokens / t / (args.peak_tflops * 1e12):.1f}%" if args.peak_tflops else "n/a"
        mem = f"{peaks[name]:.2f}" if gpu else "n/a"
        print(f"| {name} | {1e3 * t:.1f} | {tokens / t:,.0f} | {plain_t / t:.2f}x | {mem} | {mfu} |")


if __name__ == "__main__":
    main()
