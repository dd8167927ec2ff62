"""Image-token decoding speed: mllm.sample against Hugging Face `lm.generate` on the same random LLaMA.

Two workloads, each decoding one image of 256 code tokens per row:
  cfg      one prompt with classifier-free guidance (2 rows: conditional + unconditional); HF decodes the
           same 2 rows without guidance.
  batch32  32 prompts of mixed lengths (left-padded), no guidance.
Both implementations decode exactly 256 new tokens per row (HF: min_new_tokens = max_new_tokens = 256) in
greedy and sampling mode, after a warm-up; the table reports the median time of several interleaved repeats,
the speed-up of ours over HF, and the peak memory above the model weights.

  python bench/bench_generate.py --preset cpu-small
  python bench/bench_generate.py --preset gpu-1.4b --device cuda --compile

With --parallel it compares speculative Jacobi decoding (SamplingConfig(decoding="jacobi")) with the
autoregressive sampler instead: sequential LLM forwards per sampler call and wall time per image, at batch 1
(one image per call, over several prompts) and batch 8 (the same prompts in one call), as ratios against the
autoregressive run of the same process. --model runs a saved unified model (e.g. the demo's) on its own
captions, image positions and sampling defaults instead of a preset's random LLaMA.

  python bench/bench_generate.py --parallel --model outputs/demo/mllm/model
  python bench/bench_generate.py --parallel --preset cpu-small --windows 8,16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from peak_memory import PeakMemory  # bench/, the script's folder

import mllm.sample
from mllm.sample import SamplingConfig, generate_image_codes, new_cache
from mllm.vocab import ImageVocab

NUM_TOKENS = 256  # a 16 x 16 token image


@dataclass
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    text_vocab: int  # <boi>, <eoi> and the pad id are reserved at its end
    codebook: int  # image codes appended after the text vocabulary
    dtype: str


PRESETS = {
    # runs on 2 CPU cores in well under a minute per workload
    "cpu-small": Preset(
        hidden=256, layers=4, heads=4, intermediate=688, text_vocab=4096, codebook=1024, dtype="float32"
    ),
    # LLaMA-1.4B-shaped, vocabulary 32000 text + 16384 image codes
    "gpu-1.4b": Preset(
        hidden=2048, layers=24, heads=16, intermediate=5632, text_vocab=32000, codebook=16384, dtype="bfloat16"
    ),
}


def build_model(preset: Preset, device: torch.device, dtype: torch.dtype):
    config = LlamaConfig(
        hidden_size=preset.hidden, num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads, intermediate_size=preset.intermediate,
        vocab_size=preset.text_vocab + preset.codebook, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = ImageVocab(
        code_offset=preset.text_vocab, codebook_size=preset.codebook, boi_id=preset.text_vocab - 3,
        eoi_id=preset.text_vocab - 2, image_id=preset.text_vocab - 4,
    )
    return lm.eval(), spec, preset.text_vocab - 1


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (length - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def timed(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds and peak extra memory (MiB) per function. Repeats interleave the functions so that a
    change in machine load hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    peaks = {name: 0.0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mem.extra_mib)
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


class ForwardCounter:
    """Counts the LLM forwards the sampler runs (prefill, one-token steps, Jacobi windows) while entered."""

    def __enter__(self) -> "ForwardCounter":
        self.count, self.forward = 0, mllm.sample._forward

        def counted(*args, **kwargs):
            self.count += 1
            return self.forward(*args, **kwargs)

        mllm.sample._forward = counted
        return self

    def __exit__(self, *exc) -> None:
        mllm.sample._forward = self.forward


def parallel_workload(args, device: torch.device):
    """(lm, vocab, pad id, codes per image, image positions, prompts, uncond prompt, sampling modes)."""
    if args.model:
        from mllm.data import pad_token_id
        from mllm.inference import build_generation_prompts, load_model

        model = load_model(args.model, device)
        meta = os.path.join(args.data, "test", "metadata.jsonl")
        captions = [json.loads(line)["caption"] for line in open(meta)][: args.prompts]
        ids = build_generation_prompts(model, captions)
        own = model.sampling_config(decoding="autoregressive")
        modes = {"own": own, "greedy": dataclasses.replace(own, temperature=0.0)}
        return (model.llm, model.vocab, pad_token_id(model.tokenizer), model.vqrae.num_tokens,
                model.image_position_table(), ids.cond, [ids.uncond], modes)
    preset = PRESETS[args.preset]
    lm, spec, pad_id = build_model(preset, device, getattr(torch, args.dtype or preset.dtype))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, spec.boi_id, (int(n),), generator=g).tolist() for n in torch.randint(8, 33, (args.prompts,), generator=g)]
    modes = {"sample": SamplingConfig(temperature=1.0, cfg_scale=4.0), "greedy": SamplingConfig(temperature=0.0, cfg_scale=4.0)}
    return lm, spec, pad_id, NUM_TOKENS, None, prompts, [[1]], modes


def parallel(args, device: torch.device) -> None:
    """Autoregressive against Jacobi decoding, batch 1 and 8: sequential forwards per call, seconds per image."""
    lm, spec, pad_id, n, positions, prompts, uncond, modes = parallel_workload(args, device)
    what = args.model or f"preset {args.preset}"
    print(f"{what}: device={device} threads={torch.get_num_threads()} codes/image={n} prompts={len(prompts)} "
          f"params={sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M")
    decoders = {"autoregressive": {}}
    for w in map(int, args.windows.split(",")):
        for init in args.draft_inits.split(","):
            for lenience in map(float, args.leniences.split(",")):
                name = f"jacobi w={w} {init}" + (f" lenience {lenience:g}" if lenience != 1 else "")
                decoders[name] = dict(decoding="jacobi", window=w, draft_init=init, lenience=lenience)
    rows = []
    for mode, base in ((m, modes[m]) for m in args.modes.split(",") if m in modes):
        for batch in map(int, args.batches.split(",")):
            fns, forwards = {}, {}
            for name, options in decoders.items():
                sampling = dataclasses.replace(base, seed=0, **options)

                def call(sampling=sampling, name=name):
                    calls = []
                    for start in range(0, len(prompts), batch):
                        with ForwardCounter() as counter:
                            generate_image_codes(lm, prompts[start : start + batch], spec, n, sampling, pad_id=pad_id,
                                                 uncond_ids=uncond if sampling.cfg_scale != 1 else None, positions=positions)
                        calls.append(counter.count)
                    forwards[name] = statistics.mean(calls)

                fns[name] = call
            result = timed(fns, device, args.warmup, args.repeats)
            t_ar, f_ar = result["autoregressive"][0], forwards["autoregressive"]
            for name in decoders:
                t = result[name][0]
                rows.append((mode, batch, name, forwards[name], t / len(prompts), f_ar / forwards[name], t_ar / t))
                print(f"  {mode} batch {batch} {name}: {forwards[name]:.1f} forwards per call, "
                      f"{t / len(prompts):.4f} s per image", flush=True)
    print()
    print("| sampling | batch | decoding | sequential forwards per call | s per image | fewer forwards | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for mode, batch, name, f, t, f_ratio, t_ratio in rows:
        print(f"| {mode} | {batch} | {name} | {f:.1f} | {t:.4f} | {f_ratio:.2f}x | {t_ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the preset's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", default="greedy,sample", help="comma list of greedy, sample")
    parser.add_argument("--workloads", default="cfg,batch32", help="comma list of cfg, batch32")
    parser.add_argument("--compile", action="store_true", help="CUDA only: compiled one-token step (CUDA graphs)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads; default: torch's choice")
    parser.add_argument("--parallel", action="store_true", help="Jacobi against autoregressive decoding (see above)")
    parser.add_argument("--model", default=None, help="--parallel: a saved unified model instead of a preset")
    parser.add_argument("--data", default="data/shapes", help="--parallel --model: captions from DATA/test")
    parser.add_argument("--prompts", type=int, default=8, help="--parallel: prompts per run")
    parser.add_argument("--batches", default="1,8", help="--parallel: comma list of images per sampler call")
    parser.add_argument("--windows", default="16", help="--parallel: comma list of Jacobi windows")
    parser.add_argument("--draft-inits", default="last", help="--parallel: comma list of last, uniform")
    parser.add_argument("--leniences", default="1", help="--parallel: comma list of Jacobi leniences (1 = exact)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parallel:
        if args.modes == "greedy,sample":
            args.modes = "own,sample,greedy"
        parallel(args, torch.device(args.device))
        return

    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or preset.dtype)
    lm, spec, pad_id = build_model(preset, device, dtype)
    use_compile = args.compile and device.type == "cuda"
    lm.generation_config.eos_token_id = spec.eoi_id  # HF's min_new_tokens works by masking the eos id
    lm.generation_config.pad_token_id = pad_id
    print(
        f"preset={args.preset} device={device} dtype={dtype} threads={torch.get_num_threads()} "
        f"params={sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M new_tokens={NUM_TOKENS} compile={use_compile}"
    )

    g = torch.Generator().manual_seed(0)

    def text(n: int) -> list[int]:  # random text-token prompt
        return torch.randint(0, spec.boi_id, (n,), generator=g).tolist()

    workloads = {
        "cfg": ([text(24)], [[1]]),  # (prompts, uncond prompts)
        "batch32": ([text(int(n)) for n in torch.randint(8, 33, (32,), generator=g)], None),
    }
    rows = []
    for name in args.workloads.split(","):
        prompts, uncond = workloads[name]
        hf_rows = prompts + uncond if uncond is not None else prompts
        # HF gets the same rows ours runs, each starting its image with <boi>.
        ids, mask = left_pad([r + [spec.boi_id] for r in hf_rows], pad_id, device)
        cache = new_cache(lm, ids.shape[0], ids.shape[1] + NUM_TOKENS, static=True) if use_compile else None
        for mode in args.modes.split(","):
            greedy = mode == "greedy"
            sampling = SamplingConfig(temperature=0.0 if greedy else 1.0, cfg_scale=4.0 if uncond else 1.0, seed=0)
            hf_kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)

            def ours():
                generate_image_codes(
                    lm, prompts, spec, NUM_TOKENS, sampling, uncond_ids=uncond, pad_id=pad_id, cache=cache, compile_step=use_compile
                )

            static = new_cache(lm, ids.shape[0], ids.shape[1] + NUM_TOKENS, static=True)

            def ours_static():  # the other cache kind than the default on a CPU (dynamic there)
                generate_image_codes(
                    lm, prompts, spec, NUM_TOKENS, sampling, uncond_ids=uncond, pad_id=pad_id, cache=static,
                    compile_step=use_compile,
                )

            def hf():
                with torch.inference_mode():
                    out = lm.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS,
                        **hf_kwargs,
                    )
                assert out.shape[1] == ids.shape[1] + NUM_TOKENS

            result = timed({"hf": hf, "ours": ours, "static": ours_static}, device, args.warmup, args.repeats)
            (t_hf, m_hf), (t_ours, m_ours), (t_static, _) = result["hf"], result["ours"], result["static"]
            rows.append((name, ids.shape[0], mode, t_hf, t_ours, t_static, m_hf, m_ours))
            print(f"  {name} {mode}: HF {t_hf:.3f}s  ours {t_ours:.3f}s  ours with a static cache {t_static:.3f}s",
                  flush=True)

    mem = "CUDA peak" if device.type == "cuda" else "peak RSS"
    print()
    print(f"| workload | rows | mode | HF generate (s) | ours (s) | speed-up | ours, static cache (s) | "
          f"HF {mem} (MiB) | ours {mem} (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n_rows, mode, t_hf, t_ours, t_static, m_hf, m_ours in rows:
        print(
            f"| {name} | {n_rows} | {mode} | {t_hf:.3f} | {t_ours:.3f} | {t_hf / t_ours:.2f}x | {t_static:.3f} "
            f"| {m_hf:.0f} | {m_ours:.0f} |"
        )


if __name__ == "__main__":
    main()
